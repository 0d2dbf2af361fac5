"""Triton kernels of :mod:`powerlaw_fast.ops.spectral_penalty`: the centred projection, the
spectrum and eq. (2) in one program, the scaled backprojection (the math is in that module's
docstring).

Imported on the first launch, not with the package: importing triton is not free, and
the CPU path never needs it.
"""

from __future__ import annotations

import triton
import triton.language as tl

from powerlaw_fast.ops._gemm_kernels import accumulate_dot, gemm_configs, grouped_tile
from powerlaw_fast.ops._layout import SCRATCH_HEAD, UNDERFLOW_FLOAT32

HEAD = tl.constexpr(SCRATCH_HEAD)  # kernels may only read constexpr globals
UNDERFLOW = tl.constexpr(UNDERFLOW_FLOAT32)


@triton.jit
def projection_tile(
    x_ptr, mean_ptr, v_ptr, rows, cols, B, N,
    stride_xb, stride_xk, stride_vk, stride_vn,
    OPERAND_FP32: tl.constexpr, IN_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """The ``[BLOCK_M, BLOCK_N]`` tile ``(x - mean)[rows] V[:, cols]``, float32."""
    row_ok = rows < B
    col_ok = cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, N, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        k_ok = ks < N
        a_mask = row_ok[:, None] & k_ok[None, :]
        a = tl.load(
            x_ptr + rows[:, None] * stride_xb + ks[None, :] * stride_xk, mask=a_mask, other=0.0
        ).to(tl.float32)
        mu = tl.load(mean_ptr + ks, mask=k_ok, other=0.0)
        # Padding rows must stay exactly zero, or they would add mu^2 terms to the sums.
        a = tl.where(a_mask, a - mu[None, :], 0.0)
        b = tl.load(
            v_ptr + ks[:, None] * stride_vk + cols[None, :] * stride_vn,
            mask=k_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        if OPERAND_FP32:
            b = b.to(tl.float32)
        acc = accumulate_dot(a.to(b.dtype), b, acc, IN_PRECISION, DOT_IN_FP32)
    return acc


@triton.jit
def backprojection_tile(
    z_ptr, zbar_ptr, coef_ptr, v_ptr, rows, outs, B, N, scale,
    stride_zb, stride_zn, stride_vk, stride_vn,
    OPERAND_FP32: tl.constexpr, IN_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """The tile ``scale ((Z - zbar) * coef)[rows] V^T[:, outs]``, float32; the reduction
    runs over V's columns."""
    row_ok = rows < B
    out_ok = outs < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_K):
        ns = n0 + tl.arange(0, BLOCK_K).to(tl.int64)
        n_ok = ns < N
        z = tl.load(
            z_ptr + rows[:, None] * stride_zb + ns[None, :] * stride_zn,
            mask=row_ok[:, None] & n_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        c = tl.load(coef_ptr + ns, mask=n_ok, other=0.0)
        zb = tl.load(zbar_ptr + ns, mask=n_ok, other=0.0)
        # V^T tile [n, k] read straight from V's strides: no transposed copy.
        vt = tl.load(
            v_ptr + outs[None, :] * stride_vk + ns[:, None] * stride_vn,
            mask=n_ok[:, None] & out_ok[None, :],
            other=0.0,
        )
        if OPERAND_FP32:
            vt = vt.to(tl.float32)
        a = ((z - zb[None, :]) * (c * scale)[None, :]).to(vt.dtype)
        acc = accumulate_dot(a, vt, acc, IN_PRECISION, DOT_IN_FP32)
    return acc


@triton.autotune(configs=gemm_configs(), key=["N", "B_BUCKET", "IN_PRECISION", "OPERAND_FP32"])
@triton.jit
def _centred_projection_kernel(
    x_ptr, mean_ptr, v_ptr, z_ptr, moments_ptr,
    B, N, B_BUCKET,
    stride_xb, stride_xk, stride_vk, stride_vn, stride_zb, stride_zn,
    OPERAND_FP32: tl.constexpr, IN_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    """Z = (x - mean) V; moments[0 | 1, pid_m, :] = column sums of Z | Z * Z over the
    row-block. B_BUCKET is only an autotune key."""
    num_m = tl.cdiv(B, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = grouped_tile(tl.program_id(0), num_m, num_n, GROUP_M)
    # int64 indices: index * stride passes 2^31 once B * N or N * N does.
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    row_ok = rows < B
    col_ok = cols < N
    acc = projection_tile(
        x_ptr, mean_ptr, v_ptr, rows, cols, B, N, stride_xb, stride_xk, stride_vk, stride_vn,
        OPERAND_FP32, IN_PRECISION, DOT_IN_FP32, BLOCK_M, BLOCK_N, BLOCK_K,
    )  # fmt: skip
    tl.store(
        z_ptr + rows[:, None] * stride_zb + cols[None, :] * stride_zn,
        acc.to(z_ptr.dtype.element_ty),
        mask=row_ok[:, None] & col_ok[None, :],
    )
    tl.store(moments_ptr + pid_m * N + cols, tl.sum(acc, axis=0), mask=col_ok)
    tl.store(moments_ptr + (num_m + pid_m) * N + cols, tl.sum(acc * acc, axis=0), mask=col_ok)


@triton.autotune(configs=gemm_configs(), key=["N", "B_BUCKET", "IN_PRECISION", "OPERAND_FP32"])
@triton.jit
def _scaled_backprojection_kernel(
    z_ptr, zbar_ptr, coef_ptr, grad_out_ptr, v_ptr, out_ptr,
    B, N, B_BUCKET, scale,
    stride_zb, stride_zn, stride_vk, stride_vn, stride_ob, stride_ok,
    HAS_GRAD_OUT: tl.constexpr, OPERAND_FP32: tl.constexpr, IN_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """out = scale * grad_out * ((Z - zbar) * coef[None, :]) V^T over V's columns; zbar, the
    column means of Z (the centring's rounding error), makes the centring exact."""
    num_m = tl.cdiv(B, BLOCK_M)
    num_k = tl.cdiv(N, BLOCK_N)
    pid_m, pid_k = grouped_tile(tl.program_id(0), num_m, num_k, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    outs = pid_k * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    row_ok = rows < B
    out_ok = outs < N
    if HAS_GRAD_OUT:
        scale = scale * tl.load(grad_out_ptr).to(tl.float32)
    acc = backprojection_tile(
        z_ptr, zbar_ptr, coef_ptr, v_ptr, rows, outs, B, N, scale,
        stride_zb, stride_zn, stride_vk, stride_vn,
        OPERAND_FP32, IN_PRECISION, DOT_IN_FP32, BLOCK_M, BLOCK_N, BLOCK_K,
    )  # fmt: skip
    tl.store(
        out_ptr + rows[:, None] * stride_ob + outs[None, :] * stride_ok,
        acc.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & out_ok[None, :],
    )


@triton.jit
def finish_moments(
    moments_ptr, row_stride, num_m, cols, ok, count, mean_tol, BLOCK: tl.constexpr
):
    """Row-block moments (S1 rows, then S2 rows, ``row_stride`` apart) -> (lam, Z's column
    means): ``lam = (S2 - S1^2 / B) / (B - 1)`` with rounding-level values set to 0."""
    s1 = tl.zeros((BLOCK,), dtype=tl.float32)
    s2 = tl.zeros((BLOCK,), dtype=tl.float32)
    for m in range(0, num_m):
        s1 += tl.load(moments_ptr + m * row_stride + cols, mask=ok, other=0.0)
        s2 += tl.load(moments_ptr + (num_m + m) * row_stride + cols, mask=ok, other=0.0)
    raw = s2 - s1 * s1 / count
    noise = (raw <= mean_tol * s2) & (s2 != float("inf"))
    return tl.where(noise, 0.0, raw) / (count - 1.0), s1 / count


@triton.jit
def sorted_penalty(
    lam, cols, ok, N, anchor, alpha, beta, tiny, kink_tol, SKIP_NONPOSITIVE: tl.constexpr
):
    """Eq. (2) over one spectrum held in a block -> (penalty, dR/dlam in sorted order, the
    column of each sorted position, [non-finite count, anchor code, overflow flag]).

    Decided on purpose, the same in every backend (see :func:`spectrum_penalty_torch`):
    the anchor's own term is left out (it is 0 in value and slope by definition, and a
    rank ratio of 1 +- an ulp must not give it a relu slope); ``|r - 1| <= kink_tol``
    (within the rounding of r) takes the relu's slope 0; ties sort by column, lower first.
    """
    lam = tl.where(lam == 0.0, 0.0, lam)  # -0.0 and 0.0 are one value (a tie, not an order)
    finite = (lam == lam) & (tl.abs(lam) != float("inf"))
    nonfinite = tl.sum(tl.where(ok & ~finite, 1.0, 0.0), axis=0)
    # Descending sort of (value, index) pairs as int64 keys: the float's bits mapped to an
    # order-preserving int32 in the high half, N - 1 - column in the low half (so equal
    # values keep the lower column first, as a stable sort does).
    bits = lam.to(tl.int32, bitcast=True)
    bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    key = (bits.to(tl.int64) << 32) | (N - 1 - cols).to(tl.int64)
    key = tl.where(ok, key, tl.full(cols.shape, -2147483648, tl.int64) << 32)
    key = tl.sort(key, descending=True)
    high = (key >> 32).to(tl.int32)
    high = high ^ ((high >> 31) & 0x7FFFFFFF)
    s = high.to(tl.float32, bitcast=True)
    order = (N - 1 - (key & 0xFFFFFFFF)).to(tl.int32)

    s_first = tl.sum(tl.where(cols == 0, s, 0.0), axis=0)
    s_anchor = tl.sum(tl.where(cols == anchor, s, 0.0), axis=0)
    s_mean = tl.sum(tl.where(ok, tl.maximum(s, 0.0), 0.0), axis=0) / N
    rank_ratio = tl.exp(alpha * (tl.log((cols + 1).to(tl.float32)) - tl.log(anchor + 1.0)))
    r = s / s_anchor * rank_ratio
    active = ok & (cols > anchor)
    if SKIP_NONPOSITIVE:
        active = active & (s > 0)
    d = r - 1.0
    total = tl.sum(tl.where(active, d * d + tl.maximum(d, 0.0), 0.0), axis=0)
    coef = beta / N
    # 1 / gam_n = rank_ratio / s_anchor
    slope = (2.0 * d + tl.where(d > kink_tol, 1.0, 0.0)) * rank_ratio / s_anchor
    grad = tl.where(active, coef * slope, 0.0)
    penalty = coef * total
    grad_ok = (grad == grad) & (tl.abs(grad) != float("inf"))
    grad_bad = tl.sum(tl.where(active & ~grad_ok, 1.0, 0.0), axis=0)
    penalty_bad = (penalty != penalty) | (tl.abs(penalty) == float("inf"))
    overflow = ((grad_bad > 0) | penalty_bad) & (nonfinite == 0)
    # 1: the anchor is zero to the rounding of the spectrum; 2: the whole spectrum is too
    # small for float32 (its largest value under 2^-103, where 1 / s_anchor overflows)
    anchor_code = tl.where(s_anchor > tiny * s_mean, 0.0, 1.0)
    anchor_code = tl.where((s_first > 0.0) & (s_first < UNDERFLOW), 2.0, anchor_code)
    return penalty, grad, order, nonfinite, anchor_code, tl.where(overflow, 1.0, 0.0)


# An int argument equal to 1 is compiled as a constexpr, which has no .to(): anchor = 1
# would not compile on a GPU; num_m = 1 is common.
@triton.jit(do_not_specialize=["anchor", "num_m"])
def _spectrum_penalty_kernel(
    src_ptr, count_ptr, out_ptr,
    num_m, N, count, mean_tol, anchor, alpha, beta, tiny, kink_tol,
    FROM_MOMENTS: tl.constexpr, COUNT_FROM_PTR: tl.constexpr,
    SKIP_NONPOSITIVE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """One program: spectrum (from row-block moments, or given), sort, eq. (2), dR/dlam
    scattered to V's column order, status. ``out`` is the scratch layout of the module."""
    cols = tl.arange(0, BLOCK)
    ok = cols < N
    if FROM_MOMENTS:
        if COUNT_FROM_PTR:
            count = tl.load(count_ptr).to(tl.float32)
        lam, zbar = finish_moments(src_ptr, N, num_m, cols, ok, count, mean_tol, BLOCK)
        tl.store(out_ptr + HEAD + 2 * N + cols, zbar, mask=ok)
    else:
        lam = tl.load(src_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + HEAD + N + cols, lam, mask=ok)
    penalty, grad, order, nonfinite, anchor_code, overflow = sorted_penalty(
        lam, cols, ok, N, anchor, alpha, beta, tiny, kink_tol, SKIP_NONPOSITIVE
    )
    tl.store(out_ptr + HEAD + order, grad, mask=ok)
    tl.store(out_ptr, penalty)
    tl.store(out_ptr + 1, nonfinite)
    tl.store(out_ptr + 2, anchor_code)
    tl.store(out_ptr + 3, overflow)
