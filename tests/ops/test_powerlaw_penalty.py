"""ops/powerlaw_penalty.py: eq. (2) on a given spectrum, every backend against the oracle
(tests/oracle.py), both conventions, and its argument checks."""

from __future__ import annotations

import pytest
import torch

from powerlaw_fast import powerlaw_penalty
from powerlaw_fast.ops import status
from tests import bounds, oracle
from tests.devices import BACKENDS, DEVICE, raises_validation
from tests.ops.oracle_checks import check_powerlaw


def _spectra():
    g = torch.Generator().manual_seed(3)
    yield "random", torch.rand(57, generator=g, dtype=torch.float64) + 0.01
    yield "near 1/n", (1 / torch.arange(1, 65, dtype=torch.float64)) * (
        1 + 0.1 * torch.randn(64, generator=g, dtype=torch.float64)
    ).abs()
    yield "ties", torch.tensor([3.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.2], dtype=torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("convention", ["paper", "authors"])
@pytest.mark.parametrize("name,lam", list(_spectra()))
def test_matches_the_oracle(backend, convention, name, lam):
    kw = dict(alpha=1.3, tau=3, beta=2.0, convention=convention)
    R, G = oracle.spectrum_penalty_and_grad(lam, **kw)
    leaf = lam.float().to(DEVICE).requires_grad_(True)
    value = powerlaw_penalty(leaf, backend=backend, **kw)
    value.backward()
    # float32: the ratios and the rank ratio are a few ulp off (eps (3 + 2 alpha log N)), the
    # sum of N terms adds N eps: a relative bound of 64 (N + 10) eps covers both with margin
    eps = 2.0**-23
    bound = 64 * (lam.numel() + 10) * eps
    assert abs(float(value) - float(R)) <= bound * abs(float(R)) + 1e-12
    assert float((leaf.grad.double().cpu() - G).norm()) <= bound * float(G.norm()) + 1e-12


def test_arguments_are_checked():
    lam = torch.rand(10) + 0.1
    with pytest.raises(ValueError, match=r"lam: expected a 1-D spectrum \[N\]"):
        powerlaw_penalty(lam.reshape(2, 5))
    with pytest.raises(ValueError, match="tau"):
        powerlaw_penalty(lam, tau=11)
    with pytest.raises(ValueError, match="alpha"):
        powerlaw_penalty(lam, alpha=0.0)
    with pytest.raises(ValueError, match="convention"):
        powerlaw_penalty(lam, convention="other")


# --------------------------------------------------------------------------------------------
# Arguments, dtypes and layouts
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,error,match", [
    (dict(lam=[1.0, 0.5]), TypeError, "lam: expected a torch.Tensor, got list"),
    (dict(lam=torch.tensor(1.0)), ValueError, r"lam: expected a 1-D spectrum .*got shape \(\)"),
    (dict(lam=torch.ones(0)), ValueError, r"lam: expected a 1-D spectrum \[N\], got shape \(0,"),
    (dict(lam=torch.arange(1, 6)), TypeError, "^lam: expected a floating dtype .*got torch.int64"),
    (dict(tau=0), ValueError, r"tau: expected an integer in 1\.\.5 \(1-indexed rank"),
    (dict(tau=5, convention="authors"), ValueError, r"tau: expected an integer in 0\.\.4"),
    (dict(alpha=-1.0), ValueError, "alpha: expected a finite number > 0.0"),
    (dict(alpha=float("nan")), ValueError, "alpha: expected a finite number"),
    (dict(beta=-0.5), ValueError, "beta: expected a finite number >= 0.0"),
    (dict(beta=1e39), ValueError, r"alpha, beta: .* beta = 1e\+39 \(expected beta <= 3.4e\+38"),
    (dict(validate="sometimes"), TypeError, "validate: expected True, False or one of"),
    (dict(backend="numpy"), ValueError, "backend: expected one of"),
    (dict(convention="Paper"), ValueError, "convention: expected one of"),
])  # fmt: skip
def test_bad_arguments_are_refused_naming_the_argument(kwargs, error, match):
    kw = dict(lam=torch.tensor([4.0, 2.0, 1.0, 0.5, 0.25]), tau=2) | kwargs
    with pytest.raises(error, match=match):
        powerlaw_penalty(kw.pop("lam"), **kw)


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs triton")
def test_a_float64_spectrum_is_refused_by_the_triton_backend():
    with pytest.raises(TypeError, match="^backend='triton': expected float32, float16 or "
                                        "bfloat16 tensors, got float64"):  # fmt: skip
        powerlaw_penalty(torch.tensor([2.0, 1.0], dtype=torch.float64, device=DEVICE), tau=1,
                         backend="triton")  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_one_value_spectrum_costs_nothing(backend):
    """N = 1 is accepted: the anchor is the only value, whose term is 0 in value and slope."""
    leaf = torch.tensor([3.0], device=DEVICE, requires_grad=True)
    value = powerlaw_penalty(leaf, tau=1, backend=backend)
    value.backward()
    assert float(value) == 0.0 and leaf.grad.tolist() == [0.0]


def _spectrum(N=24, seed=4, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    noise = 1 + 0.3 * torch.rand(N, generator=g, dtype=torch.float64)
    lam = torch.arange(1, N + 1, dtype=torch.float64) ** -1.2 * noise
    return lam[torch.randperm(N, generator=g)].to(dtype)


@pytest.mark.parametrize("dtype,backend", [(torch.float16, b) for b in BACKENDS]
                         + [(torch.bfloat16, b) for b in BACKENDS]
                         + [(torch.float64, "torch"), (torch.float64, "auto")])  # fmt: skip
def test_sixteen_bit_spectra_are_computed_in_float32_and_float64_in_float64(dtype, backend):
    """A 16-bit spectrum: the penalty in float32, its gradient in lam's dtype; float64 stays
    float64 (the "auto" backend picks one that computes it). Both within the oracle's bounds."""
    lam = _spectrum(dtype=dtype).to(DEVICE)
    leaf = lam.clone().requires_grad_()
    value = powerlaw_penalty(leaf, tau=3, alpha=1.2, backend=backend)
    value.backward()
    assert value.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert leaf.grad.dtype == dtype
    check_powerlaw(lam, backend=backend, tau=3, alpha=1.2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_strided_spectrum_is_read_by_its_strides(backend):
    wide = _spectrum(N=40, seed=5).to(DEVICE)
    check_powerlaw(wide[::2], backend=backend, tau=4, alpha=0.9, beta=1.5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("convention", ["paper", "authors"])
def test_nonpositive_values_are_skipped_by_the_authors_convention_only(backend, convention):
    """The "authors" convention leaves values <= 0 out of the sum (their code's mask); "paper"
    keeps them: each within the oracle's bounds of its own convention."""
    lam = torch.tensor([5.0, 3.0, 2.0, 0.0, 1.0, -0.5, 0.25, 0.0], device=DEVICE)
    value, grad = check_powerlaw(lam, backend=backend, tau=2, convention=convention)
    assert (grad[[3, 5, 7]] == 0).all() == (convention == "authors")


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_upstream_gradient_scales_the_slope(backend):
    lam = _spectrum(N=16, seed=6)
    kw = dict(alpha=1.1, tau=3, beta=2.0, convention="paper")
    _, G = oracle.spectrum_penalty_and_grad(lam.double(), **kw)
    leaf = lam.to(DEVICE).requires_grad_(True)
    (-3.0 * powerlaw_penalty(leaf, backend=backend, **kw)).backward()
    # the slope within float32's few ulps (the bound of test_matches_the_oracle), times -3
    bound = 64 * (16 + 10) * 2.0**-23 * float(G.abs().max()) * 3
    bounds.assert_within(leaf.grad, -3.0 * G, torch.full_like(G, bound), "-3 dR/dlam")


# --------------------------------------------------------------------------------------------
# Errors from the status words
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lam,kw,match", [
    ([4.0, float("nan"), 1.0, float("inf")], dict(tau=1),
     "lam: expected finite values, got 2 non-finite values"),
    ([4.0, 2.0, 0.0, 0.0, 0.0], dict(tau=3),
     r"lam: the batch is rank-deficient for tau = 3: the 3-th largest value of the spectrum "
     r"\(the anchor\) is zero.*smaller tau($| \[found)"),
    ([4.0, 2.0, 0.0, 0.0, 0.0], dict(tau=3, convention="authors"),
     r"lam: the batch is rank-deficient for tau = 3: the 4-th largest value of the spectrum"),
    ([1e-35, 5e-36, 2e-36], dict(tau=1),
     "lam: the spectrum's values are too small for float32"),
    ([4.0, 2.0, 1.0] + [0.5] * 37, dict(tau=1, alpha=30.0, beta=0.5),
     r"alpha, beta: the penalty or its gradient is not finite in float32 with alpha = 30.0 "
     r"and beta = 0.5 \("),
])  # fmt: skip
def test_bad_spectra_are_errors_that_name_lam(deferral, backend, lam, kw, match):
    with raises_validation(match):
        powerlaw_penalty(torch.tensor(lam, device=DEVICE), backend=backend, **kw)


def test_a_deferred_error_names_powerlaw_penalty_and_the_next_call_raises_it():
    bad = torch.tensor([4.0, float("nan"), 1.0])
    with status.simulate_deferral():
        powerlaw_penalty(bad, tau=1)  # returns; its check is pending
        with pytest.raises(status.DeferredValidationError,
                           match=r"lam: expected finite values, got 1 non-finite values \[found "
                                 r"by the deferred check of call #\d+ \(powerlaw_penalty\)"):
            powerlaw_penalty(torch.tensor([4.0, 2.0, 1.0]), tau=1)  # polls first


@pytest.mark.parametrize("dtype,backend", [(torch.float32, b) for b in BACKENDS]
                         + [(torch.float64, "torch")])  # fmt: skip
def test_the_op_passes_opcheck(dtype, backend):
    """The custom op's fake scratch (torch.compile's shapes) agrees with the real one."""
    from powerlaw_fast.ops._settings import Settings
    from powerlaw_fast.ops.powerlaw_penalty import POWERLAW_PENALTY

    lam = _spectrum(N=12, seed=7, dtype=dtype).to(DEVICE).requires_grad_()
    settings = Settings(backend=backend, anchor=2, alpha=1.0, beta=1.0, skip_nonpositive=False,
                        validate="immediate", source="lam", tau=3)
    torch.library.opcheck(POWERLAW_PENALTY.custom_op, ([lam], *settings))
    (scratch,) = POWERLAW_PENALTY.custom_op([lam.detach()], *settings)
    assert scratch.shape == (4 + 2 * 12,)


# --------------------------------------------------------------------------------------------
# finish_spectrum_torch: row-block moments -> the spectrum and Z's column means
# --------------------------------------------------------------------------------------------
def test_finish_spectrum_sums_the_row_blocks_and_zeroes_only_rounding_noise():
    """``lam = (S2 - S1^2 / B) / (B - 1)`` and ``S1 / B`` from ``[2, M, N]`` row-block sums;
    a difference at or below ``mean_tol * S2`` is rounding (0), one well above it is kept, and
    an infinite S2 stays infinite (an overflow is reported, not zeroed)."""
    from powerlaw_fast.ops.powerlaw_penalty import finish_spectrum_torch

    B, tol = 3, 1e-6
    # columns: Z = [1, 3, 5] and [2, 4, 7] in two blocks; S2 - S1^2 / B = 0.25 on 3e6 (noise,
    # 0.25 <= tol * S2 = 3); the same difference 400x the threshold; S2 overflowed
    s1 = torch.tensor([[1.0 + 3.0, 2.0 + 4.0, 2000.0, 2000.0, 1.0],
                       [5.0, 7.0, 1000.0, 1000.0, 1.0]])  # fmt: skip
    s2 = torch.tensor([[1.0 + 9.0, 4.0 + 16.0, 2e6, 2e6 + 1200.0, float("inf")],
                       [25.0, 49.0, 1e6 + 0.25, 1e6, 1.0]])  # fmt: skip
    moments = torch.stack([s1, s2])
    lam, zbar = finish_spectrum_torch(moments, B, tol)
    S1, S2 = s1.double().sum(0), s2.double().sum(0)
    want = (S2 - S1 * S1 / B) / (B - 1)
    # each entry: two 2-term sums, a product, a quotient and a difference, and the final
    # quotient, relative to the terms' magnitude (float32)
    scale = (S2.abs() + S1 * S1 / B) / (B - 1)
    bound = bounds.gamma(6, bounds.U[torch.float32]) * scale[:4]
    bounds.assert_within(lam[:2], want[:2], bound[:2], "lam")
    assert float(lam[2]) == 0.0  # within the rounding of S2: zero
    bounds.assert_within(lam[3:4], want[3:4], bound[3:4], "lam above the threshold")
    assert float(lam[4]) == float("inf")
    bounds.assert_within(zbar, S1 / B, bounds.gamma(2, bounds.U[torch.float32]) * S1.abs() / B,
                         "S1 / B")  # fmt: skip


def test_finish_spectrum_zeroes_a_difference_exactly_at_the_threshold():
    """``S2 - S1^2 / B <= mean_tol * S2`` is rounding, the boundary included: S1 = 6, S2 = 16,
    B = 3 (exact in float32) leave 4 = 0.25 * 16."""
    from powerlaw_fast.ops.powerlaw_penalty import finish_spectrum_torch

    moments = torch.tensor([[[6.0, 6.0]], [[16.0, 16.0]]])
    lam, _ = finish_spectrum_torch(moments, 3, 0.25)
    assert float(lam[0]) == 0.0
    lam, _ = finish_spectrum_torch(moments, 3, 0.25 - 2.0**-20)  # just below: kept, 4 / 2
    assert float(lam[0]) == 2.0


def test_finish_spectrum_takes_the_count_as_a_tensor():
    """After an all-reduce the row count is a 0-dim tensor."""
    from powerlaw_fast.ops.powerlaw_penalty import finish_spectrum_torch

    moments = torch.tensor([[[4.0, 6.0]], [[10.0, 20.0]]])
    lam, zbar = finish_spectrum_torch(moments, torch.tensor(2.0), 1e-6)
    assert lam.tolist() == [2.0, 2.0] and zbar.tolist() == [2.0, 3.0]
