"""The power-law spectral penalty of Nassar et al. (2020), eq. (2), as fused GPU ops.

Math (paper conventions, n is 1-indexed; the oracle in tests/oracle.py writes eq. (2) literally)::

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
plain Triton GEMM (measured by benchmarks/bench_penalty.py).
``POWERLAW_FAST_GEMM=triton|cublas`` forces a route.

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

Host path: one forward and one backward made into an op by
:class:`~powerlaw_fast.ops._autograd.FusedOp` (as every op family is): in eager mode one
autograd node per call calls the launchers directly (no custom-op dispatch); under
``torch.compile`` the same functions run inside the ``powerlaw_fast::spectral_penalty`` /
``spectral_penalty_backward`` custom ops. No zero-filled buffers,
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

import torch

from powerlaw_fast._backend import resolve_backend
from powerlaw_fast._torch_helpers import accumulation_dtype
from powerlaw_fast._validation import as_batch_matrix, check_basis, check_orthonormal, check_real
from powerlaw_fast.ops import _alloc, status
from powerlaw_fast.ops import powerlaw_penalty as _stage  # noqa: F401  (registers spectrum_penalty)
from powerlaw_fast.ops._autograd import FusedOp
from powerlaw_fast.ops._distributed import global_mean, group_name_of, resolve_group
from powerlaw_fast.ops._layout import (
    BLOCK_M,
    scratch_column_means,
    scratch_dR_dlam,
    scratch_lam,
    scratch_size,
    scratch_status,
    scratch_width,
)
from powerlaw_fast.ops._plan import (
    Plan,
    anchor_tolerance,
    check_compute_dtype,
    kink_tolerance,
    mean_tolerance,
    operand_dtype,
    plan_for,
)
from powerlaw_fast.ops._settings import (
    Settings,
    anchor_index,
    check_beta,
    check_half_gradient,
    compute_dtype_of,
    status_raiser,
)
from powerlaw_fast.ops._triton_gemm import cdiv, dot_in_fp32, size_bucket
from powerlaw_fast.ops.backends import implementation, register
from powerlaw_fast.ops.centring import column_moments_torch


# --------------------------------------------------------------------------------------------
# Triton kernels (a private module, imported on the first launch)
# --------------------------------------------------------------------------------------------
@functools.cache
def _kernels():
    """This family's Triton kernels (:mod:`powerlaw_fast.ops._spectral_kernels`), imported on the
    first launch so that importing the package does not import triton."""
    from powerlaw_fast.ops import _spectral_kernels

    return _spectral_kernels


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


@register("backprojection", "cuda")
def backprojection_cuda(z, zbar, coef, grad_out, V, scale, out_dtype, plan: Plan):
    """Z's column means subtracted, the scaling kernel, then one cuBLAS GEMM against V^T."""
    if grad_out is not None:
        coef = coef * grad_out
    centred = (z.float() - zbar).to(z.dtype)
    return _cuda().spectrum_backward_cuda(coef, centred, V.to(z.dtype), scale).to(out_dtype)


# --------------------------------------------------------------------------------------------
# Forward and backward, made into one op (SPECTRAL_PENALTY below) for eager and compiled use
# --------------------------------------------------------------------------------------------
def spectral_forward(x: torch.Tensor, V: torch.Tensor, settings: Settings):
    """-> (scratch [4 + 2N] float32 (float64 for float64 x), Z [B, N], count).

    ``count`` is B (an int) in one process and the global row count (a 0-dim float64 tensor)
    with a process group.
    """
    B, N = x.shape
    plan = plan_for(x.dtype, N, compute_dtype_of(settings))
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
    mean_tol = mean_tolerance(rows, accumulation_dtype(plan.operand))
    scratch = implementation("spectrum_penalty", backend)(
        moments, count, settings.anchor, settings.alpha, settings.beta,
        settings.skip_nonpositive, mean_tol, anchor_tolerance(plan, N),
        kink_tolerance(N, settings.alpha, accumulation_dtype(plan.operand)),
    )  # fmt: skip
    status.check(
        scratch_status(scratch), settings.validate, status_raiser(settings),
        op="projected_spectrum" if settings.source == "spectrum" else "spec_penalty",
        collective=group is not None,
    )  # fmt: skip
    return scratch, z, count


def spectral_backward(coef, grad_out, z, zbar, V, count, x_dtype, backend: str, compute: str):
    """``grad_x [B, N] = 2 / (count - 1) * grad_out * ((Z - zbar) * coef) V^T``, x's dtype;
    ``backend`` a resolved name, ``compute`` as :attr:`Settings.compute`."""
    plan = plan_for(x_dtype, z.shape[1], getattr(torch, compute) if compute else None)
    if isinstance(count, torch.Tensor):  # process group: keep 2 / (count - 1) on the device
        coef = coef * (2.0 / (count - 1)).to(coef.dtype)
        scale = 1.0
    else:
        scale = 2.0 / (count - 1)
    return implementation("backprojection", backend)(
        z, zbar, coef, grad_out, V, scale, x_dtype, plan
    )


def vjp_coefficients(scratch, N: int, grad_R, grad_lam):
    """dLoss/dlam ``[N]`` from dLoss/dR (0-dim or None) and dLoss/dlam (``[N]`` or None) ->
    ``(coef, grad_out)`` for :func:`spectral_backward`. A penalty alone (no dLoss/dlam, the
    eager training step) keeps dR/dlam as is and lets the backprojection kernel scale by
    dLoss/dR (no extra launch); otherwise dLoss/dR is folded into coef (in the compiled graph,
    where every gradient arrives, the arithmetic fuses)."""
    dR_dlam = scratch_dR_dlam(scratch, N)
    if grad_lam is None:
        return dR_dlam, grad_R
    coef = grad_lam.to(scratch.dtype)
    if grad_R is not None:
        coef = coef + grad_R * dR_dlam
    return coef.contiguous(), None


def _op_label(settings: Settings) -> str:
    return "projected_spectrum" if settings.source == "spectrum" else "spec_penalty"


def _forward(inputs, settings: Settings):
    """-> [scratch, Z, count] (count an int in one process)."""
    x, V = inputs
    return list(spectral_forward(x, V, settings))


def _fake(inputs, settings: Settings):
    x, _ = inputs
    B, N = x.shape
    z_dtype = operand_dtype(x.dtype, compute_dtype_of(settings))
    return [
        x.new_empty((scratch_size(N, 3),), dtype=accumulation_dtype(x.dtype)),
        x.new_empty((B, N), dtype=z_dtype),
        x.new_empty((), dtype=torch.float64),
    ]


def _outputs(results):
    """(R, lam [N]): the penalty and the spectrum, both in the scratch."""
    scratch = results[0]
    return scratch[0], scratch_lam(scratch, scratch_width(scratch, 3))


def _save(inputs, results):
    scratch, z, count = results
    return [z, inputs[1], scratch, count]


def _backward(grads, saved, inputs, settings: Settings):
    grad_R, grad_lam = grads
    z, V, scratch, count = saved
    N = z.shape[1]
    coef, grad_out = vjp_coefficients(scratch, N, grad_R, grad_lam)
    zbar = scratch_column_means(scratch, N)
    grad_x = spectral_backward(coef, grad_out, z, zbar, V, count, inputs[0].dtype,
                               settings.backend, settings.compute)  # fmt: skip
    check_half_gradient(grad_x, settings.validate, f"{_op_label(settings)} (backward)")
    return [grad_x]


# The op behind spec_penalty, penalty_and_spectrum and projected_spectrum: (x, V) -> (R, lam),
# one autograd node eagerly, the custom ops powerlaw_fast::spectral_penalty(_backward) compiled
SPECTRAL_PENALTY = FusedOp(
    "spectral_penalty", Settings, forward=_forward, fake=_fake, outputs=_outputs, save=_save,
    backward=_backward, label=_op_label,
)  # fmt: skip


# --------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------
def _settings(x, V, *, alpha, tau, beta, convention, backend, validate, process_group,
              compute_dtype, source):  # fmt: skip
    """Check every argument before any work; returns (x [B, N], V, Settings)."""
    if not torch.compiler.is_compiling():
        status.poll()
    group_name = group_name_of(process_group)
    x = as_batch_matrix(x, "x", min_batch=1 if group_name else 2)
    compute_dtype = check_compute_dtype(compute_dtype, x.dtype)
    V = check_basis(V, x, compute_dtype)
    N = x.shape[1]
    anchor = anchor_index(N, tau, convention)
    alpha = check_real(alpha, "alpha", low=0.0, low_inclusive=False)
    beta = check_beta(beta)
    mode = status.validation_mode(validate)
    if mode == "immediate":  # a synchronisation anyway: V's orthonormality is checked too
        check_orthonormal(V)
    name = resolve_backend(backend, x.device, dtype=x.dtype)
    compute = str(compute_dtype).removeprefix("torch.") if compute_dtype is not None else ""
    settings = Settings(backend=name, anchor=anchor, alpha=alpha, beta=beta,
                        skip_nonpositive=convention == "authors", validate=mode, source=source,
                        tau=tau, group_name=group_name, compute=compute)  # fmt: skip
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
    value, lam = SPECTRAL_PENALTY([x, V], settings)
    return value, lam.detach()


def penalty_and_spectrum(
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`spec_penalty` that also returns the batch's spectrum ``lam [N]`` (detached, V's
    column order, float32; float64 for float64 x) from the same call: ``(R, lam)``. Same
    arguments and defaults as :func:`spec_penalty`.

    Example::

        >>> x = torch.randn(200, 30, requires_grad=True)
        >>> V = torch.linalg.eigh(torch.cov(x.detach().T))[1].flip(1)
        >>> R, lam = penalty_and_spectrum(x, V, tau=10)
        >>> lam.shape, lam.requires_grad
        (torch.Size([30]), False)
    """
    x, V, settings = _settings(
        x, V, alpha=alpha, tau=tau, beta=beta, convention=convention, backend=backend,
        validate=validate, process_group=process_group, compute_dtype=compute_dtype,
        source="x",
    )  # fmt: skip
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
    return SPECTRAL_PENALTY([x, V], settings)[1]
