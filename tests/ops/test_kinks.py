"""Where one ulp could flip a branch of eq. (2), every backend decides the same way on purpose
(powerlaw_fast/ops/spectral_penalty.py, ``spectrum_penalty_torch``), whatever the platform's
float32 ``log``/``exp``: the anchor's own term has no slope, an exact power law sits on the
relu's kink with slope 0, and ties sort by column.

Every test runs twice (the ``libm`` fixture of tests/conftest.py): with this machine's libm
and with every float32 ``log``/``exp`` result moved one ulp up, as a CPU with a less exact
vectorised libm returns (an AMD EPYC's AVX2 path was seen to do so). Before the fix, the
anchor's rank ratio came out as 1 + 1 ulp there and the anchor got a relu slope: these tests
failed on the torch backend.
"""

from __future__ import annotations

import math

import pytest
import torch

from powerlaw_fast import powerlaw_penalty, spec_penalty
from tests.devices import BACKENDS, DEVICE, value_and_grad
from tests.ops.oracle_checks import check_penalty, check_powerlaw
from tests.ops.test_spec_penalty import make_batch


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("N", [7, 12])
def test_the_anchor_alone_has_zero_value_and_zero_gradient(backend, N, libm):
    # tau = N: the sum is the anchor's own term, identically 0 in value and slope
    x = torch.randn(100, N, generator=torch.Generator().manual_seed(N)).to(DEVICE)
    value, grad = value_and_grad(spec_penalty, x, torch.eye(N, device=DEVICE), tau=N,
                                 backend=backend)  # fmt: skip
    assert float(value) == 0.0
    assert float(grad.abs().max()) == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tau", [1, 7, 30])
def test_the_anchor_gets_no_gradient_from_a_given_spectrum(backend, tau, libm):
    g = torch.Generator().manual_seed(tau)
    lam = (torch.rand(40, generator=g) + 0.1).to(DEVICE)
    leaf = lam.clone().requires_grad_(True)
    powerlaw_penalty(leaf, tau=tau, backend=backend).backward()
    anchor_column = int(lam.argsort(descending=True)[tau - 1])
    assert float(leaf.grad[anchor_column]) == 0.0
    assert float(leaf.grad.abs().sum()) > 0.0  # the other terms do have slopes


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tau", [7, 47])
def test_a_near_power_law_spectrum_matches_float64(backend, tau, libm):
    # B = 512 rows with a 1/n spectrum over N = 64: many r_n close to 1, the anchor's included
    x, V = make_batch(512, 64, seed=tau, decay=0.5)  # lam_n ~ 1/n
    # terms within the rounding of the kink are bracketed by the oracle's slope interval
    check_penalty(x, V, backend=backend, tau=tau)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alpha", [1.0, 0.7, 2.0])
def test_an_exact_power_law_costs_nothing_and_has_zero_gradient(backend, alpha, libm):
    # every r_n is 1 to rounding: the relu's kink, where the subgradient 0 is taken
    n = torch.arange(1, 65, dtype=torch.float64)
    lam = (3.0 * n ** (-alpha)).float().to(DEVICE)
    leaf = lam.clone().requires_grad_(True)
    value = powerlaw_penalty(leaf, tau=10, alpha=alpha, backend=backend)
    value.backward()
    # r_n = 1 within its float32 rounding, eps (3 + 2 alpha log N) (one rounding of the value
    # and of the ratio, the logs and exp of the rank ratio): the penalty is at most that band
    # and each slope beta / N * 2 (r - 1) / gam_n, far below the relu's step beta / (N gam_n)
    band = 2 * torch.finfo(torch.float32).eps * (3 + 2 * alpha * math.log(64))
    assert float(value) <= band
    gam = float(lam[9]) * (10 / n) ** alpha
    slope_times_gam = leaf.grad.double().cpu() * gam
    assert float(slope_times_gam.abs().max()) <= 2 * band / 64


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_sort_by_column_in_every_backend(backend, libm):
    # columns 2, 5 and 6 tie: sorted positions go to the lower column first
    lam = torch.tensor([5.0, 4.0, 1.0, 3.0, 2.0, 1.0, 1.0, 0.5], device=DEVICE)
    _, grad = check_powerlaw(lam, backend=backend, tau=2)
    order = [0, 1, 3, 4, 2, 5, 6, 7]  # stable descending order
    assert torch.sort(lam, descending=True, stable=True).indices.tolist() == order
    # the three tied values sit at ranks 5, 6, 7 in column order: the slopes of
    # 2 (r - 1) / gam at their targets 5 / n (tau = 2, kappa = 4 * 2), exactly
    # (r_n = n / 8), within the float32 rounding of r (the rank ratio's logs and exp: about
    # u (6 + 8 log N)) amplified by the cancellation in r - 1, r / |r - 1| <= 7
    expected = [2 * (n / 8 - 1) / (8 / n) / 8 for n in (5, 6, 7)]
    rtol = 2 * 2.0**-24 * (6 + 8 * math.log(8)) * 7
    torch.testing.assert_close(grad[[2, 5, 6]].cpu(), torch.tensor(expected, dtype=torch.float64),
                               rtol=rtol, atol=0)  # fmt: skip


# --------------------------------------------------------------------------------------------
# Thresholds: the anchor test and the underflow test
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_steep_full_rank_spectrum_is_not_called_rank_deficient(backend):
    # lam_n ~ n^-4: at tau = 59 the anchor is 8e-8 of the largest value, above float32's
    # rounding floor for a direction without variance (u^2 of the mean value), far below eps
    x, V = make_batch(512, 64, seed=59, decay=2.0)
    torch.set_float32_matmul_precision("highest")
    check_penalty(x, V, backend=backend, tau=59)  # validate="immediate": no rank error
    # 40 rows in their own eigenbasis: the 59th value is a direction without variance
    few = x[:40]
    own = torch.linalg.eigh(torch.cov(few.double().T))[1].flip(1).float()
    with pytest.raises(ValueError, match="rank-deficient for tau = 59"):
        spec_penalty(few, own, tau=59, backend=backend, validate="immediate")


@pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")
@pytest.mark.parametrize("backend", BACKENDS)
def test_activations_too_small_for_float32_are_reported_as_such(backend):
    x, V = make_batch(100, 12, seed=3)
    with pytest.raises(ValueError, match="too small for float32") as info:
        spec_penalty(x * 1e-22, V, tau=3, backend=backend, validate="immediate")
    assert "alpha, beta" not in str(info.value)
    spec_penalty(x * 1e-12, V, tau=3, backend=backend, validate="immediate")  # scale-free
