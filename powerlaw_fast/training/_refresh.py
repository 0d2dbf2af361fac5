"""The per-epoch refresh pass (Nassar et al. 2020, sec. 3.2): one no-grad, eval-mode pass over
the data that accumulates every regularised layer's covariance in float64, then the float64
eigendecompositions, with rank 0's bases on every rank of a process group.

Example::

    >>> import torch
    >>> from torch import nn
    >>> from powerlaw_fast.training._hooks import LayerHooks
    >>> from powerlaw_fast.training._refresh import accumulate_layers
    >>> model = nn.Sequential(nn.Linear(4, 3), nn.Tanh())
    >>> hooks = LayerHooks(model, {"1": model[1]})
    >>> accumulate_layers(model, ["1"], hooks, torch.randn(50, 4), batch_size=20,
    ...                   progress=False)["1"].count
    50
"""

from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm

from powerlaw_fast._torch_helpers import StopForward, eval_mode
from powerlaw_fast.training._hooks import LayerHooks, reused_layer_error
from powerlaw_fast.training.accumulator import CovarianceAccumulator, eigh_descending
from powerlaw_fast.training.capture import iterate_inputs, model_device


def accumulate_layers(
    model: nn.Module, names: list[str], hooks: LayerHooks, data, *, batch_size: int,
    progress: bool,
) -> dict[str, CovarianceAccumulator]:  # fmt: skip
    """Run ``model`` over ``data`` (eval mode, no gradients; training flags restored, also on
    an error) and accumulate each layer's output rows; each forward is cut short once every
    layer has run."""
    device = model_device(model)
    accumulators: dict[str, CovarianceAccumulator] = {}
    fired: set[str] = set()

    def sink(name: str, output) -> None:
        if not isinstance(output, torch.Tensor):
            raise TypeError(
                f"layer {name!r}: expected the layer to output a tensor, got "
                f"{type(output).__name__}"
            )
        if name in fired:
            raise reused_layer_error(name)
        fired.add(name)
        rows = output.detach().reshape(output.shape[0], -1)
        acc = accumulators.get(name)
        if acc is None:
            acc = accumulators[name] = CovarianceAccumulator(rows.shape[1], device=rows.device)
        elif rows.shape[1] != acc.num_features:
            raise ValueError(
                f"layer {name!r}: expected {acc.num_features} features per sample as in the "
                f"first batch, got {rows.shape[1]}"
            )
        acc.update(rows)
        if len(fired) == len(names):
            raise StopForward

    total = None
    if isinstance(data, torch.Tensor):
        total = math.ceil(data.shape[0] / batch_size) if data.dim() >= 1 else None
    elif hasattr(data, "__len__"):
        try:
            total = len(data)
        except TypeError:
            total = None
    batches = tqdm(
        iterate_inputs(data, batch_size), total=total, desc="spectral refresh", unit="batch",
        disable=not progress, leave=False,
    )
    hooks.sink = sink
    try:
        with eval_mode(model), torch.no_grad():
            for inputs in batches:
                fired.clear()
                try:
                    model(inputs.to(device, non_blocking=True))
                except StopForward:
                    pass
                if len(fired) != len(names):
                    missing = [n for n in names if n not in fired]
                    raise ValueError(
                        f"layers {missing} did not run during the model's forward pass"
                    )
    finally:
        hooks.sink = None
        batches.close()
    if not accumulators:
        raise ValueError("data: no batches to refresh the eigenbases from")
    return accumulators


def eigenbases(covariances: dict[str, torch.Tensor], group) -> tuple[dict, dict]:
    """float64 covariances -> (float32 bases, float64 eigenvalues), descending; with a process
    group, rank 0's (eigenvector signs are not guaranteed to agree across devices)."""
    basis, values = {}, {}
    for name, cov in covariances.items():
        lam, vectors = eigh_descending(cov)
        basis[name] = vectors.to(torch.float32)
        values[name] = lam
        broadcast_from_first_rank(group, basis[name], values[name])
    return basis, values


def broadcast_from_first_rank(group, *tensors: torch.Tensor) -> None:
    if group is None:
        return
    import torch.distributed as dist

    if dist.get_world_size(group) == 1:
        return
    source = dist.get_global_rank(group, 0)
    for t in tensors:
        dist.broadcast(t, src=source, group=group)
