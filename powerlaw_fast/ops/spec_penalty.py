"""The power-law spectral penalty of Nassar et al. (2020), eq. (2), as fused GPU ops.

Math (paper conventions, n is 1-indexed; DESIGN.md section 2)::

    Z    = (x - mu) V                          [B, N]  one GEMM, centring in its prologue
    lam  = column_sum(Z * Z) / (B - 1)         [N]     = diag(V^T Sigma V), in V's column order
    s    = sort(lam, descending)
    r_n  = s_n / gam_n,  gam_n = kappa n^-alpha,  kappa = s_tau tau^alpha (no gradient)
    R    = beta / N * sum_{n = tau..N} [(r_n - 1)^2 + max(0, r_n - 1)]
    dR/dx = 2 / (B - 1) * (Z * g) V^T,  g = dR/dlam mapped back to V's column order

``r_n`` is evaluated as ``(s_n / s_tau) (n / tau)^alpha`` so the anchor's ratio is exactly 1:
its own term is 0 in value and slope, whatever the rounding of ``tau^alpha``.

Op family (each piece has a plain-torch reference beside the Triton kernel):

- ``projected_spectrum(x, V)``: kernel 1, one GEMM with the centring in its prologue and the
  column sum of squares in its epilogue. Each row-block of programs writes its partial sums to a
  ``[ceil(B / BLOCK_M), N]`` buffer that is then summed in a fixed order: deterministic, no
  atomics. Its backward is kernel 3, ``grad_x = 2 / (B - 1) (Z * g) V^T`` with the scaling by
  ``g`` fused into the GEMM's prologue.
- ``powerlaw_penalty(lam)``: kernel 2, the penalty and dR/dlam over the sorted spectrum in one
  single-program kernel (deterministic), plus a status word (non-finite values, zero anchor)
  read with one host synchronisation when ``validate=True``.
- ``spec_penalty(x, V)`` composes the two.

Keeping Z: the forward keeps ``Z`` ([B, N] in x's dtype) for the backward instead of
recomputing it. Recomputing would cost a third GEMM (1.5x the two-GEMM floor, so the target of
staying within 1.25x of two cuBLAS GEMMs could not be met); keeping it costs one [B, N] buffer,
e.g. 9.4 MB for B = 1536, N = 1024 in float32 and 1.6 GB for B = 24576, N = 16384.

Precision follows ``torch.get_float32_matmul_precision()``: "highest" gives exact float32
products, "high"/"medium" allow TF32. float16/bfloat16 inputs are centred in float32, rounded to
their dtype for the tensor-core GEMM and accumulated in float32; the spectrum is float32.
float64 runs on the torch backend.

Example::

    >>> import torch
    >>> from powerlaw_fast import spec_penalty
    >>> x = torch.randn(300, 40, requires_grad=True)
    >>> V = torch.linalg.eigh(torch.cov(x.detach().T))[1].flip(1)   # descending eigenvectors
    >>> R = spec_penalty(x, V, alpha=1.0, tau=10, beta=1.0)
    >>> R.backward()
    >>> x.grad.shape
    torch.Size([300, 40])
"""

from __future__ import annotations

import math

import torch

from powerlaw_fast._backend import (
    resolve_backend,
    tf32_allowed,
    triton_available,
    triton_interpreter_active,
)
from powerlaw_fast._validation import (
    as_batch_matrix,
    check_basis,
    check_float_dtype,
    check_int_range,
    check_real,
    check_tensor,
)
from powerlaw_fast.ops import _alloc
from powerlaw_fast.ops.centring import column_mean

CONVENTIONS = ("paper", "authors")

# Every row-block of the projection GEMM writes one row of partial column sums; the block height
# is fixed (not autotuned) so the launcher can size that buffer before the launch.
_PROJECTION_BLOCK_M = 128
_PENALTY_BLOCK = 1024


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------
if triton_available():
    import triton
    import triton.language as tl

    def _gemm_configs():
        if triton_interpreter_active():
            # The interpreter's cost is per program instance: few, large tiles.
            return [triton.Config({"BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8})]
        return [
            triton.Config({"BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=4),
            triton.Config({"BLOCK_N": 256, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=3),
        ]

    @triton.jit
    def accumulate_dot(a, b, acc, IN_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr):
        """acc + a @ b; with DOT_IN_FP32 the (already rounded) operands are widened first."""
        if DOT_IN_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        return tl.dot(a, b, acc, input_precision=IN_PRECISION)

    @triton.jit
    def _grouped_tile(pid, num_m, num_n, GROUP_M: tl.constexpr):
        # Row-blocks sharing the same columns of V run together, so V tiles stay in L2.
        width = GROUP_M * num_n
        group = pid // width
        first_m = group * GROUP_M
        size_m = min(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % width) % size_m
        pid_n = (pid % width) // size_m
        return pid_m, pid_n

    @triton.autotune(configs=_gemm_configs(), key=["B", "N", "IN_PRECISION"])
    @triton.jit
    def _centred_projection_kernel(
        x_ptr,
        mean_ptr,
        v_ptr,
        z_ptr,
        partial_ptr,
        B,
        N,
        stride_xb,
        stride_xk,
        stride_vk,
        stride_vn,
        stride_zb,
        stride_zn,
        IN_PRECISION: tl.constexpr,
        DOT_IN_FP32: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        """Z = (x - mean) V and partial[pid_m, :] = column sums of Z * Z over this row-block."""
        num_m = tl.cdiv(B, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        pid_m, pid_n = _grouped_tile(tl.program_id(0), num_m, num_n, GROUP_M)
        # int64 indices: index * stride passes 2^31 once B * N or N * N does (e.g. B = 131072,
        # N = 16384), and triton types small ints as int32.
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
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
            acc = accumulate_dot(a.to(b.dtype), b, acc, IN_PRECISION, DOT_IN_FP32)
        out_mask = row_ok[:, None] & col_ok[None, :]
        tl.store(
            z_ptr + rows[:, None] * stride_zb + cols[None, :] * stride_zn,
            acc.to(z_ptr.dtype.element_ty),
            mask=out_mask,
        )
        tl.store(partial_ptr + pid_m * N + cols, tl.sum(acc * acc, axis=0), mask=col_ok)

    @triton.autotune(configs=_gemm_configs(), key=["B", "N", "IN_PRECISION"])
    @triton.jit
    def _scaled_backprojection_kernel(
        z_ptr,
        coef_ptr,
        v_ptr,
        out_ptr,
        B,
        N,
        scale,
        stride_zb,
        stride_zn,
        stride_vk,
        stride_vn,
        stride_ob,
        stride_ok,
        IN_PRECISION: tl.constexpr,
        DOT_IN_FP32: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        """out = scale * (Z * coef[None, :]) V^T, the reduction running over V's columns."""
        num_m = tl.cdiv(B, BLOCK_M)
        num_k = tl.cdiv(N, BLOCK_N)
        pid_m, pid_k = _grouped_tile(tl.program_id(0), num_m, num_k, GROUP_M)
        # int64 indices, as in the forward kernel.
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
        outs = pid_k * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
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
            c = tl.load(coef_ptr + ns, mask=n_ok, other=0.0).to(tl.float32)
            # V^T tile [n, k] read straight from V's strides: no transposed copy.
            vt = tl.load(
                v_ptr + outs[None, :] * stride_vk + ns[:, None] * stride_vn,
                mask=n_ok[:, None] & out_ok[None, :],
                other=0.0,
            )
            a = (z * (c * scale)[None, :]).to(vt.dtype)
            acc = accumulate_dot(a, vt, acc, IN_PRECISION, DOT_IN_FP32)
        tl.store(
            out_ptr + rows[:, None] * stride_ob + outs[None, :] * stride_ok,
            acc.to(out_ptr.dtype.element_ty),
            mask=row_ok[:, None] & out_ok[None, :],
        )

    # An int argument equal to 1 is compiled as a constexpr, which has no .to(): anchor = 1
    # (tau = 2, or tau = 1 with convention="authors") would not compile on a GPU.
    @triton.jit(do_not_specialize=["anchor"])
    def _powerlaw_penalty_kernel(
        sorted_ptr,
        order_ptr,
        penalty_ptr,
        grad_ptr,
        status_ptr,
        N,
        anchor,
        alpha,
        beta,
        tiny,
        SKIP_NONPOSITIVE: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """Penalty over the descending spectrum and dR/dlam scattered back to V's order.

        status[0] = number of non-finite values, status[1] = 1 if the anchor is not positive
        (relative to the largest value: ``s_anchor <= tiny * s_1``).
        """
        s_anchor = tl.load(sorted_ptr + anchor).to(tl.float32)
        s_first = tl.load(sorted_ptr).to(tl.float32)
        log_tau = tl.log((anchor + 1).to(tl.float32))
        total = tl.zeros((BLOCK,), dtype=tl.float32)
        bad = tl.zeros((BLOCK,), dtype=tl.int32)
        coef = beta / N
        for start in range(0, N, BLOCK):
            idx = start + tl.arange(0, BLOCK)
            ok = idx < N
            s = tl.load(sorted_ptr + idx, mask=ok, other=1.0).to(tl.float32)
            bad += tl.where(ok & ((s != s) | (tl.abs(s) == float("inf"))), 1, 0)
            rank_ratio = tl.exp(alpha * (tl.log((idx + 1).to(tl.float32)) - log_tau))
            r = s / s_anchor * rank_ratio
            active = ok & (idx >= anchor)
            if SKIP_NONPOSITIVE:
                active = active & (s > 0)
            d = r - 1.0
            term = d * d + tl.maximum(d, 0.0)
            total += tl.where(active, term, 0.0)
            # 1 / gam_n = rank_ratio / s_anchor
            slope = (2.0 * d + tl.where(d > 0.0, 1.0, 0.0)) * rank_ratio / s_anchor
            grad = tl.where(active, coef * slope, 0.0)
            dest = tl.load(order_ptr + idx, mask=ok, other=0)
            tl.store(grad_ptr + dest, grad, mask=ok)
        tl.store(penalty_ptr, coef * tl.sum(total, axis=0))
        tl.store(status_ptr, tl.sum(bad, axis=0))
        anchor_bad = (s_anchor > tiny * s_first) == 0
        tl.store(status_ptr + 1, anchor_bad.to(tl.int32))


if triton_available():

    @triton.jit
    def _finish_spectrum_kernel(
        partial_ptr,
        mean_ptr,
        lam_ptr,
        num_m,
        N,
        inv_count_minus_1,
        noise_coef,
        BLOCK: tl.constexpr,
    ):
        """lam = (sum of the row-block partials) / (B - 1), in a fixed order; values at or below
        the centring noise floor ``noise_coef * ||mean||^2`` are set to 0 (see
        :func:`_drop_centring_noise`). Replaces ~12 small torch launches with one."""
        offsets = tl.arange(0, BLOCK)
        norm = tl.zeros((BLOCK,), dtype=tl.float32)
        for start in range(0, N, BLOCK):
            mu = tl.load(mean_ptr + start + offsets, mask=start + offsets < N, other=0.0)
            norm += mu * mu
        floor = noise_coef * tl.sum(norm, axis=0)
        cols = tl.program_id(0) * BLOCK + offsets
        ok = cols < N
        total = tl.zeros((BLOCK,), dtype=tl.float32)
        for m in range(0, num_m):
            total += tl.load(partial_ptr + m * N + cols, mask=ok, other=0.0)
        lam = total * inv_count_minus_1
        lam = tl.where(lam <= floor, 0.0, lam)
        tl.store(lam_ptr + cols, lam, mask=ok)


def _dot_in_fp32(dtype: torch.dtype) -> bool:
    """The interpreter's ``tl.dot`` on bfloat16 operands is wrong (triton 3.9); products of
    bfloat16 values are exact in float32, so upcasting there computes what the GPU computes."""
    return dtype == torch.bfloat16 and triton_interpreter_active()


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not tf32_allowed():
        return "ieee"
    return "tf32"


def _spectrum_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------
# Launchers (Triton) and references (plain torch); same signatures, same outputs
# --------------------------------------------------------------------------------------------
def _launch_centred_projection(
    x: torch.Tensor, V: torch.Tensor, mean: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel 1: (row-block partial column sums of Z * Z ``[ceil(B / 128), N]`` float32, Z)."""
    B, N = x.shape
    z = _alloc.empty((B, N), device=x.device, dtype=x.dtype)
    num_m = triton.cdiv(B, _PROJECTION_BLOCK_M)
    partial = _alloc.empty((num_m, N), device=x.device, dtype=torch.float32)

    def grid(meta):
        return (num_m * triton.cdiv(N, meta["BLOCK_N"]),)

    _centred_projection_kernel[grid](
        x,
        mean,
        V,
        z,
        partial,
        B,
        N,
        x.stride(0),
        x.stride(1),
        V.stride(0),
        V.stride(1),
        z.stride(0),
        z.stride(1),
        IN_PRECISION=_dot_precision(x.dtype),
        DOT_IN_FP32=_dot_in_fp32(x.dtype),
        BLOCK_M=_PROJECTION_BLOCK_M,
    )
    return partial, z


def centred_projection_triton(
    x: torch.Tensor, V: torch.Tensor, mean: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [B, N]`` (any strides), ``V [N, N]``, ``mean [N]`` float32 ->
    (column sums of Z * Z ``[N]`` float32, ``Z = (x - mean) V`` ``[B, N]`` in x's dtype)."""
    partial, z = _launch_centred_projection(x, V, mean)
    return partial.sum(0), z


def projected_spectrum_triton(
    x: torch.Tensor, V: torch.Tensor, mean: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One process: kernel 1, then one small kernel for the reduction, the 1 / (B - 1) and the
    noise floor. Returns ``(lam [N] float32, Z [B, N])``."""
    B, N = x.shape
    partial, z = _launch_centred_projection(x, V, mean)
    lam = _alloc.empty((N,), device=x.device, dtype=torch.float32)
    block = min(1024, triton.next_power_of_2(N))
    _finish_spectrum_kernel[(triton.cdiv(N, block),)](
        partial,
        mean,
        lam,
        partial.shape[0],
        N,
        1.0 / (B - 1),
        _noise_coefficient(B, lam.dtype),
        BLOCK=block,
    )
    return lam, z


def centred_projection_torch(
    x: torch.Tensor, V: torch.Tensor, mean: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for :func:`centred_projection_triton`, the same rounding steps in plain torch."""
    acc = _spectrum_dtype(x.dtype)
    centred = (x.to(acc) - mean).to(x.dtype)
    z_acc = centred.to(acc) @ V.to(acc)
    return (z_acc * z_acc).sum(0), z_acc.to(x.dtype)


def spectrum_backward_triton(
    coef: torch.Tensor, z: torch.Tensor, V: torch.Tensor, scale: float
) -> torch.Tensor:
    """``grad_x [B, N] = scale (Z * coef) V^T`` with ``coef [N]`` = dLoss/dlam and
    ``scale = 2 / (B - 1)`` for a batch of B rows."""
    B, N = z.shape
    out = _alloc.empty((B, N), device=z.device, dtype=z.dtype)
    num_m = triton.cdiv(B, _PROJECTION_BLOCK_M)

    def grid(meta):
        return (num_m * triton.cdiv(N, meta["BLOCK_N"]),)

    _scaled_backprojection_kernel[grid](
        z,
        coef,
        V,
        out,
        B,
        N,
        scale,
        z.stride(0),
        z.stride(1),
        V.stride(0),
        V.stride(1),
        out.stride(0),
        out.stride(1),
        IN_PRECISION=_dot_precision(z.dtype),
        DOT_IN_FP32=_dot_in_fp32(z.dtype),
        BLOCK_M=_PROJECTION_BLOCK_M,
    )
    return out


def spectrum_backward_torch(
    coef: torch.Tensor, z: torch.Tensor, V: torch.Tensor, scale: float
) -> torch.Tensor:
    """Reference for :func:`spectrum_backward_triton`."""
    acc = _spectrum_dtype(z.dtype)
    scaled = (z.to(acc) * (coef.to(acc) * scale)).to(z.dtype)
    return (scaled.to(acc) @ V.to(acc).T).to(z.dtype)


def powerlaw_penalty_triton(
    lam: torch.Tensor, alpha: float, anchor: int, beta: float, skip_nonpositive: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``lam [N]`` float32 -> (penalty [], dR/dlam [N], status int32 [2])."""
    (N,) = lam.shape
    ordered, order = torch.sort(lam, descending=True)
    penalty = _alloc.empty((), device=lam.device, dtype=lam.dtype)
    grad = _alloc.empty((N,), device=lam.device, dtype=lam.dtype)
    status = _alloc.empty((2,), device=lam.device, dtype=torch.int32)
    block = min(_PENALTY_BLOCK, triton.next_power_of_2(N))
    _powerlaw_penalty_kernel[(1,)](
        ordered,
        order,
        penalty,
        grad,
        status,
        N,
        anchor,
        alpha,
        beta,
        torch.finfo(lam.dtype).eps,
        SKIP_NONPOSITIVE=skip_nonpositive,
        BLOCK=block,
    )
    return penalty, grad, status


def powerlaw_penalty_torch(
    lam: torch.Tensor, alpha: float, anchor: int, beta: float, skip_nonpositive: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference for :func:`powerlaw_penalty_triton`, same outputs."""
    (N,) = lam.shape
    ordered, order = torch.sort(lam, descending=True)
    ranks = torch.arange(1, N + 1, device=lam.device, dtype=lam.dtype)
    rank_ratio = torch.exp(alpha * (torch.log(ranks) - torch.log(ranks[anchor])))
    s_anchor = ordered[anchor]
    r = ordered / s_anchor * rank_ratio
    active = ranks > anchor
    if skip_nonpositive:
        active = active & (ordered > 0)
    d = r - 1.0
    term = torch.where(active, d * d + d.clamp_min(0.0), 0.0)
    slope = (2.0 * d + (d > 0).to(lam.dtype)) * rank_ratio / s_anchor
    grad_sorted = torch.where(active, slope * (beta / N), 0.0)
    grad = torch.empty_like(lam).scatter_(0, order, grad_sorted)
    penalty = term.sum() * (beta / N)
    nonfinite = (~torch.isfinite(lam)).sum()
    anchor_bad = ~(s_anchor > torch.finfo(lam.dtype).eps * ordered[0])
    status = torch.stack([nonfinite, anchor_bad.to(nonfinite.dtype)]).to(torch.int32)
    return penalty, grad, status


def _cuda_ops():
    from powerlaw_fast import cuda

    return cuda


_CENTRED_PROJECTION = {"torch": centred_projection_torch}
_SPECTRUM_BACKWARD = {"torch": spectrum_backward_torch}
_POWERLAW_PENALTY = {"torch": powerlaw_penalty_torch}
if triton_available():
    _CENTRED_PROJECTION["triton"] = centred_projection_triton
    _SPECTRUM_BACKWARD["triton"] = spectrum_backward_triton
    _POWERLAW_PENALTY["triton"] = powerlaw_penalty_triton


def _implementation(table: dict, name: str, backend: str):
    if backend == "cuda":
        return getattr(_cuda_ops(), name)
    return table[backend]


def spectrum_forward(
    x: torch.Tensor, V: torch.Tensor, backend: str, group=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Projected spectrum of the (global) batch: ``(lam [N], Z [B, N], count [] float64)``.

    With a process group, the count and column sums are all-reduced before the GEMM (for the
    global mean) and the column sums of Z * Z after it: ``N + 1`` and ``N`` floats.
    """
    B = x.shape[0]
    if backend == "cuda":
        mean = _cuda_ops().column_mean_cuda(x)
    else:
        mean = column_mean(x, backend=backend)
    if group is None:
        count = torch.full((), float(B), dtype=torch.float64, device=x.device)
    else:
        mean, count = global_mean(mean, B, group)
    if backend == "triton" and group is None:
        lam, z = projected_spectrum_triton(x, V, mean)
        return lam, z, count
    sumsq, z = _implementation(_CENTRED_PROJECTION, "centred_projection_cuda", backend)(x, V, mean)
    if group is not None:
        torch.distributed.all_reduce(sumsq, group=group)
    lam = sumsq / (count - 1).to(sumsq.dtype)
    return _drop_centring_noise(lam, mean, count), z, count


def _drop_centring_noise(lam: torch.Tensor, mean: torch.Tensor, count: torch.Tensor):
    """Values below the rounding noise of the centring carry no information: report them as 0.

    Subtracting a mean of norm ||mu|| leaves errors of about eps * log2(B) * ||mu|| per row, so
    a direction with no variance still shows up to ``(4 eps log2 B)^2 ||mu||^2``. Without this,
    a constant (dead) layer would have a spectrum of pure noise and a meaningless penalty
    instead of the clear rank-deficiency error.
    """
    eps = torch.finfo(lam.dtype).eps
    floor = (4.0 * eps * torch.log2(count.clamp_min(2.0)).to(lam.dtype)) ** 2 * (mean * mean).sum()
    return torch.where(lam <= floor, torch.zeros_like(lam), lam)


def _noise_coefficient(count: int, dtype: torch.dtype) -> float:
    """``(4 eps log2 B)^2``: the floor of :func:`_drop_centring_noise` per unit of ||mean||^2."""
    return (4.0 * torch.finfo(dtype).eps * math.log2(max(count, 2))) ** 2


def global_mean(local_mean: torch.Tensor, local_count: int, group):
    """All-reduce (column sums, count) in float64: one message of ``N + 1`` values."""
    stats = torch.cat(
        [
            local_mean.to(torch.float64) * local_count,
            torch.tensor([float(local_count)], dtype=torch.float64, device=local_mean.device),
        ]
    )
    torch.distributed.all_reduce(stats, group=group)
    count = stats[-1]
    return (stats[:-1] / count).to(local_mean.dtype), count


def resolve_group(group_name: str):
    if not group_name:
        return None
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(group_name)


def group_name_of(process_group) -> str:
    """The name that custom ops carry for ``process_group`` ("" for a single process).

    A group of one process needs no communication and is treated as none.
    """
    if process_group is None:
        return ""
    import torch.distributed as dist

    if not dist.is_initialized():
        raise ValueError("process_group: torch.distributed is not initialised (init_process_group)")
    if dist.get_world_size(process_group) == 1:
        return ""
    return process_group.group_name


# --------------------------------------------------------------------------------------------
# torch.library custom ops: opaque to torch.compile, autograd registered
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("powerlaw_fast::projected_spectrum", mutates_args=())
def _projected_spectrum_op(
    x: torch.Tensor, V: torch.Tensor, backend: str, validate: bool, group_name: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lam, z, count = spectrum_forward(x, V, backend, resolve_group(group_name))
    if validate:
        bad = int((~torch.isfinite(lam)).sum())
        if bad:
            raise ValueError(_nonfinite_message("x", bad))
    return lam, z, count


@_projected_spectrum_op.register_fake
def _(x, V, backend, validate, group_name):
    B, N = x.shape
    return (
        x.new_empty(N, dtype=_spectrum_dtype(x.dtype)),
        x.new_empty((B, N)),
        x.new_empty((), dtype=torch.float64),
    )


@torch.library.custom_op("powerlaw_fast::projected_spectrum_backward", mutates_args=())
def _spectrum_backward_op(
    coef: torch.Tensor, z: torch.Tensor, V: torch.Tensor, backend: str, scale: float
) -> torch.Tensor:
    impl = _implementation(_SPECTRUM_BACKWARD, "spectrum_backward_cuda", backend)
    return impl(coef, z, V, scale)


@_spectrum_backward_op.register_fake
def _(coef, z, V, backend, scale):
    return torch.empty_like(z, memory_format=torch.contiguous_format)


def _projected_spectrum_setup(ctx, inputs, output):
    _, V, backend, _, group_name = inputs
    _, z, count = output
    ctx.save_for_backward(z, V, count)
    ctx.backend = backend
    ctx.distributed = bool(group_name)
    ctx.mark_non_differentiable(z, count)


def _projected_spectrum_backward(ctx, grad_lam, grad_z, grad_count):
    z, V, count = ctx.saved_tensors
    if ctx.distributed:
        # 2 / (global count - 1) stays on the device: no host synchronisation
        coef, scale = grad_lam * (2.0 / (count - 1)).to(grad_lam.dtype), 1.0
    else:
        coef, scale = grad_lam, 2.0 / (z.shape[0] - 1)
    # No communication: g is the same on every rank and the global Z columns sum to zero.
    grad_x = _spectrum_backward_op(coef.contiguous(), z, V, ctx.backend, scale)
    return grad_x, None, None, None, None


_projected_spectrum_op.register_autograd(
    _projected_spectrum_backward, setup_context=_projected_spectrum_setup
)


@torch.library.custom_op("powerlaw_fast::powerlaw_penalty", mutates_args=())
def _powerlaw_penalty_op(
    lam: torch.Tensor,
    alpha: float,
    anchor: int,
    beta: float,
    skip_nonpositive: bool,
    backend: str,
    validate: bool,
    source: str,
    tau: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    impl = _implementation(_POWERLAW_PENALTY, "powerlaw_penalty_cuda", backend)
    penalty, grad, status = impl(lam, alpha, anchor, beta, skip_nonpositive)
    if validate:
        nonfinite, anchor_bad = status.tolist()
        if nonfinite:
            raise ValueError(_nonfinite_message(source, nonfinite))
        if anchor_bad:
            raise ValueError(
                f"{source}: the batch is rank-deficient for tau = {tau}: the {anchor + 1}-th "
                f"largest "
                f"value of its projected spectrum is zero (to rounding), so the power-law target "
                f"is undefined; use a larger or more varied batch, or a smaller tau"
            )
    return penalty, grad


@_powerlaw_penalty_op.register_fake
def _(lam, alpha, anchor, beta, skip_nonpositive, backend, validate, source, tau):
    return lam.new_empty(()), torch.empty_like(lam)


def _powerlaw_penalty_setup(ctx, inputs, output):
    _, grad = output
    ctx.save_for_backward(grad)
    ctx.mark_non_differentiable(grad)


def _powerlaw_penalty_backward(ctx, grad_penalty, grad_grad):
    (grad,) = ctx.saved_tensors
    return grad_penalty * grad, None, None, None, None, None, None, None, None


_powerlaw_penalty_op.register_autograd(
    _powerlaw_penalty_backward, setup_context=_powerlaw_penalty_setup
)


def _nonfinite_message(source: str, count: int) -> str:
    if source == "x":
        return (
            f"x: expected finite activations, got a projected spectrum with {count} non-finite "
            f"values (x contains NaN or inf, or its products overflow)"
        )
    return f"{source}: expected finite values, got {count} non-finite values"


# --------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------
def _anchor_index(N: int, tau: int, convention: str) -> int:
    """0-based position of the anchor in the descending spectrum."""
    if convention not in CONVENTIONS:
        raise ValueError(f"convention: expected one of {CONVENTIONS}, got {convention!r}")
    if convention == "paper":
        return check_int_range(tau, "tau", 1, N, f" (1-indexed rank, N = {N})") - 1
    return check_int_range(
        tau, "tau", 0, N - 1, f" (0-indexed rank, convention='authors', N = {N})"
    )


def projected_spectrum(
    x: torch.Tensor,
    V: torch.Tensor,
    *,
    backend: str = "auto",
    validate: bool = True,
    process_group=None,
) -> torch.Tensor:
    """Per-batch spectrum ``diag(V^T Sigma V)`` through the projection form, differentiable in x.

    Args:
        x: activations ``[B, N]`` or ``[B, *]`` (flattened per sample); float16, bfloat16,
            float32 or float64; B >= 2.
        V: ``[N, N]``, eigenvectors as columns, same dtype and device as x; no gradient.
        backend: "auto" (Triton on CUDA, torch otherwise), "torch", "triton" or "cuda".
        validate: raise on non-finite results (one host synchronisation). Turn off inside CUDA
            graphs; then non-finite activations give a non-finite spectrum.
        process_group: a ``torch.distributed`` group whose ranks each hold a shard of the
            batch (shards may differ in size, B >= 1 per rank): the spectrum is that of the
            global batch, at the cost of two all-reduces of N + 1 and N floats. Every rank
            gets the same ``lam``; the backward pass needs no communication.

    Returns:
        ``lam [N]`` in V's column order (float32; float64 for float64 input), with
        ``lam[n] = ||(x - mu) V[:, n]||^2 / (B - 1)``.

    Example::

        >>> x = torch.randn(64, 8)
        >>> V = torch.eye(8)
        >>> torch.allclose(projected_spectrum(x, V), x.var(0), atol=1e-5)
        True
    """
    group_name = group_name_of(process_group)
    x = as_batch_matrix(x, "x", min_batch=1 if group_name else 2)
    check_basis(V, x, "V")
    name = resolve_backend(backend, x.device, dtype=x.dtype)
    lam, _, _ = _projected_spectrum_op(x, V.detach(), name, validate, group_name)
    return lam


def powerlaw_penalty(
    lam: torch.Tensor,
    *,
    alpha: float = 1.0,
    tau: int = 10,
    beta: float = 1.0,
    convention: str = "paper",
    backend: str = "auto",
    validate: bool = True,
) -> torch.Tensor:
    """Eq. (2) on a given spectrum ``lam [N]`` (any order; it is sorted descending inside).

    See :func:`spec_penalty` for the arguments and the two conventions. Differentiable in lam.

    Example::

        >>> lam = 1.0 / torch.arange(1, 51, dtype=torch.float64)
        >>> bool(powerlaw_penalty(lam, tau=10) < 1e-20)   # an exact 1/n spectrum costs nothing
        True
    """
    check_tensor(lam, "lam")
    if lam.dim() != 1 or lam.numel() < 1:
        raise ValueError(f"lam: expected a 1-D spectrum [N], got shape {tuple(lam.shape)}")
    check_float_dtype(lam, "lam")
    if lam.dtype in (torch.float16, torch.bfloat16):
        lam = lam.float()
    return _penalty(lam, alpha, tau, beta, convention, backend, validate, "lam")


def _penalty(lam, alpha, tau, beta, convention, backend, validate, source):
    N = lam.shape[0]
    anchor = _anchor_index(N, tau, convention)
    alpha = check_real(alpha, "alpha", low=0.0, low_inclusive=False)
    beta = check_real(beta, "beta", low=0.0, low_inclusive=True)
    name = resolve_backend(backend, lam.device, dtype=lam.dtype)
    penalty, _ = _powerlaw_penalty_op(
        lam, alpha, anchor, beta, convention == "authors", name, validate, source, tau
    )
    return penalty


def spec_penalty(
    x: torch.Tensor,
    V: torch.Tensor,
    *,
    alpha: float = 1.0,
    tau: int = 10,
    beta: float = 1.0,
    convention: str = "paper",
    backend: str = "auto",
    validate: bool = True,
    process_group=None,
) -> torch.Tensor:
    """The 1/n spectral penalty, eq. (2) of Nassar et al. (2020), differentiable in ``x``.

    ``R = beta / N * sum_{n >= tau} [(lam_n / gam_n - 1)^2 + max(0, lam_n / gam_n - 1)]`` over the
    per-batch spectrum ``lam_n = v_n^T Sigma v_n`` sorted in descending order, with the target
    ``gam_n = lam_tau (tau / n)^alpha`` held constant (no gradient through the anchor).

    The two conventions, side by side:

    ============================  ==========================  ==============================
    \\                             ``convention="paper"``      ``convention="authors"``
    ============================  ==========================  ==============================
    ``tau`` counts from           1 (tau = 10: 10th largest)  0 (tau = 10: 11th largest)
    valid ``tau``                 1 .. N                      0 .. N - 1
    terms with ``lam_n <= 0``     included                    skipped
    scale                         beta / N                    beta / N (N = width)
    ============================  ==========================  ==============================

    ``"authors"`` reproduces josuenassar/power_law: its default ``tau = 10`` equals the paper's
    ``tau = 11``. Since lam_n is a sum of squares it is only non-positive for a rank-deficient
    batch, so the two conventions differ by the shift of tau alone on ordinary batches.

    Args:
        x: activations ``[B, N]`` or ``[B, *]`` (a conv output is flattened per sample);
            float16, bfloat16, float32 or float64 (float64: torch backend); B >= 2.
        V: ``[N, N]`` eigenvectors as columns (from the eigenbasis refresh), same dtype and
            device as x; treated as a constant.
        alpha: power-law exponent > 0 (1 for the 1/n law).
        tau: anchor rank (see the conventions above); the sum starts there.
        beta: strength >= 0.
        convention: "paper" or "authors".
        backend: "auto" (Triton for CUDA tensors, torch otherwise), "torch", "triton", "cuda".
        validate: one host synchronisation to raise on non-finite activations and on a zero
            anchor eigenvalue (rank-deficient batch). Set False inside CUDA graphs, and run
            the step once eagerly before capturing it: the Triton kernels are autotuned on the
            first call for each (B, N), which must not happen during a capture.
        process_group: a ``torch.distributed`` group over which the batch is sharded (shards
            may differ in size): the penalty of the global batch, identical on every rank, each
            rank's gradient being its rows of the global gradient. Communication per step: one
            all-reduce of N + 1 floats (count and column sums) before the GEMM and one of N
            floats (column sums of Z * Z) after it; none in the backward pass. Under
            DistributedDataParallel, which averages gradients over ranks, add
            ``world_size * penalty`` to each rank's loss to get the single-process gradient.

    Returns:
        A 0-dim tensor (float32; float64 for float64 input).

    Example::

        >>> x = torch.randn(200, 30, requires_grad=True)
        >>> V = torch.linalg.eigh(torch.cov(x.detach().T))[1].flip(1)
        >>> R = spec_penalty(x, V, tau=10)
        >>> R.backward()
    """
    group_name = group_name_of(process_group)
    x = as_batch_matrix(x, "x", min_batch=1 if group_name else 2)
    check_basis(V, x, "V")
    _anchor_index(x.shape[1], tau, convention)
    name = resolve_backend(backend, x.device, dtype=x.dtype)
    lam, _, _ = _projected_spectrum_op(x, V.detach(), name, False, group_name)
    return _penalty(lam, alpha, tau, beta, convention, name, validate, "x")
