"""Column means of a batch ``x [B, N]``: the centring statistic of every op in this package.

The Triton kernel reads ``x`` once through its strides (no contiguous copy) and accumulates
in float32 over a ``[BLOCK_B, BLOCK_N]`` tile of partial sums before a final tree reduction,
so each partial sum holds only ``B / BLOCK_B`` terms: a mean of 5 with a spread of 0.1 keeps
its small deviations. The reduction order is fixed, so the result is deterministic.

Example::

    >>> import torch
    >>> from powerlaw_fast.ops.centring import column_mean
    >>> x = torch.randn(37, 5)
    >>> torch.allclose(column_mean(x, backend="torch"), x.mean(0))
    True
"""

from __future__ import annotations

import torch

from powerlaw_fast._backend import triton_available
from powerlaw_fast.ops import _alloc

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _column_mean_kernel(
        x_ptr,
        mean_ptr,
        B,
        N,
        stride_b,
        stride_n,
        BLOCK_B: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        pid = tl.program_id(0)
        # int64 indices: index * stride passes 2^31 once B * N does.
        cols = pid * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
        col_ok = cols < N
        acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
        for start in range(0, B, BLOCK_B):
            rows = start + tl.arange(0, BLOCK_B).to(tl.int64)
            mask = (rows[:, None] < B) & col_ok[None, :]
            ptrs = x_ptr + rows[:, None] * stride_b + cols[None, :] * stride_n
            acc += tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        total = tl.sum(acc, axis=0)
        tl.store(mean_ptr + cols, total / B, mask=col_ok)


def column_mean_torch(x: torch.Tensor) -> torch.Tensor:
    """Reference: ``x.mean(0)`` accumulated in float32 (float64 for float64 input), ``[N]``."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.mean(0, dtype=acc)


def column_mean_triton(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Launcher: float32 column means of ``x [B, N]`` (any strides, float16/bfloat16/float32)."""
    B, N = x.shape
    if out is None:
        out = _alloc.empty((N,), device=x.device, dtype=torch.float32)
    block_n = min(128, triton.next_power_of_2(N))
    grid = (triton.cdiv(N, block_n),)
    _column_mean_kernel[grid](x, out, B, N, x.stride(0), x.stride(1), BLOCK_B=32, BLOCK_N=block_n)
    return out


def column_mean(x: torch.Tensor, *, backend: str = "torch") -> torch.Tensor:
    """Column means of ``x [B, N]`` as float32 (float64 for float64 input), shape ``[N]``.

    ``backend`` is an already resolved backend name: ``"torch"`` or ``"triton"``.
    """
    if backend == "triton":
        return column_mean_triton(x)
    return column_mean_torch(x)
