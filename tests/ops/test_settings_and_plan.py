"""The ops' small shared helpers: ops/_settings.py (argument checks, the errors of the status
words), ops/_plan.py (the compute plan and the rounding levels decisions are made against, from
their documented derivations), ops/_layout.py (the scratch layout), ops/_triton_gemm.py (launch
sizes, the dot's precision) and ops/backends.py (the one backend table)."""

from __future__ import annotations

import math

import pytest
import torch

from powerlaw_fast.ops import _layout, _plan, _settings, _triton_gemm, backends
from powerlaw_fast.ops._plan import Plan
from powerlaw_fast.ops._settings import Settings
from tests.devices import raises_validation


def _settings_for(source="x", **changes):
    base = dict(backend="torch", anchor=4, alpha=1.5, beta=0.25, skip_nonpositive=False,
                validate="immediate", source=source, tau=5)  # fmt: skip
    return Settings(**(base | changes))


# --------------------------------------------------------------------------------------------
# _settings
# --------------------------------------------------------------------------------------------
def test_compute_dtype_of_settings():
    assert _settings.compute_dtype_of(_settings_for(compute="bfloat16")) is torch.bfloat16
    assert _settings.compute_dtype_of(_settings_for(compute="float32")) is torch.float32
    assert _settings.compute_dtype_of(_settings_for()) is None


def test_anchor_index_per_convention_and_its_range():
    assert _settings.anchor_index(5, 1, "paper") == 0 and _settings.anchor_index(5, 5, "paper") == 4
    assert _settings.anchor_index(5, 0, "authors") == 0
    assert _settings.anchor_index(5, 4, "authors") == 4
    with pytest.raises(ValueError, match=r"tau: expected an integer in 1\.\.5 \(1-indexed rank, "
                                         r"N = 5\), got 6"):  # fmt: skip
        _settings.anchor_index(5, 6, "paper")
    with pytest.raises(ValueError, match=r"tau: expected an integer in 1\.\.5 .*got 0"):
        _settings.anchor_index(5, 0, "paper")
    with pytest.raises(ValueError, match=r"tau: expected an integer in 0\.\.4 \(0-indexed rank, "
                                         r"convention='authors', N = 5\), got 5"):  # fmt: skip
        _settings.anchor_index(5, 5, "authors")
    with pytest.raises(ValueError, match=r"tau: expected an integer in 0\.\.4 .*got -1"):
        _settings.anchor_index(5, -1, "authors")
    with pytest.raises(ValueError, match=r"convention: expected one of \('paper', 'authors'\), "
                                         r"got 'Paper'"):  # fmt: skip
        _settings.anchor_index(5, 2, "Paper")
    with pytest.raises(TypeError, match="tau: expected an integer, got float"):
        _settings.anchor_index(5, 2.0, "paper")


def test_check_beta_takes_zero_up_to_float32s_largest():
    limit = torch.finfo(torch.float32).max
    assert _settings.check_beta(0) == 0.0 and type(_settings.check_beta(2)) is float
    assert _settings.check_beta(limit) == limit
    with pytest.raises(ValueError, match=r"alpha, beta: the penalty or its gradient is not "
                                         r"finite in float32 with beta = 3\.5e\+38 \(expected "
                                         r"beta <= 3\.4e\+38\); use a smaller beta"):  # fmt: skip
        _settings.check_beta(3.5e38)
    with pytest.raises(ValueError, match="beta: expected a finite number >= 0.0, got -1e-30"):
        _settings.check_beta(-1e-30)
    with pytest.raises(TypeError, match="beta: expected a real number, got str"):
        _settings.check_beta("1")


def test_status_values_of_zero_raise_nothing():
    for source in ("x", "lam", "spectrum"):
        _settings.status_raiser(_settings_for(source))([0.0, 0.0, 0.0])
    _settings._raise_half_overflow([0.0])


@pytest.mark.parametrize("source,match", [
    ("x", r"^x: expected finite activations, got a projected spectrum with 3 non-finite values "
          r"\(x contains NaN or inf, or its products overflow\)$"),
    ("spectrum", r"^x: expected finite activations, got a projected spectrum with 3 non-finite"),
    ("lam", r"^lam: expected finite values, got 3 non-finite values$"),
])  # fmt: skip
def test_a_nonfinite_count_is_reported_first(source, match):
    """The non-finite count (a float from the status copy) comes first, as an integer, even
    when the other words are set too."""
    with pytest.raises(ValueError, match=match):
        _settings.status_raiser(_settings_for(source))([3.0, 1.0, 1.0])


def test_a_spectrum_alone_has_no_penalty_to_check():
    _settings.status_raiser(_settings_for("spectrum"))([0.0, 1.0, 1.0])
    _settings.status_raiser(_settings_for("spectrum"))([0.0, 2.0, 0.0])


@pytest.mark.parametrize("source", ["x", "lam"])
def test_an_underflowed_spectrum_is_reported_before_an_overflow(source):
    want = rf"^{source}: the spectrum's values are too small for float32 \(its largest value is"
    with pytest.raises(ValueError, match=want + r" below 1e-31"):
        _settings.status_raiser(_settings_for(source))([0.0, 2.0, 1.0])


@pytest.mark.parametrize("source,what,hint", [("x", "its projected spectrum", True),
                                              ("lam", "the spectrum", False)])  # fmt: skip
def test_a_zero_anchor_names_tau_and_its_rank(source, what, hint):
    """anchor 4 (0-based) of tau = 5: "the 5-th largest value"; the float32-precision hint only
    for activations."""
    with pytest.raises(ValueError) as info:
        _settings.status_raiser(_settings_for(source))([0.0, 1.0, 1.0])
    message = str(info.value)
    assert message.startswith(f"{source}: the batch is rank-deficient for tau = 5: the 5-th "
                              f"largest value of {what} (the anchor) is zero")  # fmt: skip
    assert message.endswith(
        "use a larger or more varied batch, or a smaller tau"
        + (" (or float32 activations with torch.set_float32_matmul_precision('highest'), which "
           "resolve the smallest values)" if hint else "")
    )  # fmt: skip


def test_status_words_after_the_first_three_are_not_read():
    _settings.status_raiser(_settings_for("x"))([0.0, 0.0, 0.0, 5.0])
    with pytest.raises(ValueError, match="^lam: expected finite values, got 2 non-finite"):
        _settings.status_raiser(_settings_for("lam"))([2.0, 0.0, 0.0, 7.0])


def test_an_overflow_names_alpha_and_beta():
    with pytest.raises(ValueError, match=r"^alpha, beta: the penalty or its gradient is not "
                                         r"finite in float32 with alpha = 1\.5 and beta = 0\.25 "
                                         r"\(\(n / tau\)\^alpha or beta overflows\); use a "
                                         r"smaller alpha or beta$"):  # fmt: skip
        _settings.status_raiser(_settings_for("lam"))([0.0, 0.0, 1.0])


def test_check_half_gradient_costs_nothing_when_off():
    """validate="off": not even the reduction that counts the non-finite entries."""
    from tests.ops.test_spec_penalty_host import CountingMode

    grad = torch.tensor([1.0, float("inf")], dtype=torch.float16)
    with CountingMode() as mode:
        _settings.check_half_gradient(grad, "off", "op")
    assert not mode.ops, mode.ops


def test_check_half_gradient_checks_float16_only_and_not_when_off(deferral):
    bad = torch.tensor([1.0, float("inf"), -float("inf"), float("nan")])
    for dtype in (torch.float32, torch.bfloat16):
        _settings.check_half_gradient(bad.to(dtype), "immediate", "op")  # their range: no check
    _settings.check_half_gradient(bad.half(), "off", "op")
    _settings.check_half_gradient(torch.ones(3, dtype=torch.float16), "deferred", "op")
    message = (r"x: the penalty's gradient overflows float16 in 3 entries \(\|dR/dx\| > 65504\); "
               r"use bfloat16 or float32 activations")  # fmt: skip
    with pytest.raises(ValueError, match=message):  # "immediate": from the call, on any path
        _settings.check_half_gradient(bad.half(), "immediate", "some op")
    with raises_validation(message + (r".*\(some op\)" if deferral == "deferred" else "")):
        _settings.check_half_gradient(bad.half(), "deferred", "some op")


# --------------------------------------------------------------------------------------------
# _plan
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("x_dtype,compute,operand", [
    (torch.float64, None, torch.float64), (torch.float64, torch.bfloat16, torch.float64),
    (torch.float32, None, torch.float32), (torch.float16, None, torch.float32),
    (torch.bfloat16, None, torch.bfloat16), (torch.float16, torch.bfloat16, torch.bfloat16),
    (torch.float32, torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32, torch.float32),
])  # fmt: skip
def test_operand_dtype(x_dtype, compute, operand):
    assert _plan.operand_dtype(x_dtype, compute) == operand


@pytest.fixture
def exact_float32(monkeypatch):
    """torch's default matmul precision ("highest": no TF32), restored after the test."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    monkeypatch.delenv("POWERLAW_FAST_GEMM", raising=False)
    yield
    torch.set_float32_matmul_precision(previous)


@pytest.mark.parametrize("x_dtype,N,compute,plan", [
    (torch.float32, 4096, None, Plan(torch.float32, torch.float32, "ieee", "triton")),
    (torch.float32, 4097, None, Plan(torch.float32, torch.float32, "ieee", "cublas")),
    (torch.float16, 10, None, Plan(torch.float32, torch.float32, "tf32", "triton")),
    (torch.float16, 10, torch.float32, Plan(torch.float32, torch.float32, "ieee", "triton")),
    (torch.bfloat16, 10, None, Plan(torch.bfloat16, torch.bfloat16, "tf32", "triton")),
    (torch.float32, 10, torch.bfloat16, Plan(torch.bfloat16, torch.bfloat16, "tf32", "triton")),
    (torch.float64, 5000, None, Plan(torch.float64, torch.float64, "ieee", "triton")),
])  # fmt: skip
def test_plan_for_exact_float32(exact_float32, x_dtype, N, compute, plan):
    assert _plan.plan_for(x_dtype, N, compute) == plan


def test_plan_for_follows_the_matmul_precision_and_a_forced_route(exact_float32, monkeypatch):
    torch.set_float32_matmul_precision("high")
    assert _plan.plan_for(torch.float32, 10) == Plan(torch.float32, torch.float32, "tf32",
                                                     "triton")  # fmt: skip
    torch.set_float32_matmul_precision("highest")
    monkeypatch.setenv("POWERLAW_FAST_GEMM", "cublas")
    assert _plan.plan_for(torch.float32, 10).route == "cublas"
    monkeypatch.setenv("POWERLAW_FAST_GEMM", "triton")
    assert _plan.plan_for(torch.float32, 5000).route == "triton"


def test_check_compute_dtype():
    assert _plan.check_compute_dtype(None, torch.float64) is None
    assert _plan.check_compute_dtype(torch.bfloat16, torch.float32) is torch.bfloat16
    assert _plan.check_compute_dtype(torch.float32, torch.float16) is torch.float32
    with pytest.raises(TypeError, match=r"^compute_dtype: expected None, torch\.float32 or "
                                        r"torch\.bfloat16, got torch\.float16$"):  # fmt: skip
        _plan.check_compute_dtype(torch.float16, torch.float32)
    with pytest.raises(TypeError, match=r"^compute_dtype: float64 activations are computed in "
                                        r"float64; pass None$"):  # fmt: skip
        _plan.check_compute_dtype(torch.float32, torch.float64)


@pytest.mark.parametrize("count,dtype,want", [
    (1, torch.float32, 8 * 2.0**-23), (2, torch.float32, 8 * 2.0**-23),
    (1024, torch.float32, 80 * 2.0**-23), (3, torch.float64, 8 * 2.0**-52 * math.log2(3)),
])  # fmt: skip
def test_mean_tolerance_is_8_eps_log2_of_the_count(count, dtype, want):
    assert _plan.mean_tolerance(count, dtype) == pytest.approx(want, rel=1e-15)


@pytest.mark.parametrize("plan,u_op,u_acc", [
    (Plan(torch.float32, torch.float32, "ieee", "triton"), 2.0**-24, 2.0**-24),
    (Plan(torch.float32, torch.float32, "tf32", "triton"), 2.0**-11, 2.0**-24),
    (Plan(torch.bfloat16, torch.bfloat16, "tf32", "triton"), 2.0**-8, 2.0**-24),
    (Plan(torch.float64, torch.float64, "ieee", "triton"), 2.0**-53, 2.0**-53),
])  # fmt: skip
def test_anchor_tolerance_is_16_times_the_operands_and_sums_rounding(plan, u_op, u_acc):
    """``16 (u_op^2 + N u_acc^2)`` with the GEMM operands' unit roundoff (TF32's 2^-11 for
    float32 at "tf32") and the float32 (float64) sums'."""
    for N in (1, 300):
        want = 16 * (u_op**2 + N * u_acc**2)
        assert _plan.anchor_tolerance(plan, N) == pytest.approx(want, rel=1e-15)


@pytest.mark.parametrize("N,alpha,dtype", [(1, 1.0, torch.float32), (2, 1.0, torch.float32),
                                           (100, 0.5, torch.float32), (7, 2.0, torch.float64)])
def test_kink_tolerance_is_twice_eps_times_3_plus_2_alpha_log_n(N, alpha, dtype):
    eps = torch.finfo(dtype).eps
    want = 2 * eps * (3 + 2 * alpha * math.log(max(N, 2)))
    assert _plan.kink_tolerance(N, alpha, dtype) == pytest.approx(want, rel=1e-15)


# --------------------------------------------------------------------------------------------
# _layout
# --------------------------------------------------------------------------------------------
def test_the_scratch_layout():
    """``[R, #non-finite, anchor code, overflow | dR/dlam (N) | lam (N) | column means (N)]``"""
    N = 5
    assert _layout.scratch_size(N, 2) == 4 + 2 * N and _layout.scratch_size(N, 3) == 4 + 3 * N
    scratch = torch.arange(4.0 + 3 * N)
    assert _layout.scratch_width(scratch, 3) == N
    assert _layout.scratch_width(scratch[: 4 + 2 * N], 2) == N
    assert _layout.scratch_status(scratch).tolist() == [1.0, 2.0, 3.0]
    assert _layout.scratch_dR_dlam(scratch, N).tolist() == [4.0, 5.0, 6.0, 7.0, 8.0]
    assert _layout.scratch_lam(scratch, N).tolist() == [9.0, 10.0, 11.0, 12.0, 13.0]
    assert _layout.scratch_column_means(scratch, N).tolist() == [14.0, 15.0, 16.0, 17.0, 18.0]
    # a width is an int (it sizes slices and launches); each part has N values whatever follows
    assert type(_layout.scratch_width(scratch, 3)) is int
    longer = torch.arange(4.0 + 5 * N)
    assert _layout.scratch_column_means(longer, N).tolist() == [14.0, 15.0, 16.0, 17.0, 18.0]
    assert _layout.scratch_lam(longer, N).shape == (N,)
    assert _layout.scratch_dR_dlam(longer, N).shape == (N,)


# --------------------------------------------------------------------------------------------
# _triton_gemm: the launch helpers and the dot's precision
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("helper", ["next_power_of_2", "size_bucket"])
def test_the_smallest_power_of_two_at_or_above_n(helper):
    fn = getattr(_triton_gemm, helper)
    cases = {0: 1, 1: 1, 2: 2, 3: 4, 4: 4, 5: 8, 8: 8, 9: 16, 1000: 1024, 1024: 1024, 1025: 2048}
    assert {n: fn(n) for n in cases} == cases
    assert fn(torch.tensor(5)) == 8  # a 0-dim size is read as an int


def test_cdiv_rounds_up():
    assert [_triton_gemm.cdiv(a, 4) for a in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


def test_the_dot_precision_follows_the_operands_and_torch(exact_float32):
    assert _triton_gemm.dot_precision(torch.float32) == "ieee"  # "highest": exact products
    assert _triton_gemm.dot_precision(torch.bfloat16) == "tf32"  # a tensor-core dot anyway
    assert _triton_gemm.dot_precision(torch.float16) == "tf32"
    torch.set_float32_matmul_precision("high")
    assert _triton_gemm.dot_precision(torch.float32) == "tf32"


def test_bfloat16_operands_are_widened_only_under_the_interpreter(monkeypatch):
    monkeypatch.setattr(_triton_gemm, "triton_interpreter_active", lambda: True)
    assert _triton_gemm.dot_in_fp32(torch.bfloat16) is True
    assert _triton_gemm.dot_in_fp32(torch.float32) is False
    assert _triton_gemm.dot_in_fp32(torch.float16) is False
    monkeypatch.setattr(_triton_gemm, "triton_interpreter_active", lambda: False)
    assert _triton_gemm.dot_in_fp32(torch.bfloat16) is False


# --------------------------------------------------------------------------------------------
# backends: the one table
# --------------------------------------------------------------------------------------------
def test_the_backend_table_returns_what_was_registered_and_names_what_is_missing(monkeypatch):
    monkeypatch.setattr(backends, "_TABLE", {})

    def twin(x):
        return x

    assert backends.register("a_stage", "torch")(twin) is twin  # a decorator: fn unchanged
    assert backends.implementation("a_stage", "torch") is twin
    with pytest.raises(NotImplementedError,
                       match=r"^backend='triton' has no implementation of 'a_stage'$"):
        backends.implementation("a_stage", "triton")
