"""How an op family becomes a differentiable op (:class:`FusedOp`), and its second-order guard.

Example::

    >>> import torch
    >>> from powerlaw_fast.ops._autograd import refuse_second_order
    >>> g = torch.ones(3)
    >>> refuse_second_order(g, torch.zeros(3), "op") is g   # outside a create_graph backward
    True
"""

from __future__ import annotations

import typing

import torch


def refuse_second_order(grad: torch.Tensor, source: torch.Tensor, op: str) -> torch.Tensor:
    """``grad`` (the gradient for the input ``source``) unchanged, but an error if it is
    differentiated in a ``create_graph=True`` backward.

    The kernels' backward is not differentiable, and for the penalty no second derivative is
    consistent with holding kappa constant, so an error beats a silently wrong or missing
    second-order term. ``@once_differentiable`` is not enough: it stays silent when the
    incoming gradient is a constant, and its error node is pruned by ``torch.autograd.grad``
    unless it leads back to ``source``, as this one does.
    """
    if not torch.is_grad_enabled() or not source.requires_grad:
        return grad
    delayed = torch._C._functions.DelayedError(
        f"{op}: its gradient is not differentiable (second-order gradients through it are "
        f"not supported: the paper holds kappa constant, so no second derivative is "
        f"consistent with its gradient); compute second-order terms without it".encode(),
        2,
    )
    return delayed(grad.detach().requires_grad_(True), source)[0]


# --------------------------------------------------------------------------------------------
# One way to make an op: an eager autograd.Function and torch.library custom ops from one
# forward and one backward
# --------------------------------------------------------------------------------------------
_SCHEMA_TYPES = {
    str: "str", int: "int", float: "float", bool: "bool", torch.dtype: "ScalarType",
    tuple[int, ...]: "int[]", tuple[float, ...]: "float[]", tuple[str, ...]: "str[]",
    tuple[bool, ...]: "bool[]",
}  # fmt: skip


class FusedOp:
    """An op family's forward and backward, made into the two things PyTorch runs:

    - eagerly, one node of :class:`_EagerNode` (a ``torch.autograd.Function``) per call, which
      calls ``forward`` and ``backward`` directly (no dispatcher on the hot path);
    - under ``torch.compile``, the custom ops ``powerlaw_fast::<name>`` and
      ``powerlaw_fast::<name>_backward``, opaque to the compiler, which run the same two
      functions.

    The op family supplies (``inputs`` is a list of tensors, ``settings`` its NamedTuple of
    primitives, whose annotated fields become the custom ops' arguments, in order):

    - ``forward(inputs, settings) -> results``: fresh tensors, or host numbers (an int kept on
      the host eagerly; the custom op carries it as a 0-dim float64 tensor).
    - ``fake(inputs, settings) -> results``: the results' shapes and dtypes (empty tensors).
    - ``outputs(results) -> tuple``: what the caller gets, selections of the results (reading
      only the results it selects from): applied to the results' gradients it gives the
      outputs' gradients, which is how the compiled backward finds them.
    - ``save(inputs, results) -> list``: what ``backward`` reads (tensors or host numbers).
    - ``backward(grads, saved, inputs, settings) -> list``: the gradients of the inputs listed
      in ``differentiable`` (each in its input's shape and dtype) from the outputs'
      gradients (None for an output with none); ``inputs`` holds those differentiable
      inputs, for their shapes and dtypes only.
    - ``differentiable``: the positions of the inputs with a gradient (or a function of the
      settings giving them, for a variable number of inputs); ``nondifferentiable``:
      the positions of the outputs without one (a result none of the other outputs selects
      from is not differentiable either).
    - ``label(settings) -> str``: the name errors give.

    The gradient it returns is not differentiable again (:func:`refuse_second_order`).

    Example::

        >>> from typing import NamedTuple
        >>> class Scale(NamedTuple):
        ...     factor: float
        >>> double = FusedOp(
        ...     "doc_scale", Scale, label=lambda s: "doc_scale",
        ...     forward=lambda inputs, s: [inputs[0] * s.factor],
        ...     fake=lambda inputs, s: [torch.empty_like(inputs[0])],
        ...     outputs=lambda results: (results[0],), save=lambda inputs, results: [],
        ...     backward=lambda grads, saved, inputs, s: [grads[0] * s.factor])
        >>> x = torch.ones(3, requires_grad=True)
        >>> double([x], Scale(2.0))[0].sum().backward()
        >>> x.grad
        tensor([2., 2., 2.])
    """

    def __init__(self, name: str, settings_type: type, *, forward, fake, outputs, save,
                 backward, label, differentiable=(0,), nondifferentiable=()):  # fmt: skip
        self.name, self.settings_type = name, settings_type
        self.forward, self.fake, self.outputs, self.save = forward, fake, outputs, save
        self.backward, self.label = backward, label
        self._differentiable = differentiable if callable(differentiable) else (
            lambda settings, fixed=tuple(differentiable): fixed)
        self.nondifferentiable = tuple(nondifferentiable)
        hints = typing.get_type_hints(settings_type)
        fields = ", ".join(f"{_SCHEMA_TYPES[hints[f]]} {f}" for f in settings_type._fields)
        self.custom_op = torch.library.custom_op(
            f"powerlaw_fast::{name}", self._forward_impl, mutates_args=(),
            schema=f"(Tensor[] inputs, {fields}) -> Tensor[]",
        )  # fmt: skip
        self.custom_op.register_fake(self._fake_impl)
        self.backward_op = torch.library.custom_op(
            f"powerlaw_fast::{name}_backward", self._backward_impl, mutates_args=(),
            schema=f"(Tensor?[] grads, Tensor[] saved, Tensor[] inputs, {fields}) -> Tensor[]",
        )  # fmt: skip
        self.backward_op.register_fake(self._backward_fake)
        self.custom_op.register_autograd(self._compiled_backward, setup_context=self._setup)

    def __call__(self, inputs, settings) -> tuple:
        """The op's outputs for ``inputs`` (a list of tensors) and ``settings``."""
        if torch.compiler.is_compiling():
            return self.outputs(self.custom_op(list(inputs), *settings))
        return _EagerNode.apply(self, settings, *inputs)

    # the custom ops' parts
    def _settings(self, fields):
        return self.settings_type(*(tuple(f) if isinstance(f, list) else f for f in fields))

    def differentiable(self, settings) -> tuple:
        return tuple(self._differentiable(settings))

    def _forward_impl(self, inputs, *fields):
        results = self.forward(inputs, self._settings(fields))
        device = inputs[0].device
        return _unaliased([r if isinstance(r, torch.Tensor) else
                           torch.full((), float(r), dtype=torch.float64, device=device)
                           for r in results], inputs)  # fmt: skip

    def _fake_impl(self, inputs, *fields):
        return self.fake(inputs, self._settings(fields))

    def _backward_impl(self, grads, saved, inputs, *fields):
        input_grads = self.backward(grads, saved, inputs, self._settings(fields))
        return _unaliased([g.contiguous() for g in input_grads], [*grads, *saved, *inputs])

    def _backward_fake(self, grads, saved, inputs, *fields):
        return [torch.empty_like(x, memory_format=torch.contiguous_format) for x in inputs]

    def _setup(self, ctx, inputs, output):
        tensors, fields = inputs[0], inputs[1:]
        saved = self.save(tensors, output)
        ctx.n_saved = len(saved)
        differentiable = self.differentiable(self._settings(fields))
        ctx.save_for_backward(*saved, *(tensors[i] for i in differentiable))
        ctx.fields, ctx.n_inputs, ctx.differentiable = fields, len(tensors), differentiable
        outputs = self.outputs(output)
        selected = [o if o._base is None else o._base for i, o in enumerate(outputs)
                    if i not in self.nondifferentiable]  # fmt: skip
        nondiff = [r for r in output if not any(r is s for s in selected)]
        if nondiff:
            ctx.mark_non_differentiable(*nondiff)

    def _compiled_backward(self, ctx, grads):
        # every result's gradient arrives (a custom op's gradients are materialised)
        stored = ctx.saved_tensors
        saved, inputs = list(stored[: ctx.n_saved]), list(stored[ctx.n_saved :])
        output_grads = [None if i in self.nondifferentiable else g
                        for i, g in enumerate(self.outputs(grads))]  # fmt: skip
        input_grads = self.backward_op(output_grads, saved, inputs, *ctx.fields)
        out = [None] * ctx.n_inputs
        for i, grad in zip(ctx.differentiable, input_grads, strict=True):
            out[i] = grad
        return (out,) + (None,) * len(ctx.fields)


def _unaliased(results: list, inputs) -> list:
    """A custom op may not return a view of an input or of another result: such results are
    copied (only in the compiled path; the eager node returns views freely)."""
    seen = {t.untyped_storage().data_ptr() for t in inputs if t is not None and t.numel()}
    out = []
    for r in results:
        ptr = r.untyped_storage().data_ptr() if r.numel() else None
        if ptr in seen:
            r = r.clone()
            ptr = r.untyped_storage().data_ptr()
        seen.add(ptr)
        out.append(r)
    return out


class _EagerNode(torch.autograd.Function):
    """The eager path of every :class:`FusedOp`: one autograd node per call."""

    @staticmethod
    def forward(ctx, op: FusedOp, settings, *inputs):
        results = op.forward(inputs, settings)
        saved = op.save(inputs, results)
        ctx.save_for_backward(*(s for s in saved if isinstance(s, torch.Tensor)))
        ctx.host = [None if isinstance(s, torch.Tensor) else s for s in saved]
        ctx.op, ctx.settings = op, settings
        # inputs held as attributes make no reference cycle and, unlike saved tensors, are
        # not version-checked: the backward reads only their shapes and dtypes
        ctx.inputs = inputs
        ctx.set_materialize_grads(False)
        outputs = op.outputs(results)
        if op.nondifferentiable:
            ctx.mark_non_differentiable(*(outputs[i] for i in op.nondifferentiable))
        return outputs

    @staticmethod
    def backward(ctx, *grads):
        op = ctx.op
        if all(g is None for g in grads):
            return (None,) * (2 + len(ctx.inputs))
        stored = iter(ctx.saved_tensors)
        saved = [next(stored) if h is None else h for h in ctx.host]
        differentiable = op.differentiable(ctx.settings)
        inputs = [ctx.inputs[i] for i in differentiable]
        input_grads = op.backward(list(grads), saved, inputs, ctx.settings)
        out = [None] * len(ctx.inputs)
        label = op.label(ctx.settings)
        for i, grad, x in zip(differentiable, input_grads, inputs, strict=True):
            out[i] = refuse_second_order(grad, x, label)
        return (None, None, *out)
