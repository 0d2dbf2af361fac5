"""Every regularised layer's spectral penalty in a fixed number of launches: a grouped op.

A model with L regularised layers would pay L times the host cost and the launches of
:func:`~powerlaw_fast.spec_penalty`. Here the layers' activations ``x_l [B, N_l]`` (one batch,
one dtype, widths that may differ) travel together:

1. ``torch.cat`` packs them into one flat buffer (layer l is a row-major ``[B, N_l]`` block),
2. ``_grouped_column_mean_kernel``: every layer's column means,
3. ``_grouped_projection_kernel``: one grouped GEMM (as in Triton's grouped-GEMM tutorial: each
   program finds its layer from a prefix of tile counts) ``Z_l = (x_l - mu_l) V_l`` with the
   column sums of ``Z_l`` and ``Z_l * Z_l`` in its epilogue,
4. ``_grouped_penalty_kernel``: one program per layer finishes, sorts and penalises its
   spectrum (the helpers of :mod:`powerlaw_fast.ops.spectral_penalty`),
5. one ``sum`` of the per-layer penalties,

and the backward is one grouped GEMM, ``_grouped_backprojection_kernel``. Six launches for any
L (a test counts them for 1, 3 and 6 layers); the per-layer shape tables are uploaded once per
layout and cached. The bases ``V_l`` are read from one flat buffer: pass views of it (the
regulariser keeps its bases so) or separate tensors (then one ``cat`` per call).

The plain-torch twin is the per-layer loop over :func:`~powerlaw_fast.spec_penalty`'s stages
(:func:`grouped_penalty_torch`); the tests compare both with float64.

Example::

    >>> import torch
    >>> from powerlaw_fast.ops.grouped_penalty import grouped_penalty_torch
    >>> xs = [torch.randn(300, 40), torch.randn(300, 24)]
    >>> Vs = [torch.linalg.eigh(torch.cov(x.T))[1].flip(1) for x in xs]
    >>> total, lams = grouped_penalty_torch(xs, Vs, alphas=[1.0, 1.0], anchors=[9, 9],
    ...                                     betas=[1.0, 2.0], convention="paper")
    >>> total.shape, [lam.shape for lam in lams]
    (torch.Size([]), [torch.Size([40]), torch.Size([24])])
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from powerlaw_fast.ops import _alloc, status
from powerlaw_fast.ops._autograd import FusedOp
from powerlaw_fast.ops._layout import BLOCK_M, MAX_FUSED_N, SCRATCH_HEAD
from powerlaw_fast.ops._plan import (
    anchor_tolerance,
    kink_tolerance,
    mean_tolerance,
    operand_dtype,
    plan_for,
)
from powerlaw_fast.ops._settings import Settings, check_half_gradient, status_raiser
from powerlaw_fast.ops._triton_gemm import cdiv, dot_in_fp32, next_power_of_2, size_bucket
from powerlaw_fast.ops.backends import register
from powerlaw_fast.ops.spectral_penalty import penalty_and_spectrum


@functools.cache
def _kernels():
    """This family's Triton kernels (:mod:`powerlaw_fast.ops._grouped_kernels`), imported on the
    first launch so that importing the package does not import triton."""
    from powerlaw_fast.ops import _grouped_kernels

    return _grouped_kernels


# --------------------------------------------------------------------------------------------
# Layout: per-layer offsets, uploaded once per (device, widths, settings)
# --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def _tables(device: torch.device, widths: tuple, anchors: tuple, alphas: tuple, betas: tuple,
            plan):  # fmt: skip
    col_off, v_off, c, v = [], [], 0, 0
    for n in widths:
        col_off.append(c)
        v_off.append(v)
        c, v = c + n, v + n * n
    ints = dict(dtype=torch.int64, device=device)
    return dict(
        widths=torch.tensor(widths, dtype=torch.int32, device=device),
        col_off=torch.tensor(col_off, **ints),
        v_off=torch.tensor(v_off, **ints),
        anchors=torch.tensor(anchors, dtype=torch.int32, device=device),
        alphas=torch.tensor(alphas, dtype=torch.float32, device=device),
        betas=torch.tensor(betas, dtype=torch.float32, device=device),
        tinies=torch.tensor([anchor_tolerance(plan, n) for n in widths], dtype=torch.float32,
                            device=device),
        kinks=torch.tensor(
            [kink_tolerance(n, a, torch.float32) for n, a in zip(widths, alphas, strict=True)],
            dtype=torch.float32, device=device,
        ),
        total=c,
        widths_host=widths,
        v_offsets=tuple(v_off),
    )


def flat_bases(Vs) -> torch.Tensor:
    """The bases as one flat buffer in layer order: the buffer itself when ``Vs`` are already
    consecutive contiguous views of one (no copy), else one ``cat``. Their dtype is kept: the
    kernels widen float16 bases to the float32 operands themselves."""
    first = Vs[0]
    offset = 0
    shared = True
    for V in Vs:
        shared = shared and V.dtype == first.dtype and V.is_contiguous() and (
            V.data_ptr() == first.data_ptr() + offset * V.element_size()
        )
        offset += V.numel()
    if shared and first.untyped_storage().nbytes() >= (
        first.storage_offset() + offset
    ) * first.element_size():
        return torch.as_strided(first, (offset,), (1,))
    return torch.cat([V.reshape(-1).to(first.dtype) for V in Vs])


# --------------------------------------------------------------------------------------------
# Forward / backward (Triton) and the plain-torch twin
# --------------------------------------------------------------------------------------------
def _launch_forward(xs, Vs, tables, settings, plan):
    B = xs[0].shape[0]
    widths = tuple(x.shape[1] for x in xs)
    device = xs[0].device
    total, L = tables["total"], len(xs)
    x_flat = torch.cat([x.reshape(-1) for x in xs])
    v_flat = flat_bases(Vs)
    mean = _alloc.empty((total,), device=device, dtype=torch.float32)
    block_n = 32
    mean_programs = sum(cdiv(n, block_n) for n in widths)
    _kernels()._grouped_column_mean_kernel[(mean_programs,)](
        x_flat, mean, tables["widths"], tables["col_off"], B, L, BLOCK_B=32, BLOCK_N=block_n
    )
    z = _alloc.empty((B * total,), device=device, dtype=plan.z_dtype)
    num_m = cdiv(B, BLOCK_M)
    moments = _alloc.empty((2, num_m, total), device=device, dtype=torch.float32)

    def grid(meta):
        return (sum(num_m * cdiv(n, meta["BLOCK_N"]) for n in widths),)

    operand_fp32 = plan.operand == torch.float32 and v_flat.dtype != torch.float32
    _kernels()._grouped_projection_kernel[grid](
        x_flat, mean, v_flat, z, moments, tables["widths"], tables["col_off"], tables["v_off"],
        B, L, total, size_bucket(B),
        OPERAND_FP32=operand_fp32, IN_PRECISION=plan.precision,
        DOT_IN_FP32=dot_in_fp32(plan.operand), BLOCK_M=BLOCK_M,
    )  # fmt: skip
    parts = _alloc.empty((3 * total,), device=device, dtype=torch.float32)
    heads = _alloc.empty((L, SCRATCH_HEAD), device=device, dtype=torch.float32)
    block = max(16, next_power_of_2(max(widths)))
    _kernels()._grouped_penalty_kernel[(L,)](
        moments, parts, heads, tables["widths"], tables["col_off"], tables["anchors"],
        tables["alphas"], tables["betas"], tables["tinies"], tables["kinks"], num_m, total,
        float(B), mean_tolerance(B, torch.float32),
        SKIP_NONPOSITIVE=settings.skip_nonpositive, BLOCK=block,
        num_warps=4 if block <= 1024 else 8,
    )  # fmt: skip
    return heads, parts, z, v_flat


def _launch_backward(grad_out, z, parts, v_flat, tables, B, x_dtype, plan):
    widths = tables["widths_host"]
    total, L = tables["total"], len(widths)
    out = _alloc.empty((B * total,), device=z.device, dtype=x_dtype)
    num_m = cdiv(B, BLOCK_M)

    def grid(meta):
        return (sum(num_m * cdiv(n, meta["BLOCK_N"]) for n in widths),)

    _kernels()._grouped_backprojection_kernel[grid](
        z, parts, grad_out, v_flat, out, tables["widths"], tables["col_off"], tables["v_off"],
        B, L, total, size_bucket(B), 2.0 / (B - 1),
        OPERAND_FP32=plan.operand == torch.float32 and v_flat.dtype != torch.float32,
        IN_PRECISION=plan.precision, DOT_IN_FP32=dot_in_fp32(plan.operand), BLOCK_M=BLOCK_M,
    )  # fmt: skip
    return out


class GroupedSettings(NamedTuple):
    """Per-layer settings of the grouped op (one entry per layer); primitives only."""

    anchors: tuple[int, ...]  # 0-based
    alphas: tuple[float, ...]
    betas: tuple[float, ...]
    skip_nonpositive: bool
    validate: str
    names: tuple[str, ...]  # the layers' names, for errors
    taus: tuple[int, ...]
    compute: str = ""  # "" (x's dtype) or "bfloat16" / "float32"


def _plan(xs, settings: GroupedSettings):
    compute = getattr(torch, settings.compute) if settings.compute else None
    return plan_for(xs[0].dtype, max(x.shape[1] for x in xs), compute)


def _layer_tables(xs, settings: GroupedSettings, plan):
    widths = tuple(x.shape[1] for x in xs)
    return _tables(xs[0].device, widths, settings.anchors, settings.alphas, settings.betas, plan)


def _forward(inputs, settings: GroupedSettings):
    """inputs ``[x_1 .. x_L, V_1 .. V_L]`` -> [total R, parts, Z, the flat bases]."""
    L = len(settings.anchors)
    xs, Vs = inputs[:L], inputs[L:]
    plan = _plan(xs, settings)
    heads, parts, z, v_flat = _launch_forward(xs, Vs, _layer_tables(xs, settings, plan),
                                              settings, plan)  # fmt: skip
    status.check(heads[:, 1:].reshape(-1), settings.validate, _group_raiser(settings),
                 op="grouped penalty")  # fmt: skip
    return [heads[:, 0].sum(), parts, z, v_flat]


def _fake(inputs, settings: GroupedSettings):
    L = len(settings.anchors)
    xs, Vs = inputs[:L], inputs[L:]
    total = sum(x.shape[1] for x in xs)
    compute = getattr(torch, settings.compute) if settings.compute else None
    return [xs[0].new_empty((), dtype=torch.float32),
            xs[0].new_empty((3 * total,), dtype=torch.float32),
            xs[0].new_empty((xs[0].shape[0] * total,), dtype=operand_dtype(xs[0].dtype, compute)),
            Vs[0].new_empty((sum(V.numel() for V in Vs),))]  # fmt: skip


def _outputs(results):
    """(total R, every layer's lam, flat [sum N_l])."""
    total_R, parts = results[0], results[1]
    total = parts.shape[0] // 3
    return total_R, parts[total : 2 * total]


def _backward(grads, saved, inputs, settings: GroupedSettings):
    z, parts, v_flat = saved
    plan = _plan(inputs, settings)
    B = inputs[0].shape[0]
    flat = _launch_backward(grads[0], z, parts, v_flat, _layer_tables(inputs, settings, plan),
                            B, inputs[0].dtype, plan)  # fmt: skip
    check_half_gradient(flat, settings.validate, "grouped penalty (backward)")
    grads, offset = [], 0
    for x in inputs:
        grads.append(flat[offset : offset + x.numel()].view(x.shape))
        offset += x.numel()
    return grads


# [x_l..., V_l...] -> (total R, lam of every layer, flat and detached): one node for all layers
GROUPED_PENALTY = FusedOp(
    "grouped_penalty", GroupedSettings, forward=_forward, fake=_fake, outputs=_outputs,
    save=lambda inputs, results: [results[2], results[1], results[3]], backward=_backward,
    label=lambda settings: "SpectralRegularizer.penalty",
    differentiable=lambda settings: range(len(settings.anchors)), nondifferentiable=(1,),
)  # fmt: skip


def _group_raiser(settings: GroupedSettings):
    def raise_for(values):
        for i, name in enumerate(settings.names):
            layer = Settings(
                backend="triton", anchor=settings.anchors[i], alpha=settings.alphas[i],
                beta=settings.betas[i], skip_nonpositive=settings.skip_nonpositive,
                validate=settings.validate, source="x", tau=settings.taus[i],
            )
            try:
                status_raiser(layer)(values[3 * i : 3 * i + 3])
            except ValueError as err:
                raise ValueError(f"layer {name!r}: {err}") from None

    return raise_for


def grouped_penalty_triton(xs, Vs, *, alphas, anchors, betas, convention, validate="deferred",
                           compute_dtype=None, names=None, taus=None):  # fmt: skip
    """All layers at once on the Triton backend -> (sum of the layers' penalties, [lam_l]).

    ``xs``: ``[B, N_l]`` activations, one batch size and dtype (float32/16-bit), N_l <= 4096;
    ``Vs``: ``[N_l, N_l]`` in x's dtype or ``compute_dtype``; per-layer ``alphas``, ``anchors``
    (0-based), ``betas``. Differentiable in every x.
    """
    status.poll()
    compute = str(compute_dtype).removeprefix("torch.") if compute_dtype is not None else ""
    if compute_dtype is not None:  # the bases in the compute dtype (no copy when they are)
        operand = plan_for(xs[0].dtype, max(x.shape[1] for x in xs), compute_dtype).operand
        Vs = [V if V.dtype == operand else V.to(operand) for V in Vs]
    names = names or [str(i) for i in range(len(xs))]
    taus = taus or [a + 1 if convention == "paper" else a for a in anchors]  # as the twin's
    settings = GroupedSettings(
        anchors=tuple(anchors), alphas=tuple(float(a) for a in alphas),
        betas=tuple(float(b) for b in betas), skip_nonpositive=convention == "authors",
        validate=status.validation_mode(validate), names=tuple(names),
        taus=tuple(taus), compute=compute,
    )  # fmt: skip
    total, lams = GROUPED_PENALTY([*(x.contiguous() for x in xs), *Vs], settings)
    out, offset = [], 0
    for x in xs:
        out.append(lams[offset : offset + x.shape[1]])
        offset += x.shape[1]
    return total, out


@register("layers_penalty", "torch")
def grouped_penalty_torch(xs, Vs, *, alphas, anchors, betas, convention, validate="deferred",
                          compute_dtype=None, names=None, taus=None, process_group=None,
                          backend="torch"):  # fmt: skip
    """Twin of :func:`grouped_penalty_triton`: the per-layer loop over spec_penalty (also the
    path of the other backends, of a process group, of torch.compile, and of layers the
    grouped kernels do not take). Layers may differ in dtype and device; a float64 layer is
    computed in float64 whatever ``compute_dtype``."""
    names = names or [str(i) for i in range(len(xs))]
    taus = taus or [a + 1 if convention == "paper" else a for a in anchors]
    total, lams = None, []
    for i, (x, V) in enumerate(zip(xs, Vs, strict=True)):
        try:
            with status.where(f"layer {names[i]!r}"):
                value, lam = penalty_and_spectrum(
                    x, V, alpha=alphas[i], tau=taus[i], beta=betas[i], convention=convention,
                    backend=backend, validate=validate, process_group=process_group,
                    compute_dtype=compute_dtype if x.dtype != torch.float64 else None,
                )  # fmt: skip
        except status.DeferredValidationError:
            raise  # about an earlier call: it names its own layer
        except ValueError as err:
            raise ValueError(f"layer {names[i]!r}: {err}") from None
        lams.append(lam)
        if total is None:
            total = value
        else:
            total = total + value.to(torch.promote_types(total.dtype, value.dtype))
    return total, lams


@register("layers_penalty", "cuda")
def grouped_penalty_cuda(xs, Vs, **settings):
    """The per-layer loop on the CUDA C++ backend."""
    return grouped_penalty_torch(xs, Vs, **settings, backend="cuda")


@register("layers_penalty", "triton")
def layers_penalty_triton(xs, Vs, *, process_group=None, **settings):
    """The grouped kernels where they apply (:func:`can_group`, one process, eager), else the
    per-layer loop of Triton launches."""
    if process_group is None and not torch.compiler.is_compiling() and can_group(xs):
        return grouped_penalty_triton(xs, Vs, **settings)
    return grouped_penalty_torch(xs, Vs, **settings, process_group=process_group,
                                 backend="triton")  # fmt: skip


def can_group(xs) -> bool:
    """The grouped kernels apply: one batch size, dtype (not float64) and device, N <= 4096."""
    first = xs[0]
    return (
        first.dtype != torch.float64
        and all(
            x.dtype == first.dtype and x.shape[0] == first.shape[0] and x.device == first.device
            for x in xs
        )
        and max(x.shape[1] for x in xs) <= MAX_FUSED_N
    )
