"""Which activations the regulariser penalises: forward hooks on the regularised layers.

A layer's output is kept only in a training forward (the layer in training mode, gradients
enabled, not the recomputation that activation checkpointing runs inside a backward pass).
Within one call of the model a layer that runs twice is refused (its basis describes one use);
a layer called outside the model's own call (``model[:2](x)``, the layer itself) is a forward of
its own, and the latest forward wins. The kept output must still be what the layer returned
when it is penalised: an in-place op after the layer is refused.

Example::

    >>> import torch
    >>> from torch import nn
    >>> from powerlaw_fast.training._hooks import LayerHooks
    >>> model = nn.Sequential(nn.Linear(4, 3), nn.Tanh())
    >>> hooks = LayerHooks(model, {"0": model[0]})
    >>> _ = model(torch.randn(5, 4))
    >>> hooks.take()["0"].shape
    torch.Size([5, 3])
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def _in_backward() -> bool:
    """True while autograd runs a backward pass: activation checkpointing recomputes the
    forward there, and that recomputation is not a new training forward."""
    return torch._C._current_graph_task_id() != -1


def reused_layer_error(name: str) -> RuntimeError:
    """The error for a layer that ran twice in one forward pass (the hooks and the refresh)."""
    return RuntimeError(
        f"layer {name!r} ran twice in one forward pass: its basis describes one use and the "
        f"penalty would see another; a module reused within the forward cannot be regularised "
        f"(wrap each use in its own module)"
    )


class LayerHooks:
    """Forward hooks on ``modules`` (name -> module) and on ``model``'s own call.

    ``sink``, when set (the refresh pass), receives ``(name, output)`` of every call instead.
    """

    def __init__(self, model: nn.Module, modules: dict[str, nn.Module]) -> None:
        self.captured: dict[str, torch.Tensor] = {}
        self.sink: Callable[[str, object], None] | None = None
        self._versions: dict[str, int] = {}  # the kept output's version at capture
        self._fired: set[str] = set()  # layers that ran in the current call of the model
        self._model_depth = 0  # calls of the model in progress
        self._handles = [
            module.register_forward_hook(self._make_hook(name))
            for name, module in modules.items()
        ]
        self._handles.append(model.register_forward_pre_hook(self._enter_model))
        self._handles.append(model.register_forward_hook(self._leave_model, always_call=True))

    def _enter_model(self, module, args) -> None:
        if self._model_depth == 0:
            self._fired.clear()
        self._model_depth += 1

    def _leave_model(self, module, args, output) -> None:
        self._model_depth = max(0, self._model_depth - 1)

    def _make_hook(self, name: str):
        def hook(module, args, output):
            if self.sink is not None:
                self.sink(name, output)
            elif module.training and torch.is_grad_enabled() and not _in_backward():
                if self._model_depth > 0:
                    if name in self._fired:
                        raise reused_layer_error(name)
                    self._fired.add(name)
                self.captured[name] = output
                if isinstance(output, torch.Tensor) and not torch.compiler.is_compiling():
                    self._versions[name] = output._version

        return hook

    def take(self) -> dict[str, object]:
        """The kept outputs (released here: each forward is penalised once), each checked to be
        unmodified since its layer returned it."""
        captured, self.captured = self.captured, {}
        versions, self._versions = self._versions, {}
        for name, out in captured.items():
            version = versions.get(name)
            if version is not None and isinstance(out, torch.Tensor) and out._version != version:
                raise RuntimeError(
                    f"layer {name!r}: its output was modified in place after the layer ran "
                    f"(e.g. by nn.ReLU(inplace=True) or an in-place op on it), so the penalty "
                    f"would see the modified values, not the layer's; use the out-of-place op "
                    f"after a regularised layer (nn.ReLU(inplace=False))"
                )
        return captured

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.captured.clear()
        self._versions.clear()
