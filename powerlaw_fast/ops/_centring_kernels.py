"""Triton kernels of :mod:`powerlaw_fast.ops.centring` (column means, the centring pass, column
moments).

Imported on the first launch, not with the package: importing triton is not free, and
the CPU path never needs it.
"""

from __future__ import annotations

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


@triton.jit
def _centre_columns_kernel(
    x_ptr,
    mean_ptr,
    out_ptr,
    B,
    N,
    stride_b,
    stride_n,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    mask = (rows[:, None] < B) & (cols < N)[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_b + cols[None, :] * stride_n, mask=mask)
    mu = tl.load(mean_ptr + cols, mask=cols < N, other=0.0)
    centred = x.to(tl.float32) - mu[None, :]
    tl.store(
        out_ptr + rows[:, None] * N + cols[None, :],
        centred.to(out_ptr.dtype.element_ty),
        mask=mask,
    )


@triton.jit
def _column_moments_kernel(
    z_ptr,
    out_ptr,
    B,
    N,
    splits,
    stride_b,
    stride_n,
    ROWS: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    split = tl.program_id(1)
    col_ok = cols < N
    s1 = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    s2 = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    for start in range(0, ROWS, BLOCK_B):
        rows = split * ROWS + start + tl.arange(0, BLOCK_B).to(tl.int64)
        mask = (rows[:, None] < B) & col_ok[None, :]
        z = tl.load(
            z_ptr + rows[:, None] * stride_b + cols[None, :] * stride_n, mask=mask, other=0.0
        ).to(tl.float32)
        s1 += z
        s2 += z * z
    tl.store(out_ptr + split * N + cols, tl.sum(s1, axis=0), mask=col_ok)
    tl.store(out_ptr + (splits + split) * N + cols, tl.sum(s2, axis=0), mask=col_ok)
