"""Sensitivity maps of Nassar et al. (2020), eq. (9): J_n(x_j) = d lambda_n^D / d x_j.

lambda_n^D is the n-th largest eigenvalue of the covariance Sigma^D of a hidden layer (the last
one in the paper's figures) over the whole data set, and x_j is one input image. The paper:
"the full data set is passed through the network to obtain Sigma^D. The eigenvalues are then
computed and gradients are back-propagated through the operation". So the map for rank n is
the gradient of the data-set eigenvalue with respect to the pixels of one image x_j, with all
other images held fixed; one image per rank, drawn as a picture.

How it is computed. For a simple eigenvalue, d lambda_n = v_n^T (d Sigma^D) v_n (first-order
perturbation theory, the same result as back-propagating through ``eigh``). So with the
data-set eigenvectors V held fixed, lambda_n = sum_k (p_kn - pbar_n)^2 / (M - 1) with
p_k = V^T (h_k - mu), and only the forward batch that contains x_j needs a graph: its
projections enter the data-set sums with their gradients, every other batch as a constant.
Layers that couple a batch (batch whitening in ``"batch"`` eval mode) are handled exactly,
because x_j's whole batch is re-run with gradients. Eigenvalues that are (nearly) repeated have
no well-defined derivative; pick ranks with a gap.

Averaging J_n over images would not work as a summary: for a linear layer it is exactly zero
(the centred projections sum to zero), which is why one image is used.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .._torch_helpers import eval_mode
from .._validation import check_int_range, check_tensor
from ..training.capture import (
    layer_covariance,
    layer_output,
    model_device,
    resolve_layer,
)


def _check_ranks(ranks, width: int) -> list[int]:
    if isinstance(ranks, int):
        ranks = [ranks]
    if not isinstance(ranks, Sequence) or len(ranks) == 0:
        raise ValueError(f"ranks: expected a non-empty sequence of 1-indexed ranks, got {ranks!r}")
    return [
        check_int_range(r, "ranks[i]", 1, width, f" (1-indexed, layer width {width})")
        for r in ranks
    ]


def sensitivity_maps(
    model: nn.Module,
    layer,
    data: torch.Tensor,
    ranks: Sequence[int] | int,
    *,
    sample: int = 0,
    image_shape: Sequence[int] = (28, 28),
    batch_size: int = 1000,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Eq. (9): ``d lambda_n^D / d x_j`` for each rank n in ``ranks`` and image ``j = sample``.

    Args:
        model: the trained network (run in eval mode; its flags are restored afterwards).
        layer: the hidden layer whose data-set covariance is used (a name from
            ``model.hidden_layers()``, a submodule, or ``None`` for the last hidden layer).
        data: the data set ``[M, ...]`` of inputs (e.g. MNIST ``[M, 1, 28, 28]``), M >= 2.
        ranks: 1-indexed eigenvalue ranks n (1 = largest).
        sample: index j of the image whose pixels the eigenvalues are differentiated by.
        image_shape: shape of each returned map; its size must equal one input's size.
        batch_size: rows per forward pass (the batch containing ``sample`` is re-run with a
            graph, so peak memory is one batch's activations).
        device: where the model runs (default: its parameters' device).

    Returns a float64 tensor ``[len(ranks), *image_shape]`` on the CPU.

    Example::

        >>> import torch
        >>> from powerlaw_fast.paper.models import MLP
        >>> from powerlaw_fast.paper.sensitivity import sensitivity_maps
        >>> maps = sensitivity_maps(MLP(widths=(20, 10)), None, torch.rand(200, 1, 28, 28), [1, 2])
        >>> maps.shape, maps.dtype
        (torch.Size([2, 28, 28]), torch.float64)
    """
    check_tensor(data, "data")
    if data.dim() < 2 or data.shape[0] < 2:
        raise ValueError(f"data: expected inputs [M, ...] with M >= 2, got {tuple(data.shape)}")
    total = data.shape[0]
    sample = check_int_range(sample, "sample", 0, total - 1, f" (index into data, M = {total})")
    batch_size = check_int_range(batch_size, "batch_size", 1, 1 << 30)
    image_shape = tuple(int(s) for s in image_shape)
    per_sample = math.prod(data.shape[1:])
    if math.prod(image_shape) != per_sample:
        raise ValueError(
            f"image_shape: expected {per_sample} elements (one input of shape "
            f"{tuple(data.shape[1:])}), got {image_shape}"
        )
    _, module = resolve_layer(model, layer)
    run_device = torch.device(device) if device is not None else model_device(model)

    acc = layer_covariance(model, module, data, batch_size=batch_size, device=run_device)
    ranks = _check_ranks(ranks, acc.num_features)
    _, vectors = acc.eigh()
    basis = vectors[:, [r - 1 for r in ranks]]  # [N, R] float64, fixed
    mean = acc.mean  # float64; projections around the exact data-set mean stay small

    with eval_mode(model):
        # Data-set sums of the projections p_k = V^T (h_k - mu) and of their squares.
        sum_p = torch.zeros(len(ranks), dtype=torch.float64, device=run_device)
        sum_p2 = torch.zeros_like(sum_p)
        with torch.no_grad():
            for inputs in data.split(batch_size):
                h = layer_output(model, module, inputs.to(run_device)).to(torch.float64)
                p = (h - mean) @ basis
                sum_p += p.sum(0)
                sum_p2 += (p * p).sum(0)

        start = (sample // batch_size) * batch_size
        batch = data[start : start + batch_size].to(run_device).detach().requires_grad_(True)
        with torch.enable_grad():
            h = layer_output(model, module, batch).to(torch.float64)
            p = (h - mean) @ basis
            # Values equal the data-set sums; gradients flow only through this batch.
            s1 = sum_p + (p - p.detach()).sum(0)
            s2 = sum_p2 + (p * p - (p * p).detach()).sum(0)
            lam = (s2 - s1 * s1 / total) / (total - 1)
            maps = []
            for r in range(len(ranks)):
                (grad,) = torch.autograd.grad(lam[r], batch, retain_graph=r + 1 < len(ranks))
                maps.append(grad[sample - start].to(torch.float64))
    return torch.stack(maps).reshape(len(ranks), *image_shape).cpu()
