"""The power-law spectral penalty of Nassar et al. (2020), eq. (2), as fused GPU ops.

Math (paper conventions, n is 1-indexed; DESIGN.md section 2)::

    Z    = (x - mu) V                          [B, N]  one GEMM, centring in its prologue
    lam  = (S2 - S1^2 / B) / (B - 1)           [N]     = diag(V^T Sigma V), V's column order
           S1 = column_sum(Z), S2 = column_sum(Z * Z)
    s    = sort(lam, descending)
    r_n  = s_n / gam_n,  gam_n = kappa n^-alpha,  kappa = s_tau tau^alpha (no gradient)
    R    = beta / N * sum_{n = tau..N} [(r_n - 1)^2 + max(0, r_n - 1)]
    dR/dx = 2 / (B - 1) * (Z * g) V^T,  g = dR/dlam in V's column order

Why ``S1``: ``mu`` is rounded, so the columns of ``Z`` do not sum exactly to zero; the exact
centred sum of squares is ``S2 - S1^2 / B``, and since ``S1`` holds only the mean's rounding
error the subtraction loses nothing. A direction whose corrected value is at the rounding level
of ``S2`` (``8 eps log2(B) S2``) has no variance: a constant layer gives an exactly zero
spectrum and the clear rank-deficiency error, while activations with a mean of 1e3 keep their
float32 accuracy. ``r_n`` is evaluated as ``(s_n / s_tau) (n / tau)^alpha`` so the anchor's
ratio is exactly 1: its own term is 0 in value and slope.

Kernels and launches for one forward + backward (Triton, N <= 4096, one process):

1. ``column_mean`` (powerlaw_fast.ops.centring),
2. ``_centred_projection_kernel``: Z with the centring in the prologue and the column sums of Z
   and Z * Z in the epilogue, per row-block (``[2, ceil(B / 128), N]``: deterministic),
3. ``_spectrum_penalty_kernel``: one program sums the row-blocks, finishes the spectrum, sorts
   it (``tl.sort`` on value/index keys), evaluates eq. (2), scatters dR/dlam back to V's
   column order and writes a status word,
4. ``_scaled_backprojection_kernel``: ``2 / (B - 1) (Z * g * dLoss/dR) V^T``.

Wide layers (N > 4096) take the cuBLAS route: a centring pass, ``torch.mm`` for both GEMMs and
a column-moments pass, because there the GEMM dominates and cuBLAS's Hopper kernels beat a
plain Triton GEMM (DESIGN.md section 5). ``POWERLAW_FAST_GEMM=triton|cublas`` forces a route.

Everything a call writes lands in one float32 ``scratch [4 + 3N]``: ``[R, #non-finite values,
anchor not positive, penalty overflow, dR/dlam (N), lam (N), column means of Z (N)]``; the
last part lets the backward subtract Z's column means, which are not exactly zero because
``mu`` is rounded (with a mean of 1e3 that offset would dominate the tail directions).

Precision: the GEMM operands are x's dtype (float32 follows
``torch.get_float32_matmul_precision()``: "highest" exact, else TF32; bfloat16 on tensor
cores), or ``compute_dtype=torch.bfloat16`` for any input: the batch estimates each eigenvalue
with a sampling error of about sqrt(2 / B) (3.7% at B = 1500), far above bfloat16's rounding of
the GEMM inputs (about 0.4% per element, averaging out over N terms), so bfloat16 costs nothing
in meaning. float16 inputs are computed at TF32 (float16's 10-bit mantissa is exact in TF32),
with Z kept in float32: a float16 Z overflows for activations of a few thousand. Sums are
float32 (float64 for float64 input, torch backend). Z is kept for the backward instead of
recomputed (a third GEMM): one ``[B, N]`` buffer.

Host path: in eager mode one ``torch.autograd.Function`` node per call calls the launchers
directly (no custom-op dispatch); under ``torch.compile`` the same launchers run inside the
``powerlaw_fast::spectral_forward`` / ``spectral_backward`` custom ops. No zero-filled buffers,
no host-to-device copies, no host synchronisation unless ``validate="immediate"``.

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

import functools
import math
import os
from typing import NamedTuple

import torch

from powerlaw_fast._backend import resolve_backend, tf32_allowed
from powerlaw_fast._torch_helpers import accumulation_dtype
from powerlaw_fast._validation import (
    as_batch_matrix,
    check_basis,
    check_float_dtype,
    check_int_range,
    check_orthonormal,
    check_real,
    check_tensor,
)
from powerlaw_fast.ops import _alloc, status
from powerlaw_fast.ops._layout import BLOCK_M, SCRATCH_HEAD
from powerlaw_fast.ops._triton_gemm import cdiv, dot_in_fp32, next_power_of_2, size_bucket
from powerlaw_fast.ops.backends import implementation, register
from powerlaw_fast.ops.centring import column_moments_torch

CONVENTIONS = ("paper", "authors")
MAX_FUSED_N = 4096  # widest layer for the one-program sort and the Triton GEMM route


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------


@functools.cache
def _kernels():
    """This family's Triton kernels (:mod:`powerlaw_fast.ops._spectral_kernels`), imported on the
    first launch so that importing the package does not import triton."""
    from powerlaw_fast.ops import _spectral_kernels

    return _spectral_kernels


# --------------------------------------------------------------------------------------------
# What a call computes in: the GEMM operand dtype, Z's dtype, the dot precision, the route
# --------------------------------------------------------------------------------------------
class Plan(NamedTuple):
    operand: torch.dtype  # dtype of both GEMM operands (V is cast to it once by the caller)
    z_dtype: torch.dtype  # Z as kept for the backward
    precision: str  # "ieee" or "tf32" for float32 operands
    route: str  # "triton" (fused GEMMs) or "cublas" (torch.mm plus fused passes)


def operand_dtype(x_dtype: torch.dtype, compute_dtype: torch.dtype | None) -> torch.dtype:
    """The GEMM operands' dtype (also Z's): the compute dtype, else x's (float32 for float16)."""
    if x_dtype == torch.float64:
        return torch.float64
    return compute_dtype or (torch.float32 if x_dtype == torch.float16 else x_dtype)


@functools.lru_cache(maxsize=256)
def _plan(x_dtype, compute_dtype, tf32: bool, N: int, forced_route: str) -> Plan:
    if x_dtype == torch.float64:
        return Plan(torch.float64, torch.float64, "ieee", "triton")
    operand = operand_dtype(x_dtype, compute_dtype)
    if operand == torch.float32:
        # float16 inputs: TF32 holds them exactly and cannot overflow where float16 would
        half_input = x_dtype == torch.float16 and compute_dtype is None
        precision = "tf32" if (tf32 or half_input) else "ieee"
    else:
        precision = "tf32"
    route = forced_route if forced_route != "auto" else (
        "triton" if N <= MAX_FUSED_N else "cublas"
    )
    return Plan(operand, operand, precision, route)


def plan_for(x_dtype: torch.dtype, N: int, compute_dtype: torch.dtype | None = None) -> Plan:
    """The :class:`Plan` for activations of ``x_dtype`` and width ``N``."""
    forced = os.environ.get("POWERLAW_FAST_GEMM", "auto")
    return _plan(x_dtype, compute_dtype, tf32_allowed(), N, forced)


def _check_compute_dtype(compute_dtype, x_dtype):
    if compute_dtype is None:
        return None
    if compute_dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(
            f"compute_dtype: expected None, torch.float32 or torch.bfloat16, got {compute_dtype}"
        )
    if x_dtype == torch.float64:
        raise TypeError("compute_dtype: float64 activations are computed in float64; pass None")
    return compute_dtype


def _mean_tolerance(count: int, dtype: torch.dtype) -> float:
    """Relative rounding level of ``S2 - S1^2 / B`` (see the module docstring)."""
    return 8.0 * torch.finfo(dtype).eps * math.log2(max(count, 2))


def anchor_tolerance(plan: Plan, N: int) -> float:
    """An anchor value at or below this fraction of the spectrum's mean is zero to rounding.

    A direction without variance picks up rounding noise in ``Z = (x - mu) V``: V and the
    operands rounded to the GEMM's unit roundoff ``u_op`` give about ``u_op^2`` times the mean
    eigenvalue, and the float32 (or float64) accumulation over N terms at most
    ``N u_acc^2`` times it; 16x that is the floor. It is relative to the mean, not the
    largest value, so a steep full-rank spectrum (n^-4 at tau = 59: 8e-8 of the largest) is
    not mistaken for a rank-deficient one.
    """
    tf32 = plan.operand == torch.float32 and plan.precision == "tf32"
    u_operand = 2.0**-11 if tf32 else torch.finfo(plan.operand).eps / 2
    u_acc = torch.finfo(accumulation_dtype(plan.operand)).eps / 2
    return 16.0 * (u_operand**2 + N * u_acc**2)


def kink_tolerance(N: int, alpha: float, dtype: torch.dtype) -> float:
    """The rounding band of ``r_n - 1`` around the relu's kink.

    ``r = (s / s_anchor) exp(alpha (log n - log tau))``: one rounding in the ratio, the two
    logs (each within an ulp of its value, at most ``log N``), their difference, the product
    with alpha and exp, at most ``eps (3 + 2 alpha log N)`` relative; twice that is the band
    inside which the sign of ``r - 1`` is not known.
    """
    return 2.0 * torch.finfo(dtype).eps * (3.0 + 2.0 * alpha * math.log(max(N, 2)))


# --------------------------------------------------------------------------------------------
# Launchers (Triton) and their plain-torch twins, registered in the backend table
# --------------------------------------------------------------------------------------------
@register("centred_projection", "triton")
def centred_projection_triton(x, V, mean, plan: Plan):
    """``x [B, N]`` (any strides), ``V [N, N]`` in ``plan.operand``, ``mean [N]`` float32 ->
    (moments ``[2, M, N]`` float32, ``Z [B, N]`` in ``plan.z_dtype``)."""
    B, N = x.shape
    if plan.route == "cublas":
        from powerlaw_fast.ops.centring import centre_columns_triton, column_moments_triton

        z = torch.mm(centre_columns_triton(x, mean, plan.operand), V.to(plan.operand))
        return column_moments_triton(z), z
    z = _alloc.empty((B, N), device=x.device, dtype=plan.z_dtype)
    num_m = cdiv(B, BLOCK_M)
    moments = _alloc.empty((2, num_m, N), device=x.device, dtype=torch.float32)

    def grid(meta):
        return (num_m * cdiv(N, meta["BLOCK_N"]),)

    _kernels()._centred_projection_kernel[grid](
        x, mean, V, z, moments, B, N, size_bucket(B),
        x.stride(0), x.stride(1), V.stride(0), V.stride(1), z.stride(0), z.stride(1),
        OPERAND_FP32=plan.operand == torch.float32 and V.dtype != torch.float32,
        IN_PRECISION=plan.precision, DOT_IN_FP32=dot_in_fp32(plan.operand), BLOCK_M=BLOCK_M,
    )  # fmt: skip
    return moments, z


@register("centred_projection", "torch")
def centred_projection_torch(x, V, mean, plan: Plan):
    """Twin of :func:`centred_projection_triton`: the same rounding steps in plain torch
    (TF32 is not emulated: torch's own matmul decides on a GPU, exact float32 on a CPU)."""
    acc = accumulation_dtype(x.dtype)
    centred = x.to(acc) - mean
    if plan.operand != acc:
        centred = centred.to(plan.operand)
    z = centred.to(acc) @ V.to(acc)
    return column_moments_torch(z), z.to(plan.z_dtype)


@register("spectrum_penalty", "triton")
def spectrum_penalty_triton(src, count, anchor, alpha, beta, skip, mean_tol, tiny, kink_tol):
    """``src``: moments ``[2, M, N]`` (or a spectrum ``[N]`` when ``mean_tol is None``);
    ``count``: rows (a number, or a 0-dim tensor after an all-reduce); ``tiny``: the anchor
    test's fraction of the spectrum's mean; ``kink_tol``: the relu's rounding band -> scratch."""
    N = src.shape[-1]
    if N > MAX_FUSED_N:
        return spectrum_penalty_torch(
            src, count, anchor, alpha, beta, skip, mean_tol, tiny, kink_tol
        )
    parts = 2 if mean_tol is None else 3
    out = _alloc.empty((SCRATCH_HEAD + parts * N,), device=src.device, dtype=torch.float32)
    block = max(16, next_power_of_2(N))
    from_ptr = isinstance(count, torch.Tensor)
    _kernels()._spectrum_penalty_kernel[(1,)](
        src, count if from_ptr else src, out,
        src.shape[1] if mean_tol is not None else 1, N,
        float(count) if count is not None and not from_ptr else 0.0,
        mean_tol or 0.0, anchor, alpha, beta, tiny, kink_tol,
        FROM_MOMENTS=mean_tol is not None, COUNT_FROM_PTR=from_ptr,
        SKIP_NONPOSITIVE=skip, BLOCK=block, num_warps=4 if block <= 1024 else 8,
    )  # fmt: skip
    return out


def finish_spectrum_torch(moments, count, mean_tol):
    """``[2, M, N]`` row-block moments -> (``lam [N] = (S2 - S1^2 / B) / (B - 1)``, with
    values at the rounding level of ``S2`` set to 0 (see the module docstring); the column
    means of Z, ``S1 / B``, which the backward subtracts)."""
    s1, s2 = moments.sum(1)
    raw = s2 - s1 * s1 / count
    noise = (raw <= mean_tol * s2) & (s2 != float("inf"))
    return torch.where(noise, 0.0, raw) / (count - 1), s1 / count


@register("spectrum_penalty", "torch")
def spectrum_penalty_torch(src, count, anchor, alpha, beta, skip, mean_tol, tiny, kink_tol):
    """Twin of :func:`spectrum_penalty_triton`, the same scratch layout and the same decisions.

    Where one ulp could flip a branch, the choice is made on purpose and identically in every
    backend (so no verdict depends on a platform's ``log``/``exp``):

    - the anchor's own term is left out of the sum: it is ``(1 - 1)^2 + max(0, 1 - 1) = 0`` in
      value and slope by definition, but a rank ratio computed as ``exp(alpha * (log n -
      log tau))`` lands on 1 +- an ulp, and above 1 the relu would give the anchor a slope;
    - the relu's kink: where ``|r - 1|`` is within the rounding of ``r`` (``kink_tol``), the
      sign of ``r - 1`` is not known, and the subgradient 0 is taken (an exact power law then
      has gradient exactly 0 on every machine);
    - ties sort by column, the lower column first (a stable descending sort).
    """
    lam, zbar = (src, None) if mean_tol is None else finish_spectrum_torch(src, count, mean_tol)
    N = lam.shape[0]
    ordered, order = torch.sort(lam, descending=True, stable=True)
    ranks = torch.arange(1, N + 1, device=lam.device, dtype=lam.dtype)
    rank_ratio = torch.exp(alpha * (torch.log(ranks) - math.log(anchor + 1)))
    s_anchor = ordered[anchor]
    r = ordered / s_anchor * rank_ratio
    active = ranks > anchor + 1
    if skip:
        active = active & (ordered > 0)
    d = r - 1.0
    term = torch.where(active, d * d + d.clamp_min(0.0), 0.0)
    slope = (2.0 * d + (d > kink_tol).to(lam.dtype)) * rank_ratio / s_anchor
    grad_sorted = torch.where(active, slope * (beta / N), 0.0)
    grad = torch.empty_like(lam).scatter_(0, order, grad_sorted)
    penalty = term.sum() * (beta / N)
    nonfinite = (~torch.isfinite(lam)).sum().to(lam.dtype)
    overflow = (~torch.isfinite(grad_sorted[active])).any() | ~torch.isfinite(penalty)
    s_first = ordered[0]
    underflow = torch.finfo(lam.dtype).tiny / torch.finfo(lam.dtype).eps
    anchor_code = torch.where(
        (s_first > 0) & (s_first < underflow),
        2.0,
        (~(s_anchor > tiny * ordered.clamp_min(0).mean())).to(lam.dtype),
    )
    head = torch.stack(
        [penalty, nonfinite, anchor_code.to(lam.dtype), (overflow & (nonfinite == 0)).to(lam.dtype)]
    )
    return torch.cat([head, grad, lam] + ([] if zbar is None else [zbar.to(lam.dtype)]))


@register("backprojection", "triton")
def backprojection_triton(z, zbar, coef, grad_out, V, scale, out_dtype, plan: Plan):
    """``[B, N] = scale * grad_out * ((Z - zbar) * coef) V^T`` in ``out_dtype``; ``zbar``,
    ``coef [N]`` float32, ``grad_out`` a 0-dim tensor or None."""
    B, N = z.shape
    if plan.route == "cublas":
        return backprojection_torch(z, zbar, coef, grad_out, V, scale, out_dtype, plan)
    out = _alloc.empty((B, N), device=z.device, dtype=out_dtype)
    num_m = cdiv(B, BLOCK_M)

    def grid(meta):
        return (num_m * cdiv(N, meta["BLOCK_N"]),)

    _kernels()._scaled_backprojection_kernel[grid](
        z, zbar, coef, grad_out if grad_out is not None else coef, V, out, B, N, size_bucket(B),
        scale,
        z.stride(0), z.stride(1), V.stride(0), V.stride(1), out.stride(0), out.stride(1),
        HAS_GRAD_OUT=grad_out is not None,
        OPERAND_FP32=plan.operand == torch.float32 and V.dtype != torch.float32,
        IN_PRECISION=plan.precision, DOT_IN_FP32=dot_in_fp32(plan.operand), BLOCK_M=BLOCK_M,
    )  # fmt: skip
    return out


@register("backprojection", "torch")
def backprojection_torch(z, zbar, coef, grad_out, V, scale, out_dtype, plan: Plan):
    """Twin of :func:`backprojection_triton` (also the cuBLAS route on a GPU)."""
    acc = accumulation_dtype(z.dtype)
    factor = coef.to(acc) * scale
    if grad_out is not None:
        factor = factor * grad_out.to(acc)
    scaled = ((z.to(acc) - zbar.to(acc)) * factor).to(plan.operand)
    return (scaled.to(acc) @ V.to(acc).T).to(out_dtype)


# --------------------------------------------------------------------------------------------
# The CUDA C++ rows (csrc/; the launch wrappers in powerlaw_fast.cuda, imported on first use)
# --------------------------------------------------------------------------------------------
def _cuda():
    from powerlaw_fast.cuda import ops

    return ops


@register("centred_projection", "cuda")
def centred_projection_cuda(x, V, mean, plan: Plan):
    """Centring kernel, one cuBLAS GEMM, column reductions -> ``([2, 1, N], Z)``."""
    return _cuda().centred_moments_cuda(x, V, mean, plan.operand)


@register("spectrum_penalty", "cuda")
def spectrum_penalty_cuda(src, count, anchor, alpha, beta, skip, mean_tol, tiny, kink_tol):
    """The spectrum finished in torch, eq. (2) by csrc/powerlaw_penalty.cu -> scratch."""
    lam, zbar = (src, None) if mean_tol is None else finish_spectrum_torch(src, count, mean_tol)
    penalty, grad, code = _cuda().powerlaw_penalty_cuda(
        lam.float(), alpha, anchor, beta, skip, tiny, kink_tol
    )
    overflow = (~torch.isfinite(penalty) | ~torch.isfinite(grad).all()) & (code[0] == 0)
    parts = [penalty.reshape(1), code.float(), overflow.reshape(1).float(), grad, lam]
    return torch.cat(parts + ([] if zbar is None else [zbar]))


@register("backprojection", "cuda")
def backprojection_cuda(z, zbar, coef, grad_out, V, scale, out_dtype, plan: Plan):
    """Z's column means subtracted, the scaling kernel, then one cuBLAS GEMM against V^T."""
    if grad_out is not None:
        coef = coef * grad_out
    centred = (z.float() - zbar).to(z.dtype)
    return _cuda().spectrum_backward_cuda(coef, centred, V.to(z.dtype), scale).to(out_dtype)


# --------------------------------------------------------------------------------------------
# Forward and backward, shared by the eager autograd.Function and the custom ops
# --------------------------------------------------------------------------------------------
class Settings(NamedTuple):
    """Everything but the tensors; primitives only, so the custom ops can carry them."""

    backend: str
    anchor: int
    alpha: float
    beta: float
    skip_nonpositive: bool
    validate: str
    group_name: str
    source: str  # the argument errors are blamed on
    tau: int
    compute: str  # "" (x's dtype) or "bfloat16" / "float32"


def _compute_dtype(settings: Settings):
    return getattr(torch, settings.compute) if settings.compute else None


def spectral_forward(x: torch.Tensor, V: torch.Tensor, settings: Settings):
    """-> (scratch [4 + 2N] float32 (float64 for float64 x), Z [B, N], count).

    ``count`` is B (an int) in one process and the global row count (a 0-dim float64 tensor)
    with a process group.
    """
    B, N = x.shape
    plan = plan_for(x.dtype, N, _compute_dtype(settings))
    backend = settings.backend
    mean = implementation("column_mean", backend)(x)
    group = resolve_group(settings.group_name)
    count = B
    if group is not None:
        mean, count = global_mean(mean, B, group)
    moments, z = implementation("centred_projection", backend)(x, V, mean, plan)
    if group is not None:
        moments = moments.sum(1, keepdim=True)
        torch.distributed.all_reduce(moments, group=group)
        count = count.to(moments.dtype)
    rows = B if group is None else B * torch.distributed.get_world_size(group)
    mean_tol = _mean_tolerance(rows, accumulation_dtype(plan.operand))
    scratch = implementation("spectrum_penalty", backend)(
        moments, count, settings.anchor, settings.alpha, settings.beta,
        settings.skip_nonpositive, mean_tol, anchor_tolerance(plan, N),
        kink_tolerance(N, settings.alpha, accumulation_dtype(plan.operand)),
    )  # fmt: skip
    status.check(
        scratch[1:SCRATCH_HEAD], settings.validate, _raiser(settings),
        op="projected_spectrum" if settings.source == "spectrum" else "spec_penalty",
        collective=group is not None,
    )  # fmt: skip
    return scratch, z, count


def spectral_backward(coef, grad_out, z, zbar, V, count, x_dtype, settings: Settings):
    """``grad_x [B, N] = 2 / (count - 1) * grad_out * ((Z - zbar) * coef) V^T``, x's dtype."""
    plan = plan_for(x_dtype, z.shape[1], _compute_dtype(settings))
    if isinstance(count, torch.Tensor):  # process group: keep 2 / (count - 1) on the device
        coef = coef * (2.0 / (count - 1)).to(coef.dtype)
        scale = 1.0
    else:
        scale = 2.0 / (count - 1)
    return implementation("backprojection", settings.backend)(
        z, zbar, coef, grad_out, V, scale, x_dtype, plan
    )


def _raiser(settings: Settings):
    def raise_for(values):
        nonfinite, anchor_code, overflow = values[:3]
        if nonfinite:
            raise ValueError(_nonfinite_message(settings.source, int(nonfinite)))
        if settings.source == "spectrum":  # projected_spectrum: no penalty to check
            return
        if anchor_code == 2:
            raise ValueError(
                f"{settings.source}: the spectrum's values are too small for float32 (its "
                f"largest value is below 1e-31, where precision is lost to underflow); the "
                f"penalty does not depend on the scale of the activations, so multiply them by "
                f"a constant"
            )
        if anchor_code:
            what = "its projected spectrum" if settings.source == "x" else "the spectrum"
            raise ValueError(
                f"{settings.source}: the batch is rank-deficient for tau = {settings.tau}: the "
                f"{settings.anchor + 1}-th largest value of {what} (the anchor) is zero, or "
                f"below the rounding level of the computation, so the power-law target is "
                f"undefined; use a larger or more varied batch, or a smaller tau"
                + ("" if settings.source != "x" else
                   " (or float32 activations with torch.set_float32_matmul_precision('highest'),"
                   " which resolve the smallest values)")
            )
        if overflow:
            raise ValueError(
                f"alpha, beta: the penalty or its gradient is not finite in float32 with alpha = "
                f"{settings.alpha} and beta = {settings.beta} ((n / tau)^alpha or beta overflows)"
                f"; use a smaller alpha or beta"
            )

    return raise_for


def _nonfinite_message(source: str, count: int) -> str:
    if source in ("x", "spectrum"):
        return (
            f"x: expected finite activations, got a projected spectrum with {count} non-finite "
            f"values (x contains NaN or inf, or its products overflow)"
        )
    return f"{source}: expected finite values, got {count} non-finite values"


def refuse_second_order(grad: torch.Tensor, source: torch.Tensor, op: str) -> torch.Tensor:
    """``grad`` (the gradient for the input ``source``) unchanged, but an error if it is
    differentiated in a ``create_graph=True`` backward.

    The kernels' backward is not differentiable, and for the penalty no second derivative is
    consistent with holding kappa constant, so an error beats a silently wrong or missing
    second-order term. ``@once_differentiable`` is not enough: it stays silent when the
    incoming gradient is a constant, and its error node is pruned by ``torch.autograd.grad``
    unless it leads back to ``source``, as this one does.
    """
    if not torch.is_grad_enabled() or not source.requires_grad:
        return grad
    delayed = torch._C._functions.DelayedError(
        f"{op}: its gradient is not differentiable (second-order gradients through it are "
        f"not supported: the paper holds kappa constant, so no second derivative is "
        f"consistent with its gradient); compute second-order terms without it".encode(),
        2,
    )
    return delayed(grad.detach().requires_grad_(True), source)[0]


class _SpecPenalty(torch.autograd.Function):
    """Eager path of :func:`spec_penalty`: one autograd node, launchers called directly."""

    @staticmethod
    def forward(ctx, x, V, settings):
        scratch, z, count = spectral_forward(x, V, settings)
        ctx.save_for_backward(z, V, scratch)
        ctx.count, ctx.settings, ctx.x_dtype = count, settings, x.dtype
        # an input held as an attribute makes no reference cycle, and unlike a saved tensor
        # it is not version-checked: the backward never reads it (see refuse_second_order)
        ctx.x = x
        ctx.set_materialize_grads(False)
        N = x.shape[1]
        lam = scratch[SCRATCH_HEAD + N : SCRATCH_HEAD + 2 * N]
        ctx.mark_non_differentiable(lam)
        return scratch[0], lam

    @staticmethod
    def backward(ctx, grad_out, grad_lam):
        if grad_out is None:
            return None, None, None
        z, V, scratch = ctx.saved_tensors
        N = z.shape[1]
        coef = scratch[SCRATCH_HEAD : SCRATCH_HEAD + N]
        zbar = scratch[SCRATCH_HEAD + 2 * N :]
        grad_x = spectral_backward(
            coef, grad_out, z, zbar, V, ctx.count, ctx.x_dtype, ctx.settings
        )
        return refuse_second_order(grad_x, ctx.x, "spec_penalty"), None, None


class _ProjectedSpectrum(torch.autograd.Function):
    """Eager path of :func:`projected_spectrum`: returns lam, backward through Z."""

    @staticmethod
    def forward(ctx, x, V, settings):
        scratch, z, count = spectral_forward(x, V, settings)
        N = x.shape[1]
        ctx.save_for_backward(z, V, scratch)
        ctx.count, ctx.settings, ctx.x_dtype, ctx.x = count, settings, x.dtype, x
        ctx.set_materialize_grads(False)
        return scratch[SCRATCH_HEAD + N : SCRATCH_HEAD + 2 * N]

    @staticmethod
    def backward(ctx, grad_lam):
        if grad_lam is None:
            return None, None, None
        z, V, scratch = ctx.saved_tensors
        coef = grad_lam.to(scratch.dtype).contiguous()
        zbar = scratch[SCRATCH_HEAD + 2 * z.shape[1] :]
        grad_x = spectral_backward(coef, None, z, zbar, V, ctx.count, ctx.x_dtype, ctx.settings)
        return refuse_second_order(grad_x, ctx.x, "projected_spectrum"), None, None


# --------------------------------------------------------------------------------------------
# torch.library custom ops: the same forward and backward, opaque to torch.compile
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("powerlaw_fast::spectral_forward", mutates_args=())
def _spectral_forward_op(
    x: torch.Tensor, V: torch.Tensor, backend: str, anchor: int, alpha: float, beta: float,
    skip_nonpositive: bool, validate: str, group_name: str, source: str, tau: int, compute: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    settings = Settings(backend, anchor, alpha, beta, skip_nonpositive, validate, group_name,
                        source, tau, compute)  # fmt: skip
    scratch, z, count = spectral_forward(x, V, settings)
    if not isinstance(count, torch.Tensor):
        count = torch.full((), float(count), dtype=torch.float64, device=x.device)
    return scratch, z, count.to(torch.float64)


@_spectral_forward_op.register_fake
def _(x, V, backend, anchor, alpha, beta, skip_nonpositive, validate, group_name, source, tau,
      compute):  # fmt: skip
    B, N = x.shape
    z_dtype = operand_dtype(x.dtype, getattr(torch, compute) if compute else None)
    return (
        x.new_empty((SCRATCH_HEAD + 3 * N,), dtype=accumulation_dtype(x.dtype)),
        x.new_empty((B, N), dtype=z_dtype),
        x.new_empty((), dtype=torch.float64),
    )


@torch.library.custom_op("powerlaw_fast::spectral_backward", mutates_args=())
def _spectral_backward_op(
    coef: torch.Tensor, z: torch.Tensor, zbar: torch.Tensor, V: torch.Tensor,
    count: torch.Tensor, backend: str, x_dtype: torch.dtype, compute: str,
) -> torch.Tensor:  # fmt: skip
    settings = Settings(backend, 0, 1.0, 0.0, False, "off", "", "x", 1, compute)
    return spectral_backward(coef.contiguous(), None, z, zbar, V, count, x_dtype, settings)


@_spectral_backward_op.register_fake
def _(coef, z, zbar, V, count, backend, x_dtype, compute):
    return z.new_empty(z.shape, dtype=x_dtype)


def _forward_setup(ctx, inputs, output):
    x, V, backend = inputs[0], inputs[1], inputs[2]
    scratch, z, count = output
    ctx.save_for_backward(z, V, scratch, count)
    ctx.backend, ctx.x_dtype, ctx.compute = backend, x.dtype, inputs[-1]
    ctx.mark_non_differentiable(z, count)


def _forward_backward(ctx, grad_scratch, grad_z, grad_count):
    z, V, scratch, count = ctx.saved_tensors
    N = z.shape[1]
    # dLoss/dlam: through the penalty (entry 0) and through lam itself (the last N entries)
    coef = (
        grad_scratch[0] * scratch[SCRATCH_HEAD : SCRATCH_HEAD + N]
        + grad_scratch[SCRATCH_HEAD + N : SCRATCH_HEAD + 2 * N]
    )
    zbar = scratch[SCRATCH_HEAD + 2 * N :]
    grad_x = _spectral_backward_op(
        coef, z, zbar, V, count, ctx.backend, ctx.x_dtype, ctx.compute
    )
    return (grad_x,) + (None,) * 11


_spectral_forward_op.register_autograd(_forward_backward, setup_context=_forward_setup)


@torch.library.custom_op("powerlaw_fast::powerlaw_penalty", mutates_args=())
def _powerlaw_penalty_op(
    lam: torch.Tensor, backend: str, anchor: int, alpha: float, beta: float,
    skip_nonpositive: bool, validate: str, tau: int,
) -> torch.Tensor:  # fmt: skip
    settings = Settings(backend, anchor, alpha, beta, skip_nonpositive, validate, "", "lam", tau,
                        "")  # fmt: skip
    return _sorted_penalty(lam, settings)


@_powerlaw_penalty_op.register_fake
def _(lam, backend, anchor, alpha, beta, skip_nonpositive, validate, tau):
    return lam.new_empty((SCRATCH_HEAD + 2 * lam.shape[0],))


def _penalty_setup(ctx, inputs, output):
    ctx.save_for_backward(output)


def _penalty_backward(ctx, grad_scratch):
    (scratch,) = ctx.saved_tensors
    N = (scratch.shape[0] - SCRATCH_HEAD) // 2
    grad = grad_scratch[0] * scratch[SCRATCH_HEAD : SCRATCH_HEAD + N] + grad_scratch[-N:]
    return (grad,) + (None,) * 7


_powerlaw_penalty_op.register_autograd(_penalty_backward, setup_context=_penalty_setup)


def _sorted_penalty(lam: torch.Tensor, settings: Settings) -> torch.Tensor:
    scratch = implementation("spectrum_penalty", settings.backend)(
        lam.contiguous(), None, settings.anchor, settings.alpha, settings.beta,
        settings.skip_nonpositive, None, 0.0,
        kink_tolerance(lam.shape[0], settings.alpha, lam.dtype),
    )  # fmt: skip
    status.check(scratch[1:SCRATCH_HEAD], settings.validate, _raiser(settings),
                 op="powerlaw_penalty")  # fmt: skip
    return scratch


class _PowerlawPenalty(torch.autograd.Function):
    @staticmethod
    def forward(ctx, lam, settings):
        scratch = _sorted_penalty(lam, settings)
        ctx.save_for_backward(scratch)
        ctx.lam = lam
        ctx.set_materialize_grads(False)
        return scratch[0]

    @staticmethod
    def backward(ctx, grad_out):
        if grad_out is None:
            return None, None
        (scratch,) = ctx.saved_tensors
        N = (scratch.shape[0] - SCRATCH_HEAD) // 2
        grad = grad_out * scratch[SCRATCH_HEAD : SCRATCH_HEAD + N]
        return refuse_second_order(grad, ctx.lam, "powerlaw_penalty"), None


# --------------------------------------------------------------------------------------------
# Several processes: global mean and count
# --------------------------------------------------------------------------------------------
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
    """The name that the ops carry for ``process_group`` ("" for a single process).

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
# Public functions
# --------------------------------------------------------------------------------------------
def anchor_index(N: int, tau: int, convention: str) -> int:
    """0-based position of the anchor in the descending spectrum."""
    if convention not in CONVENTIONS:
        raise ValueError(f"convention: expected one of {CONVENTIONS}, got {convention!r}")
    if convention == "paper":
        return check_int_range(tau, "tau", 1, N, f" (1-indexed rank, N = {N})") - 1
    return check_int_range(
        tau, "tau", 0, N - 1, f" (0-indexed rank, convention='authors', N = {N})"
    )


def _check_beta(beta) -> float:
    beta = check_real(beta, "beta", low=0.0, low_inclusive=True)
    limit = torch.finfo(torch.float32).max
    if beta > limit:
        raise ValueError(
            f"alpha, beta: the penalty or its gradient is not finite in float32 with beta = "
            f"{beta} (expected beta <= {limit:.3g}); use a smaller beta"
        )
    return beta


def _settings(x, V, *, alpha, tau, beta, convention, backend, validate, process_group,
              compute_dtype, source):  # fmt: skip
    """Check every argument before any work; returns (x [B, N], V, Settings)."""
    if not torch.compiler.is_compiling():
        status.poll()
    group_name = group_name_of(process_group)
    x = as_batch_matrix(x, "x", min_batch=1 if group_name else 2)
    compute_dtype = _check_compute_dtype(compute_dtype, x.dtype)
    V = check_basis(V, x, compute_dtype)
    N = x.shape[1]
    anchor = anchor_index(N, tau, convention)
    alpha = check_real(alpha, "alpha", low=0.0, low_inclusive=False)
    beta = _check_beta(beta)
    mode = status.validation_mode(validate)
    if mode == "immediate":  # a synchronisation anyway: V's orthonormality is checked too
        check_orthonormal(V)
    name = resolve_backend(backend, x.device, dtype=x.dtype)
    compute = str(compute_dtype).removeprefix("torch.") if compute_dtype is not None else ""
    settings = Settings(name, anchor, alpha, beta, convention == "authors", mode, group_name,
                        source, tau, compute)  # fmt: skip
    return x, V, settings


def spec_penalty(
    x: torch.Tensor,
    V: torch.Tensor,
    *,
    alpha: float = 1.0,
    tau: int = 10,
    beta: float = 1.0,
    convention: str = "paper",
    backend: str = "auto",
    validate: bool | str = "deferred",
    compute_dtype: torch.dtype | None = None,
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
        V: ``[N, N]`` orthonormal eigenvectors as columns (from the eigenbasis refresh), on
            x's device, in x's dtype (or in ``compute_dtype``); a constant (one that requires
            grad is refused). Orthonormality is assumed, and checked with
            ``validate="immediate"`` (one N x N GEMM).
        alpha: power-law exponent > 0 (1 for the 1/n law).
        tau: anchor rank (see the conventions above); the sum starts there.
        beta: strength >= 0.
        convention: "paper" or "authors".
        backend: "auto" (Triton for CUDA tensors, torch otherwise), "torch", "triton", "cuda".
        validate: how non-finite activations, a zero anchor value (a rank-deficient batch)
            and an overflowing penalty are reported, each with a ValueError:
            ``"deferred"`` (default: no host synchronisation; on a GPU the error is raised by
            the next call or by :func:`powerlaw_fast.raise_pending_errors`),
            ``"immediate"`` / True (one synchronisation, raised by this call; V's
            orthonormality is checked too), ``"off"`` / False. A deferred error is a
            :class:`~powerlaw_fast.ops.status.DeferredValidationError` naming the call it
            came from. Inside CUDA graphs nothing is checked; run the step once eagerly
            before capturing it (the Triton kernels are also autotuned on that first call).
        compute_dtype: None (the GEMMs in x's dtype) or ``torch.bfloat16``: bfloat16 GEMM
            operands with float32 sums for float32 activations. The batch's own sampling
            error per eigenvalue, about sqrt(2 / B), dwarfs bfloat16's rounding.
        process_group: a ``torch.distributed`` group over which the batch is sharded (shards
            may differ in size): the penalty of the global batch, identical on every rank, each
            rank's gradient being its rows of the global gradient. Communication per step: one
            all-reduce of N + 1 floats (count and column sums) before the GEMM and one of 2N
            floats (column sums of Z and Z * Z) after it; none in the backward pass. Under
            DistributedDataParallel, which averages gradients over ranks, add
            ``world_size * penalty`` to each rank's loss to get the single-process gradient.

    Returns:
        A 0-dim tensor (float32; float64 for float64 input). Differentiable once: its
        gradient treats kappa as a constant (the paper's convention), so the gradient of that
        gradient is not the derivative a finite difference would see; a second-order
        ``torch.autograd.grad(..., create_graph=True)`` through it raises instead of returning
        a wrong value.

    Example::

        >>> x = torch.randn(200, 30, requires_grad=True)
        >>> V = torch.linalg.eigh(torch.cov(x.detach().T))[1].flip(1)
        >>> R = spec_penalty(x, V, tau=10)
        >>> R.backward()
    """
    x, V, settings = _settings(
        x, V, alpha=alpha, tau=tau, beta=beta, convention=convention, backend=backend,
        validate=validate, process_group=process_group, compute_dtype=compute_dtype,
        source="x",
    )  # fmt: skip
    return _penalty_and_spectrum(x, V, settings)[0]


def _penalty_and_spectrum(x, V, settings: Settings):
    """(R, lam [N] without gradient): the regulariser keeps lam for its spectra()."""
    if torch.compiler.is_compiling():
        scratch = _spectral_forward_op(x, V, *settings)[0]
        N = x.shape[1]
        return scratch[0], scratch[SCRATCH_HEAD + N : SCRATCH_HEAD + 2 * N].detach()
    return _SpecPenalty.apply(x, V, settings)


def penalty_and_spectrum(x, V, **kwargs):
    """:func:`spec_penalty` that also returns the batch's spectrum ``lam [N]`` (detached, V's
    column order) from the same call: ``(R, lam)``. Same arguments as :func:`spec_penalty`."""
    kwargs.setdefault("process_group", None)
    kwargs.setdefault("compute_dtype", None)
    x, V, settings = _settings(x, V, source="x", **kwargs)
    return _penalty_and_spectrum(x, V, settings)


def projected_spectrum(
    x: torch.Tensor,
    V: torch.Tensor,
    *,
    backend: str = "auto",
    validate: bool | str = "deferred",
    compute_dtype: torch.dtype | None = None,
    process_group=None,
) -> torch.Tensor:
    """Per-batch spectrum ``diag(V^T Sigma V)`` through the projection form, differentiable in x.

    Args:
        x: activations ``[B, N]`` or ``[B, *]`` (flattened per sample); float16, bfloat16,
            float32 or float64; B >= 2.
        V: ``[N, N]``, eigenvectors as columns, same device as x, in x's dtype (or
            ``compute_dtype``); no gradient.
        backend: "auto" (Triton on CUDA, torch otherwise), "torch", "triton" or "cuda".
        validate: raise on non-finite results: "deferred" (default), "immediate"/True or
            "off"/False, as in :func:`spec_penalty`.
        compute_dtype: None or ``torch.bfloat16``, as in :func:`spec_penalty`.
        process_group: a ``torch.distributed`` group whose ranks each hold a shard of the
            batch (shards may differ in size, B >= 1 per rank): the spectrum is that of the
            global batch. Every rank gets the same ``lam``; the backward pass needs no
            communication.

    Returns:
        ``lam [N]`` in V's column order (float32; float64 for float64 input), with
        ``lam[n] = ||(x - mu) V[:, n]||^2 / (B - 1)``.

    Example::

        >>> x = torch.randn(64, 8)
        >>> V = torch.eye(8)
        >>> torch.allclose(projected_spectrum(x, V), x.var(0), atol=1e-5)
        True
    """
    x, V, settings = _settings(
        x, V, alpha=1.0, tau=1, beta=0.0, convention="paper", backend=backend,
        validate=validate, process_group=process_group, compute_dtype=compute_dtype,
        source="spectrum",
    )  # fmt: skip
    N = x.shape[1]
    if torch.compiler.is_compiling():
        return _spectral_forward_op(x, V, *settings)[0][SCRATCH_HEAD + N : SCRATCH_HEAD + 2 * N]
    return _ProjectedSpectrum.apply(x, V, settings)


def powerlaw_penalty(
    lam: torch.Tensor,
    *,
    alpha: float = 1.0,
    tau: int = 10,
    beta: float = 1.0,
    convention: str = "paper",
    backend: str = "auto",
    validate: bool | str = "deferred",
) -> torch.Tensor:
    """Eq. (2) on a given spectrum ``lam [N]`` (any order; it is sorted descending inside).

    See :func:`spec_penalty` for the arguments and the two conventions. Differentiable in lam.

    Example::

        >>> lam = 1.0 / torch.arange(1, 51, dtype=torch.float64)
        >>> bool(powerlaw_penalty(lam, tau=10) < 1e-20)   # an exact 1/n spectrum costs nothing
        True
    """
    if not torch.compiler.is_compiling():
        status.poll()
    check_tensor(lam, "lam")
    if lam.dim() != 1 or lam.numel() < 1:
        raise ValueError(f"lam: expected a 1-D spectrum [N], got shape {tuple(lam.shape)}")
    check_float_dtype(lam, "lam")
    if lam.dtype in (torch.float16, torch.bfloat16):
        lam = lam.float()
    anchor = anchor_index(lam.shape[0], tau, convention)
    alpha = check_real(alpha, "alpha", low=0.0, low_inclusive=False)
    beta = _check_beta(beta)
    mode = status.validation_mode(validate)
    name = resolve_backend(backend, lam.device, dtype=lam.dtype)
    settings = Settings(name, anchor, alpha, beta, convention == "authors", mode, "", "lam",
                        tau, "")  # fmt: skip
    if torch.compiler.is_compiling():
        return _powerlaw_penalty_op(lam, name, anchor, alpha, beta, convention == "authors",
                                    mode, tau)[0]  # fmt: skip
    return _PowerlawPenalty.apply(lam, settings)
