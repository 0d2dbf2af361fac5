"""Triton kernel of :mod:`powerlaw_fast.ops.covariance`: the centred Gram matrix, centring in the
GEMM's prologue.

Imported on the first launch, not with the package: importing triton is not free, and
the CPU path never needs it.
"""

from __future__ import annotations

import triton
import triton.language as tl

from powerlaw_fast._backend import triton_interpreter_active
from powerlaw_fast.ops._gemm_kernels import accumulate_dot


def _covariance_configs():
    if triton_interpreter_active():
        return [triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128})]
    return [
        triton.Config(
            {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3
        ),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=4),
        triton.Config(
            {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3
        ),
    ]


@triton.autotune(configs=_covariance_configs(), key=["B", "N", "IN_PRECISION"])
@triton.jit
def _centred_gram_kernel(
    x_ptr,
    mean_ptr,
    out_ptr,
    B,
    N,
    scale,
    stride_xb,
    stride_xn,
    stride_oi,
    stride_oj,
    IN_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out[i, j] = scale * sum_b (x[b, i] - mean[i]) (x[b, j] - mean[j])."""
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    # int64 indices: index * stride passes 2^31 once B * N or N * N does.
    ii = pid_i * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    jj = pid_j * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    i_ok = ii < N
    j_ok = jj < N
    mu_i = tl.load(mean_ptr + ii, mask=i_ok, other=0.0)
    mu_j = tl.load(mean_ptr + jj, mask=j_ok, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for b0 in range(0, B, BLOCK_K):
        bs = b0 + tl.arange(0, BLOCK_K).to(tl.int64)
        b_ok = bs < B
        a_mask = i_ok[:, None] & b_ok[None, :]
        a = tl.load(
            x_ptr + bs[None, :] * stride_xb + ii[:, None] * stride_xn, mask=a_mask, other=0.0
        )
        in_dtype = a.dtype
        a = tl.where(a_mask, a.to(tl.float32) - mu_i[:, None], 0.0)
        c_mask = b_ok[:, None] & j_ok[None, :]
        c = tl.load(
            x_ptr + bs[:, None] * stride_xb + jj[None, :] * stride_xn, mask=c_mask, other=0.0
        ).to(tl.float32)
        c = tl.where(c_mask, c - mu_j[None, :], 0.0)
        acc = accumulate_dot(a.to(in_dtype), c.to(in_dtype), acc, IN_PRECISION, DOT_IN_FP32)
    tl.store(
        out_ptr + ii[:, None] * stride_oi + jj[None, :] * stride_oj,
        acc * scale,
        mask=i_ok[:, None] & j_ok[None, :],
    )
