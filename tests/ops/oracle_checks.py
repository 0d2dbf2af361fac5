"""Every numeric op test's verdict, in one place: the package's result against the float64
oracle (tests/oracle.py), within the bounds derived from the rounding of each quantity
(tests/bounds.py). Neither of those imports the package; this module runs the package's ops
and compares.

Each check takes the inputs as the implementation sees them (already rounded to their dtype:
input rounding is not the op's error), the backend, and the op's settings, and returns what
the op computed (as float64) for further checks by the caller. ``assume`` is called with a
condition a case must meet to have a comparable result (a gradient within a half type's
range); the example-based tests assert it, the property tests pass ``hypothesis.assume``.

Example::

    >>> from tests.ops.oracle_checks import check_penalty
    >>> x, V = torch.randn(40, 12), torch.linalg.qr(torch.randn(12, 12))[0]
    >>> value, grad = check_penalty(x, V, backend="torch", tau=3)
"""

from __future__ import annotations

import torch

from powerlaw_fast import batch_covariance, powerlaw_penalty, projected_spectrum, spec_penalty
from tests import bounds, oracle
from tests.devices import DEVICE


def _required(condition: bool, why: str = "the case has no comparable result") -> None:
    assert condition, why


def roundoffs(dtype: torch.dtype, backend: str, compute_dtype: torch.dtype | None = None):
    """``u_op`` (GEMM operands) and ``u_acc`` (sums) of a penalty call on ``dtype`` input,
    as the package documents its plan (``compute_dtype=torch.bfloat16``: bfloat16 operands)."""
    if compute_dtype is not None and dtype != torch.float64:
        u_op = bounds.operand_roundoff(compute_dtype, DEVICE, backend)
    else:
        u_op = bounds.operand_roundoff(dtype, DEVICE, backend)
    return dict(u_op=u_op, u_acc=bounds.accumulation_roundoff(dtype))


def penalty_settings(alpha=1.0, tau=10, beta=1.0, convention="paper"):
    return dict(alpha=alpha, tau=tau, beta=beta, convention=convention)


def expected_penalty(x, V, *, backend, compute_dtype=None, **settings):
    """The oracle's ``(R, dR, G, dG)`` for ``spec_penalty(x, V, **settings)`` on ``backend``
    (see :func:`tests.bounds.expected_penalty`), or None where the batch is rank-deficient to
    the rounding of its spectrum."""
    kw = penalty_settings(**settings)
    return bounds.expected_penalty(x, V, **roundoffs(x.dtype, backend, compute_dtype),
                                   u_out=bounds.U[x.dtype], **kw)  # fmt: skip


def check_penalty(x, V, *, backend, compute_dtype=None, assume=_required, what="spec_penalty",
                  **settings):  # fmt: skip
    """``spec_penalty`` of ``x [B, N]`` in ``V [N, N]``: its value and its gradient within the
    oracle's bounds. Returns ``(value, grad)`` as float64."""
    kw = penalty_settings(**settings)
    expected = expected_penalty(x, V, backend=backend, compute_dtype=compute_dtype, **kw)
    assume(expected is not None, "the anchor is zero to the rounding of the spectrum")
    R, dR, G, dG = expected
    # a gradient beyond a half type's range: test_half_gradient_beyond_its_range_is_not_silent
    assume(float((G.abs() + dG).max()) < torch.finfo(x.dtype).max / 4,
           "the gradient is beyond the input dtype's range")  # fmt: skip
    leaf = x.detach().requires_grad_(True)
    value = spec_penalty(leaf, V, backend=backend, compute_dtype=compute_dtype,
                         validate="immediate", **kw)  # fmt: skip
    (grad,) = torch.autograd.grad(value, leaf)
    assert value.dtype == (torch.float64 if x.dtype == torch.float64 else torch.float32)
    assert value.shape == () and grad.dtype == x.dtype and grad.shape == x.shape
    bounds.assert_within(value.detach(), R, dR, f"{what} value",
                         floor=bounds.subnormal_spacing(value.dtype))  # fmt: skip
    # a gradient in a half type rounds to its subnormal spacing below its normal range
    bounds.assert_within(grad, G, dG, f"{what} gradient",
                         floor=bounds.subnormal_spacing(x.dtype))  # fmt: skip
    return value.detach().double(), grad.double()


def expected_weighted_gradient(x, V, *, backend, weight_R=0.0, weights_lam=None,
                               compute_dtype=None, **settings):  # fmt: skip
    """``(G, dG)``: the oracle's gradient of ``weight_R * R + weights_lam . lam`` in ``x`` and
    its bound, for a backward that folds both into one coefficient per column (in the sums'
    dtype) and backprojects once: ``2 / (B - 1) (Z * coef) V^T``."""
    kw = penalty_settings(**settings)
    x64, V64 = x.detach().double().cpu(), V.detach().double().cpu()
    u = roundoffs(x.dtype, backend, compute_dtype)
    spec = bounds.spectrum_bound(x64, V64, **u)
    N = V64.shape[1]
    w = torch.zeros(N, dtype=torch.float64) if weights_lam is None else weights_lam.double().cpu()
    lo, hi = torch.zeros_like(w), torch.zeros_like(w)
    if weight_R:
        slope_lo, slope_hi = bounds.slope_interval(spec.lam, spec.dlam, u_acc=u["u_acc"], **kw)
        lo = torch.minimum(weight_R * slope_lo, weight_R * slope_hi)
        hi = torch.maximum(weight_R * slope_lo, weight_R * slope_hi)
    # w as the backward receives it (rounded to the sums' dtype), the product and the sum
    magnitude = w.abs() + torch.maximum(lo.abs(), hi.abs())
    lo = w + lo - 3 * u["u_acc"] * magnitude
    hi = w + hi + 3 * u["u_acc"] * magnitude
    return bounds.backprojection(spec, lo, hi, V64, u_acc=u["u_acc"], u_out=bounds.U[x.dtype])


def check_spectrum(x, V, *, backend, compute_dtype=None, weights=None, what="projected_spectrum"):
    """``projected_spectrum`` of ``x`` in ``V`` and the gradient of ``weights . lam`` (a
    linspace by default) within the oracle's bounds. Returns ``lam`` as float64."""
    x64, V64 = x.detach().double().cpu(), V.detach().double().cpu()
    spec = bounds.spectrum_bound(x64, V64, **roundoffs(x.dtype, backend, compute_dtype))
    leaf = x.detach().requires_grad_(True)
    lam = projected_spectrum(leaf, V, backend=backend, compute_dtype=compute_dtype,
                             validate="off")  # fmt: skip
    assert lam.shape == (V.shape[1],)
    assert lam.dtype == (torch.float64 if x.dtype == torch.float64 else torch.float32)
    ref = oracle.spectrum(x64, V64)
    bounds.assert_within(lam.detach(), ref, spec.dlam + bounds.U[lam.dtype] * ref.abs(),
                         f"{what} values")  # fmt: skip
    # the gradient of a linear functional w . lam is 2 / (B - 1) (Z * w) V^T
    w = weights if weights is not None else torch.linspace(-1.0, 2.0, lam.shape[0])
    w = w.double().cpu()
    (grad,) = torch.autograd.grad(lam, leaf, w.to(lam.dtype).to(lam.device))
    (grad_ref,) = torch.autograd.grad(oracle.spectrum(x64.requires_grad_(True), V64), x64, w)
    G, dG = expected_weighted_gradient(x, V, backend=backend, weights_lam=w,
                                       compute_dtype=compute_dtype)  # fmt: skip
    bounds.assert_within(grad_ref, G, dG, "the oracle's spectrum gradient in its bound")
    bounds.assert_within(grad, G, dG, f"{what} gradient",
                         floor=bounds.subnormal_spacing(x.dtype))  # fmt: skip
    return lam.detach().double()


def check_powerlaw(lam, *, backend, assume=_required, **settings):
    """``powerlaw_penalty`` of a given spectrum ``lam [N]`` (any order): value and gradient
    within the oracle's bounds (the implementation sees exactly these values, so the
    spectrum's own bound is 0). Returns ``(value, grad)`` as float64."""
    kw = penalty_settings(**settings)
    lam64 = lam.detach().double().cpu()
    u_acc = bounds.accumulation_roundoff(lam.dtype)
    zero = torch.zeros_like(lam64)
    R, g_ref = oracle.spectrum_penalty_and_grad(lam64, **kw)
    lo, hi = bounds.slope_interval(lam64, zero, u_acc=u_acc, **kw)
    mid, rad = (lo + hi) / 2, (hi - lo) / 2
    rad = rad + bounds.U[lam.dtype] * (mid.abs() + rad)  # the gradient in lam's dtype
    # a slope beyond a half type's range is returned as inf (torch's rule for a gradient in
    # the input's dtype)
    assume(float((mid.abs() + rad).max()) < torch.finfo(lam.dtype).max / 2,
           "a slope beyond the spectrum dtype's range")  # fmt: skip
    leaf = lam.detach().to(DEVICE).requires_grad_(True)
    value = powerlaw_penalty(leaf, backend=backend, validate="immediate", **kw)
    (grad,) = torch.autograd.grad(value, leaf)
    dR = bounds.penalty_bound(lam64, zero, u_acc=u_acc, **kw)
    bounds.assert_within(value.detach(), R, dR + bounds.U[value.dtype] * abs(float(R)),
                         "powerlaw_penalty value",
                         floor=bounds.subnormal_spacing(value.dtype))  # fmt: skip
    bounds.assert_within(g_ref, mid, rad, "the oracle's slope in its interval")
    bounds.assert_within(grad, mid, rad, "powerlaw_penalty gradient",
                         floor=bounds.subnormal_spacing(lam.dtype))  # fmt: skip
    return value.detach().double(), grad.double()


def _covariance_operand_roundoff(dtype: torch.dtype, backend: str) -> float:
    """The centred values are rounded to x's dtype (16-bit too: unlike the penalty, whose
    float16 GEMMs run at TF32); float32 at TF32 where torch's matmul precision allows it."""
    if dtype in (torch.float16, torch.bfloat16):
        return bounds.U[dtype]
    return bounds.operand_roundoff(dtype, DEVICE, backend)


def check_covariance(x, *, backend, **kwargs):
    """``batch_covariance(x [B, N])`` within the bound of its rounding of the float64
    covariance of the same rounded input; returns it as float64."""
    out = batch_covariance(x, backend=backend, **kwargs)
    assert out.shape == (x.shape[1],) * 2
    assert out.dtype == (torch.float64 if x.dtype == torch.float64 else torch.float32)
    sigma, bound = bounds.covariance_bound(x.cpu(), u_op=_covariance_operand_roundoff(
        x.dtype, backend), u_acc=bounds.accumulation_roundoff(x.dtype))  # fmt: skip
    bounds.assert_within(out, sigma, bound, f"batch_covariance ({x.dtype}, {backend})")
    return out.double()


def check_covariance_gradient(x, w, *, backend):
    """The gradient of ``sum(batch_covariance(x) * w)`` (``w [N, N]`` float64) in x's dtype,
    within its bound."""
    leaf = x.detach().clone().requires_grad_()
    (batch_covariance(leaf, backend=backend).double() * w).sum().backward()
    assert leaf.grad.dtype == x.dtype
    G, dG = bounds.covariance_gradient_bound(x.cpu(), w.cpu(), u_out=bounds.U[x.dtype],
                                             u_acc=bounds.accumulation_roundoff(x.dtype))
    bounds.assert_within(leaf.grad, G, dG, f"batch_covariance gradient ({x.dtype}, {backend})")


def check_column_mean(mean, x):
    """A column mean ``[N]`` of ``x [B, N]`` within a B-term sum's rounding of the exact one."""
    x64 = x.double().cpu()
    u = bounds.accumulation_roundoff(x.dtype)
    bounds.assert_within(mean, x64.mean(0), bounds.mean_bound(x64, u_acc=u), "column mean")
