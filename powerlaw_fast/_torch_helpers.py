"""Small torch helpers shared across the package, each written once.

- :func:`find_submodule`, :func:`module_device`: a layer given as ``"hidden3"``,
  ``"blocks.fc"`` or the module itself means the same thing in the regulariser, the spectrum
  tools and the attacks; the device a module lives on
- :func:`eval_mode`: eval mode for a block, every submodule's own flag restored afterwards
- :class:`StopForward`: raised by a forward hook to cut a forward pass short
- :func:`accumulation_dtype`: the dtype sums are kept in (float64 for float64, else float32)

Example::

    >>> from powerlaw_fast._torch_helpers import find_submodule, module_device
    >>> from powerlaw_fast.paper.models import MLP
    >>> net = MLP()
    >>> find_submodule(net, "hidden3", "layer")[0], module_device(net)
    ('hidden3', device(type='cpu'))
"""

from __future__ import annotations

import itertools
from contextlib import contextmanager

import torch
from torch import nn


def module_device(module: nn.Module, default: torch.device | None = None) -> torch.device | None:
    """The device of ``module``'s first parameter (else first buffer); ``default`` when it has
    neither."""
    for t in itertools.chain(module.parameters(), module.buffers()):
        return t.device
    return default


def find_submodule(model: nn.Module, key, what: str) -> tuple[str, nn.Module]:
    """``key`` as (name, module): a name from ``model.hidden_layers()`` (when the model has
    one), a dotted submodule name, or a module of ``model``. ``""`` and ``model`` itself give
    ``("", model)``. Errors name the argument ``what``.
    """
    if isinstance(key, str):
        hidden = model.hidden_layers() if hasattr(model, "hidden_layers") else {}
        if key in hidden:
            return key, hidden[key]
        try:
            return key, model.get_submodule(key)
        except AttributeError:
            known = list(hidden) or [n for n, _ in model.named_modules() if n][:20]
            raise ValueError(
                f"{what}: no submodule {key!r} in the model; known names: {known}"
            ) from None
    if isinstance(key, nn.Module):
        for name, module in model.named_modules():
            if module is key:
                return name, module
        raise ValueError(f"{what}: the given {type(key).__name__} is not a submodule of model")
    raise TypeError(f"{what}: expected module names or modules, got {type(key).__name__}")


@contextmanager
def eval_mode(model: nn.Module):
    """Put ``model`` in eval mode and restore every submodule's own training flag afterwards
    (also on an error)."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


class StopForward(Exception):
    """Raised by a forward hook once the wanted layers have run, to skip the rest of the
    forward pass; the caller catches it."""


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 data, float32 for everything else: the dtype sums are kept in."""
    return torch.float64 if dtype == torch.float64 else torch.float32
