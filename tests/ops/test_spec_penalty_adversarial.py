"""Inputs a hostile user would try: large means, steep spectra, float16 near its range,
overflow, absurd settings. Each case failed before the per-direction centring correction
(which replaced a noise floor proportional to ||mean||^2) or the overflow checks."""

from __future__ import annotations

import pytest
import torch

from powerlaw_fast import batch_covariance, spec_penalty
from tests.devices import BACKENDS, DEVICE, raises_validation, value_and_grad
from tests.ops.oracle_checks import check_penalty, check_spectrum
from tests.ops.test_spec_penalty import make_batch


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_mean_keeps_float32_accuracy(backend):
    # N = 128, B = 400, mean 100, lam_n ~ n^-2.5: the old floor zeroed 59 eigenvalues (R 11x)
    x, V = make_batch(400, 128, mean=100.0, decay=1.25, seed=1)
    lam = check_spectrum(x, V, backend=backend)
    assert int((lam == 0).sum()) == 0
    check_penalty(x, V, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_spread_around_a_large_mean_is_not_rank_deficient(backend):
    g = torch.Generator().manual_seed(2)
    x = (100 + 0.003 * torch.randn(400, 300, generator=g)).to(DEVICE)
    V = torch.linalg.eigh(torch.cov(x.double().T))[1].flip(1).float()
    check_penalty(x, V, backend=backend)  # raised "rank-deficient" before


CASES = [  # (B, N, mean, decay, tau, seed): means up to 1e3, spectra as steep as n^-3
    (40, 24, 0.0, 0.5, 3, 0), (97, 61, 1.0, 1.5, 10, 1), (130, 70, 10.0, 1.0, 10, 2),
    (64, 33, 100.0, 0.75, 5, 3), (200, 90, 1000.0, 0.5, 10, 4), (150, 47, 1000.0, 1.5, 4, 5),
    (31, 80, 300.0, 1.0, 10, 6), (256, 128, -500.0, 1.25, 20, 7),
]  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,N,mean,decay,tau,seed", CASES)
def test_fuzz_against_float64_on_the_same_rounded_inputs(backend, B, N, mean, decay, tau, seed):
    x, V = make_batch(B, N, mean=mean, decay=decay, seed=seed)
    # terms near the relu's kink are bracketed by the oracle's slope interval
    check_penalty(x, V, backend=backend, tau=tau)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float16_activations_near_its_range_give_finite_gradients(backend):
    # |x| up to ~8,500 (finite in float16): Z overflowed float16 and 5,120 of 131,072 gradient
    # entries came back non-finite; Z is now float32 and the GEMMs run at TF32. Checked against
    # the oracle on the float16-rounded inputs (input rounding is not the op's error), within
    # the bound of TF32 operands, float32 sums and a float16 gradient (tests/bounds.py).
    from tests import bounds

    x, V = make_batch(256, 64, std=2000.0, seed=8)
    x = x.clamp(-8473, 8473).half()
    V = V.half()
    R, dR, G, dG = bounds.expected_penalty(
        x, V, u_op=bounds.operand_roundoff(torch.float16, DEVICE, backend),
        u_acc=bounds.U[torch.float32], u_out=bounds.U[torch.float16],
        alpha=1.0, tau=10, beta=1.0, convention="paper",
    )  # fmt: skip
    val, grad = value_and_grad(spec_penalty, x, V, backend=backend)
    assert torch.isfinite(grad).all()
    bounds.assert_within(val, R, dR, "float16 value")
    # below float16's normal range the gradient is rounded to its subnormal spacing
    bounds.assert_within(grad, G, dG, "float16 gradient",
                         floor=bounds.subnormal_spacing(torch.float16))  # fmt: skip


@pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")
@pytest.mark.filterwarnings("ignore:overflow encountered in reduce:RuntimeWarning")
@pytest.mark.parametrize("backend", BACKENDS)
def test_overflowing_activations_are_reported_as_non_finite(backend, deferral):
    x, V = make_batch(50, 20, seed=9)
    with raises_validation("non-finite"):
        spec_penalty(x * 1e20, V, tau=3, backend=backend)


@pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kwargs", [dict(alpha=1e6), dict(beta=1e308)])
def test_overflowing_settings_raise_instead_of_returning_inf(backend, kwargs, deferral):
    x, V = make_batch(50, 20, seed=10)
    message = "alpha, beta: the penalty or its gradient is not finite"
    # a beta beyond float32 is refused on the host, before any work; alpha only on the device
    expect = pytest.raises(ValueError, match=message) if "beta" in kwargs else None
    with expect or raises_validation(message):
        spec_penalty(x, V, tau=3, backend=backend, **kwargs)


def test_authors_convention_on_a_rank_deficient_batch_does_not_depend_on_dtype():
    x, V = make_batch(6, 20, seed=11, device="cpu")
    g = torch.Generator().manual_seed(1)
    V = torch.linalg.qr(torch.randn(20, 20, generator=g, dtype=torch.float64))[0]
    # both within the oracle's bound of their own rounding: the terms a dtype's rounding could
    # move across zero (and so in or out of the authors' sum) are bracketed by the bound
    for dtype in (torch.float64, torch.float32):
        check_penalty(x.to(dtype), V.to(dtype), backend="torch", tau=2, convention="authors")


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_covariance_refuses_non_finite_input(backend, deferral):
    x = torch.randn(20, 6, device=DEVICE)
    x[3, 2] = float("nan")
    with raises_validation("x: expected finite activations, got a covariance"):
        batch_covariance(x, backend=backend)
    assert torch.isnan(batch_covariance(x, backend=backend, validate=False)).any()
