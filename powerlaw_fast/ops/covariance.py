"""Unbiased batch covariance ``Sigma = (x - mu)^T (x - mu) / (B - 1)`` with fused centring.

Used by the eigenbasis refresh, the whitening layer and the covariance-first baseline. The
Triton kernel is one GEMM over the batch dimension whose prologue subtracts the column means
from both operands as they are loaded, so the centred batch is never written out. Centring
before the products (rather than ``x^T x / (B-1) - B mu mu^T / (B-1)``) keeps float32 accurate
for activations with a large mean.

Differentiable in ``x``: ``dL/dx = (x - mu) (G + G^T) / (B - 1)`` with ``G = dL/dSigma`` (the
mean's contribution vanishes because the centred columns sum to zero).

Example::

    >>> import torch
    >>> from powerlaw_fast import batch_covariance
    >>> x = torch.randn(100, 6, dtype=torch.float64)
    >>> torch.allclose(batch_covariance(x), torch.cov(x.T))
    True
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from powerlaw_fast._backend import resolve_backend
from powerlaw_fast._torch_helpers import accumulation_dtype
from powerlaw_fast._validation import as_batch_matrix
from powerlaw_fast.ops import _alloc, status
from powerlaw_fast.ops._autograd import FusedOp
from powerlaw_fast.ops._distributed import global_mean, group_name_of, resolve_group
from powerlaw_fast.ops._triton_gemm import cdiv, dot_in_fp32, dot_precision
from powerlaw_fast.ops.backends import implementation, register


@functools.cache
def _kernels():
    """This family's Triton kernels (:mod:`powerlaw_fast.ops._covariance_kernels`), imported on the
    first launch so that importing the package does not import triton."""
    from powerlaw_fast.ops import _covariance_kernels

    return _covariance_kernels


@register("centred_gram", "triton")
def centred_gram_triton(x: torch.Tensor, mean: torch.Tensor, scale: float) -> torch.Tensor:
    """Launcher: ``scale (x - mean)^T (x - mean)`` for ``x [B, N]`` (any strides; float32,
    float16 or bfloat16) and ``mean [N]`` float32 -> float32 ``[N, N]``."""
    B, N = x.shape
    out = _alloc.empty((N, N), device=x.device, dtype=torch.float32)

    def grid(meta):
        return (cdiv(N, meta["BLOCK_M"]), cdiv(N, meta["BLOCK_N"]))

    _kernels()._centred_gram_kernel[grid](
        x,
        mean,
        out,
        B,
        N,
        scale,
        x.stride(0),
        x.stride(1),
        out.stride(0),
        out.stride(1),
        IN_PRECISION=dot_precision(x.dtype),
        DOT_IN_FP32=dot_in_fp32(x.dtype),
    )
    return out


@register("centred_gram", "cuda")
def centred_gram_cuda(x: torch.Tensor, mean: torch.Tensor, scale: float) -> torch.Tensor:
    """CUDA C++ row: the centring kernel, then one cuBLAS GEMM (powerlaw_fast.cuda)."""
    from powerlaw_fast.cuda import ops

    return ops.centred_gram_cuda(x, mean, scale)


@register("centred_gram", "torch")
def centred_gram_torch(x: torch.Tensor, mean: torch.Tensor, scale: float) -> torch.Tensor:
    """Reference: centre in the accumulation dtype, round to x's dtype, one GEMM."""
    acc = accumulation_dtype(x.dtype)
    centred = (x.to(acc) - mean).to(x.dtype).to(acc)
    return centred.T @ centred * scale


class CovarianceSettings(NamedTuple):
    backend: str  # a resolved name
    group_name: str  # "" for one process


def _forward(inputs, settings: CovarianceSettings):
    """-> [sigma [N, N], the (global) column means [N], the (global) row count]."""
    x = inputs[0]
    B = x.shape[0]
    mean = implementation("column_mean", settings.backend)(x)
    centred_gram = implementation("centred_gram", settings.backend)
    group = resolve_group(settings.group_name)
    if group is None:
        return [centred_gram(x, mean, 1.0 / (B - 1)), mean, B]
    mean, count = global_mean(mean, B, group)
    sigma = centred_gram(x, mean, 1.0)
    torch.distributed.all_reduce(sigma, group=group)
    return [sigma / (count - 1).to(sigma.dtype), mean, count]


def _fake(inputs, settings: CovarianceSettings):
    x = inputs[0]
    N = x.shape[1]
    acc = accumulation_dtype(x.dtype)
    return [x.new_empty((N, N), dtype=acc), x.new_empty((N,), dtype=acc),
            x.new_empty((), dtype=torch.float64)]  # fmt: skip


def _backward(grads, saved, inputs, settings: CovarianceSettings):
    # The global mean's own contribution vanishes (the global centred columns sum to zero),
    # so each rank's gradient needs only its rows: no communication.
    (grad_sigma,) = grads
    x, mean, count = saved
    acc = grad_sigma.dtype
    centred = x.to(acc) - mean.to(acc)
    if isinstance(count, torch.Tensor):
        count = count.to(acc)
    return [(centred @ ((grad_sigma + grad_sigma.T) / (count - 1))).to(x.dtype)]


# x -> (sigma,): one autograd node eagerly, powerlaw_fast::batch_covariance(_backward) compiled
BATCH_COVARIANCE = FusedOp(
    "batch_covariance", CovarianceSettings, forward=_forward, fake=_fake,
    outputs=lambda results: (results[0],),
    save=lambda inputs, results: [inputs[0], results[1], results[2]],
    backward=_backward, label=lambda settings: "batch_covariance",
)  # fmt: skip


def batch_covariance(
    x: torch.Tensor,
    *,
    backend: str = "auto",
    validate: bool | str = "deferred",
    process_group=None,
) -> torch.Tensor:
    """Unbiased covariance of a batch, differentiable in ``x``.

    Args:
        x: ``[B, N]`` or ``[B, *]`` (flattened per sample), B >= 2; float16, bfloat16, float32
            or float64.
        backend: "auto", "torch", "triton" or "cuda".
        validate: a ValueError for non-finite entries (NaN or inf in x, or overflowing
            products): "deferred" (default, no host synchronisation on a GPU), "immediate" /
            True or "off" / False, as in :func:`powerlaw_fast.spec_penalty`.
        process_group: a ``torch.distributed`` group over which the batch is sharded: the
            covariance of the global batch on every rank (all-reduces of N + 1 and N * N
            floats); the backward pass needs no communication.

    Returns:
        ``[N, N]`` float32 (float64 for float64 input).

    Example::

        >>> x = torch.randn(50, 4)
        >>> torch.allclose(batch_covariance(x), torch.cov(x.T), atol=1e-5)
        True
    """
    status.poll()
    group_name = group_name_of(process_group)
    x = as_batch_matrix(x, "x", min_batch=1 if group_name else 2)
    mode = status.validation_mode(validate)
    name = resolve_backend(backend, x.device, dtype=x.dtype)
    (sigma,) = BATCH_COVARIANCE([x], CovarianceSettings(backend=name, group_name=group_name))
    if mode != "off":
        bad = (~torch.isfinite(sigma)).sum().reshape(1).float()
        status.check(bad, mode, _raise_nonfinite, op="batch_covariance",
                     collective=bool(group_name))  # fmt: skip
    return sigma


def _raise_nonfinite(values):
    if values[0]:
        raise ValueError(
            f"x: expected finite activations, got a covariance with {int(values[0])} non-finite "
            f"entries (x contains NaN or inf, or its products overflow)"
        )
