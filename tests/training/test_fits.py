"""training/fits.py at its edges: the windows of fit_power_law (rank 1, two-point windows, a
zero at either end of an explicit window), effective_dimension's threshold edges, and the
messages naming the argument (written against the mutants that survived the older tests:
benchmarks/results/cpu/mutants/training.fits.txt)."""

from __future__ import annotations

import math

import pytest
import torch

from powerlaw_fast.training.fits import effective_dimension, fit_power_law

N = torch.arange(1, 21, dtype=torch.float64)
POWER = 2.0 * N**-1.5  # an exact power law: every window fits alpha = 1.5


def test_the_window_may_start_at_rank_1():
    alpha, intercept, window = fit_power_law(POWER, start=1)
    assert window == (1, 20)
    assert alpha == pytest.approx(1.5, abs=1e-12)
    assert intercept == pytest.approx(math.log(2.0), abs=1e-12)


def test_two_points_are_enough_and_one_is_not():
    lam = POWER.clone()
    lam[13:] = 0.0  # ranks 1..13 positive, 14..20 zero
    alpha, _, window = fit_power_law(lam, start=12)  # ranks 12 and 13: two points
    assert window == (12, 13) and alpha == pytest.approx(1.5, abs=1e-9)
    with pytest.raises(ValueError, match="fewer than 2 positive values from rank start = 13"):
        fit_power_law(lam, start=13)
    assert fit_power_law(POWER, start=5, stop=6)[2] == (5, 6)  # an explicit two-point window
    with pytest.raises(ValueError, match=r"stop: .*after start = 5"):
        fit_power_law(POWER, start=5, stop=5)


@pytest.mark.parametrize("zero_at", [5, 9])  # the window's first and last rank
def test_a_zero_at_either_end_of_an_explicit_window_is_an_error(zero_at):
    lam = POWER.clone()
    lam[zero_at - 1] = 0.0
    with pytest.raises(ValueError, match="ranks 5..9 include non-positive values"):
        fit_power_law(lam, start=5, stop=9)
    start, stop = (10, 20) if zero_at == 9 else (6, 9)  # a window that avoids the zero
    fit_power_law(lam, start=start, stop=stop)


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"^start: .*1-indexed rank, N = 20"):
        fit_power_law(POWER, start=0)
    with pytest.raises(ValueError, match=r"^stop: "):
        fit_power_law(POWER, start=3, stop=21)
    with pytest.raises(ValueError, match=r"^eigenvalues: expected a non-empty 1-D spectrum"):
        fit_power_law(POWER.reshape(4, 5))
    with pytest.raises(TypeError, match=r"^eigenvalues: expected a 1-D tensor .* got object"):
        fit_power_law(object())
    with pytest.raises(ValueError, match=r"^threshold: "):
        effective_dimension(POWER, threshold=0.0)
    with pytest.raises(ValueError, match=r"^eigenvalues: the total variance is zero"):
        effective_dimension([0.0, -1.0])


def test_spectra_are_fitted_in_float64_whatever_their_dtype():
    lam32 = POWER.float()
    alpha32 = fit_power_law(lam32)[0]
    alpha64 = fit_power_law(lam32.double())[0]
    # the same float32 values fitted in float64 (in float32 the fit would be ~1e-7 off)
    assert alpha32 == pytest.approx(alpha64, abs=1e-12)
    assert fit_power_law([float(v) for v in lam32])[0] == pytest.approx(alpha64, abs=1e-12)


def test_effective_dimension_edges():
    # 0.7 + 0.2 rounds to 0.8999999999999999 in float64: a few ulps of slack count it as 90%
    assert effective_dimension([0.7, 0.2, 0.1]) == 2
    assert effective_dimension([9.0, 1.0]) == 1  # exactly 90%
    assert effective_dimension([0.3, 0.2], threshold=0.9) == 2  # a total variance below 1
    assert effective_dimension([0.3, 0.2], threshold=0.5) == 1
    assert effective_dimension([1.0, 1.0, 1.0, 1.0], threshold=1.0) == 4


def test_the_slack_is_exactly_four_ulps():
    # a share exactly at the slackened threshold counts; one ulp below it does not
    at = 0.9 * (1.0 - 4 * math.ulp(1.0))
    below = math.nextafter(at, 0.0)
    assert effective_dimension([at, 1.0 - at]) == 1
    assert effective_dimension([below, 1.0 - below]) == 2
