"""The oracle (tests/oracle.py) checked by hand, then the package's float64 baselines
(powerlaw_fast/baselines.py) checked against it like any other implementation."""

from __future__ import annotations

import math

import pytest
import torch

from powerlaw_fast import baselines
from tests import bounds, oracle

U64 = bounds.U[torch.float64]


# --------------------------------------------------------------------------------------------
# the oracle on cases computed by hand
# --------------------------------------------------------------------------------------------
def test_oracle_two_value_spectrum_by_hand():
    # N = 2, tau = 1, alpha = 1: kappa = lam_1, gam_2 = lam_1 / 2, r_2 = 2 lam_2 / lam_1
    lam = torch.tensor([4.0, 3.0], dtype=torch.float64)  # r_2 = 1.5
    R, g = oracle.spectrum_penalty_and_grad(lam, tau=1, beta=2.0)
    # R = beta / 2 ((1.5 - 1)^2 + 0.5) = 0.75; dR/dlam_2 = beta / 2 (2 * 0.5 + 1) / gam_2 = 1
    assert float(R) == 0.75
    assert g.tolist() == [0.0, 1.0]  # the anchor: kappa is a constant
    # in the other order, and below the target (r_2 = 0.5: no relu)
    R, g = oracle.spectrum_penalty_and_grad(torch.tensor([1.0, 4.0], dtype=torch.float64), tau=1)
    assert float(R) == 0.5 * 0.25 and g.tolist() == [0.5 * 2 * -0.5 / 2.0, 0.0]


def test_oracle_conventions_by_hand():
    lam = torch.tensor([4.0, -1.0], dtype=torch.float64)  # r_2 = -0.5
    assert float(oracle.penalty_from_spectrum(lam, tau=1)) == 0.5 * 2.25
    assert float(oracle.penalty_from_spectrum(lam, tau=0, convention="authors")) == 0.0
    # authors' tau = 0 is the paper's tau = 1 when every value is positive
    lam = torch.tensor([5.0, 1.0, 3.0], dtype=torch.float64)
    assert float(oracle.penalty_from_spectrum(lam, tau=0, convention="authors")) == float(
        oracle.penalty_from_spectrum(lam, tau=1)
    )
    # three values, tau = 1: sorted 5, 3, 1; gam = 5, 2.5, 5/3; r = 1, 1.2, 0.6
    # -> ((0.2^2 + 0.2) + 0.4^2) / 3
    assert math.isclose(float(oracle.penalty_from_spectrum(lam, tau=1)), 0.4 / 3, rel_tol=8 * U64)
    # tau = N: nothing to sum
    R, g = oracle.spectrum_penalty_and_grad(lam, tau=3)
    assert float(R) == 0.0 and not g.any()


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("tau", [1, 4, 10])
def test_oracle_exact_power_law_costs_nothing(alpha, tau):
    n = torch.arange(1, 21, dtype=torch.float64)
    lam = (3.0 * n**-alpha)[torch.randperm(20, generator=torch.Generator().manual_seed(tau))]
    R, g = oracle.spectrum_penalty_and_grad(lam, alpha=alpha, tau=tau, beta=5.0)
    # each r_n = 1 to a few ulps: R is a sum of squares of rounding errors plus relu(ulps)
    assert 0.0 <= float(R) < 20 * 16 * U64
    # every term sits on the relu's kink: its slope is beta / N [r > 1] / gam_n, where
    # r = 1 +- ulps decides [r > 1] (the subgradient at the kink is anything in between)
    gam = 3.0 * n**-alpha
    slope_scale = 5.0 / 20 / gam[torch.argsort(torch.argsort(lam, descending=True))]
    assert bool((g >= -1e-13 * slope_scale).all() and (g <= slope_scale * (1 + 1e-12)).all())


def test_oracle_anchor_has_exactly_zero_slope():
    # V = I, tau = N: R is identically 0 (the anchor's own term), so is its gradient
    x = torch.randn(100, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    R, g = oracle.penalty_and_grad(x, torch.eye(7), tau=7)
    assert float(R) == 0.0 and not g.any()
    lam = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)
    for alpha in (0.3, 1.0, 1.7, 2.9):  # (tau / n)^alpha at n = tau is 1 +- ulps in general
        g = oracle.spectrum_penalty_and_grad(lam, alpha=alpha, tau=2)[1]
        assert g[1] == 0.0


def test_oracle_spectrum_is_the_variance_along_each_direction():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(50, 6, generator=g, dtype=torch.float64) * 3 + 7
    torch.testing.assert_close(oracle.spectrum(x, torch.eye(6)), x.var(0), rtol=1e-13, atol=0)
    q = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))[0]
    # the projection form of DESIGN.md: ||(x - mu) v_n||^2 / (B - 1)
    z = (x - x.mean(0)) @ q
    torch.testing.assert_close(oracle.spectrum(x, q), (z**2).sum(0) / 49, rtol=1e-12, atol=0)


def test_oracle_gradient_is_the_closed_form_of_design():
    # dR/dx = 2 / (B - 1) (Z * g) V^T, g = dR/dlam (DESIGN.md section 2)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(40, 9, generator=g, dtype=torch.float64) * torch.arange(1, 10) ** -0.7
    V = torch.linalg.qr(torch.randn(9, 9, generator=g, dtype=torch.float64))[0]
    for convention, tau in (("paper", 3), ("authors", 2)):
        _, grad = oracle.penalty_and_grad(x, V, tau=tau, alpha=1.3, convention=convention)
        _, g_lam = oracle.spectrum_penalty_and_grad(
            oracle.spectrum(x, V), tau=tau, alpha=1.3, convention=convention
        )
        z = (x - x.mean(0)) @ V
        torch.testing.assert_close(grad, 2 / 39 * (z * g_lam) @ V.T, rtol=1e-12, atol=1e-15)


def test_oracle_is_bracketed_by_the_bounds_helper():
    # the slope interval (tests/bounds.py step 5) contains the oracle's own slope, and with an
    # exact spectrum and no tie or kink it is a single point
    lam = torch.tensor([5.0, 1.0, 3.0, 0.2, 2.5], dtype=torch.float64)
    for convention in ("paper", "authors"):
        kw = dict(alpha=1.4, tau=2, beta=1.5, convention=convention)
        lo, hi = bounds.slope_interval(lam, torch.zeros(5, dtype=torch.float64), u_acc=U64, **kw)
        _, g = oracle.spectrum_penalty_and_grad(lam, **kw)
        assert bool(((lo <= g) & (g <= hi)).all())
        assert float((hi - lo).max()) < 1e-14


# --------------------------------------------------------------------------------------------
# the package's float64 baselines against the oracle
# --------------------------------------------------------------------------------------------
def _batch(B, N, seed, *, decay=0.5, mean=0.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(N, N, generator=g, dtype=torch.float64))[0]
    scales = torch.arange(1, N + 1, dtype=torch.float64) ** -decay
    x = mean + (torch.randn(B, N, generator=g, dtype=torch.float64) * scales) @ q.T
    return x, q


CASES = [  # B, N, tau, alpha, beta, decay, mean, seed
    (50, 12, 3, 1.0, 1.0, 0.5, 0.0, 0), (8, 12, 2, 2.0, 2.0, 1.0, 0.0, 1),
    (200, 30, 10, 1.0, 5.0, 1.5, 100.0, 2), (31, 7, 7, 0.7, 1.0, 0.2, 0.0, 3),
    (64, 20, 1, 1.5, 0.5, 0.5, -3.0, 4), (12, 5, 4, 1.0, 1.0, 0.0, 0.0, 5),
]  # fmt: skip


def _expected(x, V, route, **kw):
    spec = bounds.spectrum_bound(x, V, u_op=U64, u_acc=U64, route=route)
    R, grad = oracle.penalty_and_grad(x, V, **kw)
    dR = bounds.penalty_bound(spec.lam, spec.dlam, u_acc=U64, **kw)
    lo, hi = bounds.slope_interval(spec.lam, spec.dlam, u_acc=U64, **kw)
    G, dG = bounds.backprojection(spec, lo, hi, V, u_acc=U64, u_out=U64)
    bounds.assert_within(grad, G, dG, "the oracle's gradient in its own bound")
    return R, dR, G, dG


NAMES = ["literal_penalty", "projection_penalty", "covariance_penalty", "authors_loop_penalty"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("B,N,tau,alpha,beta,decay,mean,seed", CASES)
def test_baseline_penalty_matches_the_oracle(name, B, N, tau, alpha, beta, decay, mean, seed):
    x, V = _batch(B, N, seed, decay=decay, mean=mean)
    authors = name == "authors_loop_penalty"
    if authors and tau == N:
        tau = N - 1
    kw = dict(alpha=alpha, tau=tau, beta=beta)
    conv = "authors" if authors else "paper"
    route = "projection" if name == "projection_penalty" else "covariance"
    R, dR, G, dG = _expected(x, V, route, convention=conv, **kw)
    leaf = x.clone().requires_grad_(True)
    value = getattr(baselines, name)(leaf, V, **kw)
    bounds.assert_within(value.detach(), R, dR, f"{name} value")
    if value.requires_grad:
        grad = torch.autograd.grad(value, leaf, allow_unused=True)[0]
    else:  # the authors' loop with no term (tau = N - 1) returns a constant
        assert tau == N - 1, f"{name} lost its gradient"
        grad = None
    grad = torch.zeros_like(x) if grad is None else grad
    bounds.assert_within(grad, G, dG, f"{name} gradient")


@pytest.mark.parametrize("B,N,tau,alpha,beta,decay,mean,seed", CASES)
def test_baseline_spectrum_matches_the_oracle(B, N, tau, alpha, beta, decay, mean, seed):
    x, V = _batch(B, N, seed, decay=decay, mean=mean)
    spec = bounds.spectrum_bound(x, V, u_op=U64, u_acc=U64, route="covariance")
    ref = oracle.spectrum(x, V)
    bounds.assert_within(ref, spec.lam, spec.dlam, "oracle spectrum vs the projection form")
    bounds.assert_within(baselines.literal_spectrum(x, V), ref, spec.dlam, "literal_spectrum")


@pytest.mark.parametrize("B,N,tau,alpha,beta,decay,mean,seed", CASES)
def test_eigvalsh_baseline_is_the_oracle_in_the_batch_eigenbasis(
    B, N, tau, alpha, beta, decay, mean, seed
):
    x, _ = _batch(B, N, seed, decay=decay, mean=mean)
    if B <= N:
        pytest.skip("a rank-deficient batch: its eigenbasis is not unique")
    V = torch.linalg.eigh(torch.cov(x.T))[1]
    kw = dict(alpha=alpha, tau=tau, beta=beta)
    R, dR, _, _ = _expected(x, V, "covariance", **kw, convention="paper")
    # eigvalsh's eigenvalues are backward-stable: within gamma_N ||Sigma|| of exact, on top
    # of the covariance's own rounding
    extra = bounds.gamma(4 * N, U64) * float(torch.linalg.matrix_norm(torch.cov(x.T), 2))
    lam = oracle.spectrum(x, V)
    dR = bounds.penalty_bound(lam, bounds.spectrum_bound(x, V, u_op=U64, u_acc=U64,
                                                         route="covariance").dlam + extra,
                              u_acc=U64, convention="paper", **kw)  # fmt: skip
    bounds.assert_within(baselines.eigvalsh_penalty(x, None, **kw), R, dR, "eigvalsh_penalty")


@pytest.mark.parametrize(
    "lam",
    [
        [4.0, 3.0],
        [5.0, 1.0, 3.0, 0.2, 2.5, 2.5, 0.0],  # a tie, a zero
        [1.0 / n for n in range(1, 30)],  # near the kink everywhere
        [2.0**-k for k in range(12)],
    ],
)
@pytest.mark.parametrize("tau,alpha", [(1, 1.0), (2, 1.0), (3, 0.6), (2, 2.5)])
def test_baseline_penalty_from_spectrum_matches_the_oracle(lam, tau, alpha):
    lam = torch.tensor(lam, dtype=torch.float64)
    if tau > lam.shape[0]:
        pytest.skip("tau beyond N")
    convention = "paper"  # penalty_from_spectrum has the paper's convention only
    kw = dict(alpha=alpha, tau=tau, beta=2.0, convention=convention)
    zero = torch.zeros_like(lam)
    R, g = oracle.spectrum_penalty_and_grad(lam, **kw)
    leaf = lam.clone().requires_grad_(True)
    kw.pop("convention")
    value = baselines.penalty_from_spectrum(leaf, **kw)
    bounds.assert_within(value.detach(), R, bounds.penalty_bound(
        lam, zero, u_acc=U64, convention=convention, **kw), "penalty_from_spectrum")  # fmt: skip
    lo, hi = bounds.slope_interval(lam, zero, u_acc=U64, convention=convention, **kw)
    (grad,) = torch.autograd.grad(value, leaf)
    bounds.assert_within(grad, (lo + hi) / 2, (hi - lo) / 2, "penalty_from_spectrum slope")
    bounds.assert_within(g, (lo + hi) / 2, (hi - lo) / 2, "the oracle's slope in the interval")
