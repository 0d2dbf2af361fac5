"""Triton kernels of :mod:`powerlaw_fast.ops.grouped_penalty`: every layer's penalty in a fixed
number of launches.

Imported on the first launch, not with the package: importing triton is not free, and
the CPU path never needs it.
"""

from __future__ import annotations

import triton
import triton.language as tl

from powerlaw_fast.ops._gemm_kernels import gemm_configs, grouped_tile
from powerlaw_fast.ops._spectral_kernels import (
    backprojection_tile,
    finish_moments,
    projection_tile,
    sorted_penalty,
)


@triton.jit
def _find_layer(pid, widths_ptr, L, num_m, BLOCK_N: tl.constexpr):
    """(layer, its first program id) for program ``pid``; layer l owns
    ``num_m * cdiv(N_l, BLOCK_N)`` consecutive programs."""
    layer = tl.full((), 0, tl.int32)
    end = tl.full((), 0, tl.int32)
    for i in range(0, L):
        end += num_m * tl.cdiv(tl.load(widths_ptr + i), BLOCK_N)
        layer += (pid >= end).to(tl.int32)
    start = tl.full((), 0, tl.int32)
    for i in range(0, L):
        tiles = num_m * tl.cdiv(tl.load(widths_ptr + i), BLOCK_N)
        start += tl.where(i < layer, tiles, 0)
    return layer, start


@triton.jit
def _grouped_column_mean_kernel(
    x_ptr, mean_ptr, widths_ptr, col_off_ptr, B, L,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    layer, start = _find_layer(tl.program_id(0), widths_ptr, L, 1, BLOCK_N)
    N = tl.load(widths_ptr + layer)
    col0 = tl.load(col_off_ptr + layer)
    x_layer = x_ptr + col0 * B
    cols = (tl.program_id(0) - start) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    col_ok = cols < N
    acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B).to(tl.int64)
        mask = (rows[:, None] < B) & col_ok[None, :]
        acc += tl.load(x_layer + rows[:, None] * N + cols[None, :], mask=mask, other=0.0).to(
            tl.float32
        )
    tl.store(mean_ptr + col0 + cols, tl.sum(acc, axis=0) / B, mask=col_ok)


@triton.autotune(
    configs=gemm_configs(), key=["TOTAL", "L", "B_BUCKET", "IN_PRECISION", "OPERAND_FP32"]
)


@triton.jit
def _grouped_projection_kernel(
    x_ptr, mean_ptr, v_ptr, z_ptr, moments_ptr, widths_ptr, col_off_ptr, v_off_ptr,
    B, L, TOTAL, B_BUCKET,
    OPERAND_FP32: tl.constexpr, IN_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    """Per layer: Z = (x - mean) V and the row-block column sums of Z and Z * Z
    (``moments [2, num_m, TOTAL]``, layer l's columns at its column offset)."""
    num_m = tl.cdiv(B, BLOCK_M)
    layer, start = _find_layer(tl.program_id(0), widths_ptr, L, num_m, BLOCK_N)
    N = tl.load(widths_ptr + layer)
    col0 = tl.load(col_off_ptr + layer)
    x_layer = x_ptr + col0 * B
    z_layer = z_ptr + col0 * B
    v_layer = v_ptr + tl.load(v_off_ptr + layer)
    pid_m, pid_n = grouped_tile(tl.program_id(0) - start, num_m, tl.cdiv(N, BLOCK_N), GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    row_ok = rows < B
    col_ok = cols < N
    acc = projection_tile(
        x_layer, mean_ptr + col0, v_layer, rows, cols, B, N, N, 1, N, 1,
        OPERAND_FP32, IN_PRECISION, DOT_IN_FP32, BLOCK_M, BLOCK_N, BLOCK_K,
    )  # fmt: skip
    tl.store(
        z_layer + rows[:, None] * N + cols[None, :],
        acc.to(z_ptr.dtype.element_ty),
        mask=row_ok[:, None] & col_ok[None, :],
    )
    tl.store(moments_ptr + pid_m * TOTAL + col0 + cols, tl.sum(acc, axis=0), mask=col_ok)
    tl.store(
        moments_ptr + (num_m + pid_m) * TOTAL + col0 + cols,
        tl.sum(acc * acc, axis=0),
        mask=col_ok,
    )


@triton.jit(do_not_specialize=["num_m"])
def _grouped_penalty_kernel(
    moments_ptr, parts_ptr, heads_ptr, widths_ptr, col_off_ptr, anchors_ptr, alphas_ptr,
    betas_ptr, tinies_ptr, kinks_ptr, num_m, TOTAL, count, mean_tol,
    SKIP_NONPOSITIVE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Program l: layer l's spectrum, sort, eq. (2) with its own settings; dR/dlam, lam and
    Z's column means into ``parts [3, TOTAL]``, [R, status] into ``heads [L, 4]``."""
    layer = tl.program_id(0)
    N = tl.load(widths_ptr + layer)
    col0 = tl.load(col_off_ptr + layer)
    cols = tl.arange(0, BLOCK)
    ok = cols < N
    lam, zbar = finish_moments(moments_ptr + col0, TOTAL, num_m, cols, ok, count, mean_tol,
                               BLOCK)  # fmt: skip
    penalty, grad, order, nonfinite, anchor_code, overflow = sorted_penalty(
        lam, cols, ok, N, tl.load(anchors_ptr + layer), tl.load(alphas_ptr + layer),
        tl.load(betas_ptr + layer), tl.load(tinies_ptr + layer), tl.load(kinks_ptr + layer),
        SKIP_NONPOSITIVE,
    )  # fmt: skip
    tl.store(parts_ptr + col0 + order, grad, mask=ok)
    tl.store(parts_ptr + TOTAL + col0 + cols, lam, mask=ok)
    tl.store(parts_ptr + 2 * TOTAL + col0 + cols, zbar, mask=ok)
    head = heads_ptr + layer * 4
    tl.store(head, penalty)
    tl.store(head + 1, nonfinite)
    tl.store(head + 2, anchor_code)
    tl.store(head + 3, overflow)


@triton.autotune(
    configs=gemm_configs(), key=["TOTAL", "L", "B_BUCKET", "IN_PRECISION", "OPERAND_FP32"]
)


@triton.jit
def _grouped_backprojection_kernel(
    z_ptr, parts_ptr, grad_out_ptr, v_ptr, out_ptr, widths_ptr, col_off_ptr, v_off_ptr,
    B, L, TOTAL, B_BUCKET, scale,
    OPERAND_FP32: tl.constexpr, IN_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    """Per layer: grad_x = scale * grad_out * ((Z - zbar) * dR/dlam) V^T."""
    num_m = tl.cdiv(B, BLOCK_M)
    layer, start = _find_layer(tl.program_id(0), widths_ptr, L, num_m, BLOCK_N)
    N = tl.load(widths_ptr + layer)
    col0 = tl.load(col_off_ptr + layer)
    z_layer = z_ptr + col0 * B
    out_layer = out_ptr + col0 * B
    v_layer = v_ptr + tl.load(v_off_ptr + layer)
    pid_m, pid_k = grouped_tile(tl.program_id(0) - start, num_m, tl.cdiv(N, BLOCK_N), GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    outs = pid_k * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    row_ok = rows < B
    out_ok = outs < N
    scale = scale * tl.load(grad_out_ptr).to(tl.float32)
    acc = backprojection_tile(
        z_layer, parts_ptr + 2 * TOTAL + col0, parts_ptr + col0, v_layer, rows, outs, B, N,
        scale, N, 1, N, 1, OPERAND_FP32, IN_PRECISION, DOT_IN_FP32, BLOCK_M, BLOCK_N, BLOCK_K,
    )  # fmt: skip
    tl.store(
        out_layer + rows[:, None] * N + outs[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & out_ok[None, :],
    )
