"""Running a model up to one layer: capture its output, its covariance and eigenspectrum over a
data set (see :mod:`powerlaw_fast.training.accumulator` for the streaming sums).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from .._torch_helpers import StopForward, eval_mode, find_submodule, module_device
from .._validation import check_int_range
from .accumulator import CovarianceAccumulator


def resolve_layer(model: nn.Module, layer) -> tuple[str, nn.Module]:
    """``layer`` as (name, module): a module of ``model``, a name from ``model.hidden_layers()``
    or a dotted submodule name, or ``None`` for the last of ``model.hidden_layers()``."""
    if layer is None:
        hidden = model.hidden_layers() if hasattr(model, "hidden_layers") else {}
        if not hidden:
            raise ValueError(
                "layer: None means the last hidden layer, but the model has no hidden_layers()"
            )
        name = next(reversed(hidden))
        return name, hidden[name]
    if not isinstance(layer, (str, nn.Module)):
        raise TypeError(
            f"layer: expected a str, an nn.Module or None, got {type(layer).__name__}"
        )
    return find_submodule(model, layer, "layer")


def _first_input(batch):
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise TypeError(
        f"data: expected batches that are tensors or (inputs, targets) tuples, got "
        f"{type(batch).__name__}"
    )


def iterate_inputs(data, batch_size: int) -> Iterator[torch.Tensor]:
    """Input batches from a tensor ``[M, ...]`` (split into ``batch_size`` rows, last partial)
    or from an iterable of tensors / ``(inputs, targets)`` tuples such as a DataLoader."""
    if isinstance(data, torch.Tensor):
        if data.dim() < 1 or data.shape[0] < 1:
            raise ValueError(f"data: expected a non-empty [M, ...] tensor, got {tuple(data.shape)}")
        yield from data.split(batch_size)
        return
    if not isinstance(data, Iterable):
        raise TypeError(
            f"data: expected a tensor or an iterable of batches, got {type(data).__name__}"
        )
    for batch in data:
        yield _first_input(batch)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's parameters (else buffers); the CPU when it has neither."""
    return module_device(model, torch.device("cpu"))


def layer_output(model: nn.Module, module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """Run ``model(inputs)`` until ``module`` has produced its output; return it as ``[B, N]``.

    The forward pass is cut short after the layer, so later layers cost nothing. Autograd
    follows the current grad mode.
    """
    captured: list[torch.Tensor] = []

    def hook(_module, _args, output):
        captured.append(output)
        raise StopForward

    handle = module.register_forward_hook(hook)
    try:
        model(inputs)
    except StopForward:
        pass
    finally:
        handle.remove()
    if not captured:
        raise ValueError("layer: the module did not run during the model's forward pass")
    out = captured[0]
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"layer: expected the layer to output a tensor, got {type(out).__name__}")
    return out.reshape(out.shape[0], -1)


def layer_covariance(
    model: nn.Module,
    layer,
    data,
    *,
    batch_size: int = 1000,
    device: torch.device | str | None = None,
) -> CovarianceAccumulator:
    """Streaming covariance of a layer's output over a data set (model in eval mode, no grad).

    Args:
        model: the network; put in eval mode for the pass and restored afterwards.
        layer: see :func:`resolve_layer` (e.g. ``"hidden3"`` or ``None`` for the last).
        data: a tensor ``[M, ...]`` of inputs or an iterable of batches (see
            :func:`iterate_inputs`).
        batch_size: rows per forward pass when ``data`` is a tensor.
        device: where the model runs (default: the model's parameters' device).

    Returns the :class:`CovarianceAccumulator` (float64, on ``device``).
    """
    batch_size = check_int_range(batch_size, "batch_size", 1, 1 << 30)
    _, module = resolve_layer(model, layer)
    run_device = torch.device(device) if device is not None else model_device(model)
    acc: CovarianceAccumulator | None = None
    with eval_mode(model), torch.no_grad():
        for inputs in iterate_inputs(data, batch_size):
            out = layer_output(model, module, inputs.to(run_device))
            if acc is None:
                acc = CovarianceAccumulator(out.shape[1], device=run_device)
            acc.update(out)
    if acc is None:
        raise ValueError("data: no batches")
    return acc


def layer_spectrum(
    model: nn.Module,
    layer,
    data,
    *,
    batch_size: int = 1000,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Eigenvalues (float64, CPU, descending) of a layer's covariance over a data set.

    Example::

        >>> import torch
        >>> from powerlaw_fast.paper.models import MLP
        >>> from powerlaw_fast.training.capture import layer_spectrum
        >>> lam = layer_spectrum(MLP(widths=(30, 20)), "hidden2", torch.rand(100, 784))
        >>> lam.shape, lam.dtype, bool((lam[:-1] >= lam[1:]).all())
        (torch.Size([20]), torch.float64, True)
    """
    acc = layer_covariance(model, layer, data, batch_size=batch_size, device=device)
    return torch.linalg.eigvalsh(acc.covariance()).flip(0).cpu()
