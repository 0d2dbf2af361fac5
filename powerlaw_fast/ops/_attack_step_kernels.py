"""Triton kernel of :mod:`powerlaw_fast.ops.attack_step`: one fused PGD/FGSM step.

Imported on the first launch, not with the package: importing triton is not free, and
the CPU path never needs it.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _pgd_update_kernel(
    xa_ptr, xn_ptr, g_ptr, eps_ptr, out_ptr,
    R, D, rows_xa, rows_xn, rows_g,
    s_xa_r, s_xa_d, s_xn_r, s_xn_d, s_g_r, s_g_d, s_eps, s_out_r, s_out_d,
    step_size, lo, hi,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < R
    mask = row_ok[:, None] & (cols < D)[None, :]
    # int64 offsets: R * stride can pass 2**31 for a full epsilon grid
    rows = rows.to(tl.int64)
    cols = cols.to(tl.int64)[None, :]

    x = tl.load(xa_ptr + ((rows % rows_xa) * s_xa_r)[:, None] + cols * s_xa_d, mask=mask)
    xn = tl.load(xn_ptr + ((rows % rows_xn) * s_xn_r)[:, None] + cols * s_xn_d, mask=mask)
    g = tl.load(g_ptr + ((rows % rows_g) * s_g_r)[:, None] + cols * s_g_d, mask=mask)
    eps = tl.load(eps_ptr + rows * s_eps, mask=row_ok, other=0.0).to(tl.float32)
    x = x.to(tl.float32)
    xn = xn.to(tl.float32)
    g = g.to(tl.float32)

    sign = tl.where(g > 0.0, 1.0, tl.where(g < 0.0, -1.0, 0.0))
    x = x + step_size * sign
    ball_lo = xn - eps[:, None]
    ball_hi = xn + eps[:, None]
    # where-based clamps keep a NaN in x as torch.clamp does (fminf/fmaxf would drop it)
    x = tl.where(x < ball_lo, ball_lo, x)
    x = tl.where(x > ball_hi, ball_hi, x)
    x = tl.where(x < lo, lo, x)
    x = tl.where(x > hi, hi, x)
    tl.store(
        out_ptr + (rows * s_out_r)[:, None] + cols * s_out_d,
        x.to(out_ptr.dtype.element_ty),
        mask=mask,
    )
