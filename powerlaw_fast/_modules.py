"""Finding things in a model: a layer by name or by module, and the device a module lives on.

Shared by :mod:`powerlaw_fast.training` and the attacks, so
that a layer given as ``"hidden3"``, ``"blocks.fc"`` or the module itself means the same thing
everywhere.

Example::

    >>> from powerlaw_fast._modules import find_submodule, module_device
    >>> from powerlaw_fast.paper.models import MLP
    >>> net = MLP()
    >>> find_submodule(net, "hidden3", "layer")[0], module_device(net)
    ('hidden3', device(type='cpu'))
"""

from __future__ import annotations

import itertools

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
