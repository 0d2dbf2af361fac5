"""Column statistics of a batch ``x [B, N]``: means, the centring pass, column moments.

- ``column_mean``: the centring statistic of every op in this package. The Triton kernel reads
  ``x`` once through its strides (no contiguous copy) and accumulates in float32 over a
  ``[BLOCK_B, BLOCK_N]`` tile of partial sums before a final tree reduction, so each partial
  sum holds only ``B / BLOCK_B`` terms: a mean of 5 with a spread of 0.1 keeps its small
  deviations. The column block narrows for wide layers so that there are enough programs to
  fill the GPU (N / 32 programs at N = 8192 instead of N / 128). Deterministic.
- ``centre_columns``: ``(x - mean)`` computed in float32 and rounded once to the GEMM operand
  dtype, written contiguous: the input of a cuBLAS GEMM on the wide-layer route.
- ``column_moments``: column sums of ``z`` and of ``z * z`` over row splits,
  ``[2, splits, N]`` float32, summed by the consumer in a fixed order (deterministic).

Each launcher has its plain-torch twin beside it.

Example::

    >>> import torch
    >>> from powerlaw_fast.ops.backends import implementation
    >>> x = torch.randn(37, 5)
    >>> torch.allclose(implementation("column_mean", "torch")(x), x.mean(0))
    True
"""

from __future__ import annotations

import functools

import torch

from powerlaw_fast._torch_helpers import accumulation_dtype
from powerlaw_fast.ops import _alloc
from powerlaw_fast.ops._triton_gemm import cdiv, next_power_of_2
from powerlaw_fast.ops.backends import register

_MOMENT_ROWS = 512  # rows per program of column_moments


@functools.cache
def _kernels():
    """This family's Triton kernels (:mod:`powerlaw_fast.ops._centring_kernels`), imported on the
    first launch so that importing the package does not import triton."""
    from powerlaw_fast.ops import _centring_kernels

    return _centring_kernels


@register("column_mean", "torch")
def column_mean_torch(x: torch.Tensor) -> torch.Tensor:
    """Reference: ``x.mean(0)`` accumulated in float32 (float64 for float64 input), ``[N]``."""
    return x.mean(0, dtype=accumulation_dtype(x.dtype))


def _column_block(N: int) -> int:
    # about 256 programs for wide layers, 16..128 columns each
    return max(16, min(128, next_power_of_2(max(1, N // 256))))


@register("column_mean", "cuda")
def column_mean_cuda(x: torch.Tensor) -> torch.Tensor:
    """CUDA C++ row: csrc/column_reduce.cu (powerlaw_fast.cuda, imported on first use)."""
    from powerlaw_fast.cuda import ops

    return ops.column_mean_cuda(x)


@register("column_mean", "triton")
def column_mean_triton(x: torch.Tensor) -> torch.Tensor:
    """Launcher: float32 column means ``[N]`` of ``x [B, N]`` (any strides, 16/32-bit floats)."""
    B, N = x.shape
    out = _alloc.empty((N,), device=x.device, dtype=torch.float32)
    block_n = _column_block(N)
    grid = (cdiv(N, block_n),)
    _kernels()._column_mean_kernel[grid](
        x, out, B, N, x.stride(0), x.stride(1), BLOCK_B=32, BLOCK_N=block_n
    )
    return out


def centre_columns_torch(x: torch.Tensor, mean: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Reference: ``(x - mean)`` in the accumulation dtype, rounded once to ``dtype``."""
    return (x.to(accumulation_dtype(x.dtype)) - mean).to(dtype).contiguous()


def centre_columns_triton(x: torch.Tensor, mean: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Launcher: contiguous ``[B, N]`` of ``dtype`` holding ``x - mean`` (float32 arithmetic)."""
    B, N = x.shape
    out = _alloc.empty((B, N), device=x.device, dtype=dtype)
    block_n = min(128, next_power_of_2(N))
    grid = (cdiv(B, 32), cdiv(N, block_n))
    _kernels()._centre_columns_kernel[grid](
        x, mean, out, B, N, x.stride(0), x.stride(1), BLOCK_B=32, BLOCK_N=block_n
    )
    return out


def column_moments_torch(z: torch.Tensor) -> torch.Tensor:
    """Reference: ``[2, 1, N]`` float32 (float64): column sums of z and of z * z."""
    acc = z.to(accumulation_dtype(z.dtype))
    return torch.stack([acc.sum(0), (acc * acc).sum(0)]).unsqueeze(1)


def column_moments_triton(z: torch.Tensor) -> torch.Tensor:
    """Launcher: ``[2, splits, N]`` float32 partial column sums of z and of z * z."""
    B, N = z.shape
    splits = cdiv(B, _MOMENT_ROWS)
    out = _alloc.empty((2, splits, N), device=z.device, dtype=torch.float32)
    block_n = min(64, next_power_of_2(N))
    grid = (cdiv(N, block_n), splits)
    _kernels()._column_moments_kernel[grid](
        z, out, B, N, splits, z.stride(0), z.stride(1),
        ROWS=_MOMENT_ROWS, BLOCK_B=32, BLOCK_N=block_n,
    )  # fmt: skip
    return out
