"""batch_covariance and column_mean against the float64 covariance of the same rounded input,
within the bounds of their rounding (tests/bounds.py)."""

from __future__ import annotations

import pytest
import torch

from powerlaw_fast import batch_covariance
from powerlaw_fast.ops.backends import implementation
from tests.devices import BACKENDS, DEVICE, raises_validation, skip_unsupported
from tests.ops.oracle_checks import check_column_mean, check_covariance, check_covariance_gradient


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,N", [(2, 3), (37, 100), (257, 129), (100, 37)])
def test_matches_float64(backend, B, N):
    x = (torch.randn(B, N) * torch.linspace(0.1, 3, N)).to(DEVICE)
    check_covariance(x, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_dtypes(backend, dtype):
    skip_unsupported(backend, dtype)
    x = torch.randn(150, 70).to(DEVICE, dtype)
    check_covariance(x, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_mean_and_non_contiguous(backend):
    base = (5.0 + 0.1 * torch.randn(200, 80)).to(DEVICE)
    x = base[:, ::2]
    assert not x.is_contiguous()
    check_covariance(x, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_matches_float64(backend):
    x = torch.randn(40, 13, device=DEVICE)
    w = torch.randn(13, 13, dtype=torch.float64, device=DEVICE)
    check_covariance_gradient(x, w, backend=backend)


def test_gradcheck_float64():
    x = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: batch_covariance(t, backend="torch"), (x,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,N", [(131, 133), (2, 1), (600, 70)])
def test_outputs_fully_written_and_right(poisoned, backend, B, N):
    # every buffer starts as NaN: an element a kernel skips fails the comparison
    x = (3.0 + torch.randn(B, N)).to(DEVICE)
    check_covariance(x, backend=backend)
    check_column_mean(implementation("column_mean", backend)(x), x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_column_mean(backend):
    x = (5 + torch.randn(301, 67, device=DEVICE))[:, 1:]
    check_column_mean(implementation("column_mean", backend)(x), x)


def test_bad_input():
    with pytest.raises(ValueError, match="x: expected at least 2 dims"):
        batch_covariance(torch.randn(5))
    with pytest.raises(ValueError, match="B = 1"):
        batch_covariance(torch.randn(1, 5))
    with pytest.raises(TypeError, match="x: expected a floating dtype"):
        batch_covariance(torch.ones(4, 5, dtype=torch.int32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_opcheck(dtype):
    """The custom ops (forward and backward), with fake results in the accumulation dtype."""
    from powerlaw_fast.ops import covariance

    x = torch.randn(20, 6, device=DEVICE).to(dtype).requires_grad_()
    op = covariance.BATCH_COVARIANCE
    for backend in BACKENDS:
        if backend != "torch" and dtype == torch.float64:
            continue
        settings = covariance.CovarianceSettings(backend=backend, group_name="")
        torch.library.opcheck(op.custom_op, ([x], *settings))
        sigma, mean, count = op.custom_op([x.detach()], *settings)
        grad = torch.randn(6, 6, device=DEVICE, dtype=sigma.dtype)
        torch.library.opcheck(op.backward_op, ([grad], [x.detach(), mean, count], [x.detach()],
                                               *settings))  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_gradient_in_the_inputs_dtype(dtype):
    """16-bit and float64 activations get their gradient in their own dtype, computed from the
    float32 (float64) covariance's gradient: within the rounding of the input and the result."""
    x = (torch.randn(40, 9, device=DEVICE) + 2.0).to(dtype)
    w = torch.randn(9, 9, dtype=torch.float64, device=DEVICE)
    check_covariance_gradient(x, w, backend="torch")


def test_non_finite_activations_are_an_error_naming_the_count(deferral):
    x = torch.randn(30, 13, device=DEVICE)
    x[3, 4] = float("nan")  # row and column 4 of the covariance: 2 * 13 - 1 entries
    with raises_validation(r"x: expected finite activations, got a covariance with 25 "
                           r"non-finite entries"):  # fmt: skip
        batch_covariance(x)  # the default backend and validation


def test_a_deferred_error_names_the_call(monkeypatch):
    from powerlaw_fast import raise_pending_errors
    from powerlaw_fast.ops import status

    x = torch.randn(30, 5, device=DEVICE)
    x[0, 0] = float("inf")
    with status.simulate_deferral(0):
        batch_covariance(x)
        with pytest.raises(status.DeferredValidationError,
                           match=r"deferred check of call #\d+ \(batch_covariance\)"):
            raise_pending_errors()


def test_validate_off_returns_what_was_computed():
    x = torch.randn(30, 5, device=DEVICE)
    x[0, 0] = float("nan")
    sigma = batch_covariance(x, validate="off")
    assert int(torch.isnan(sigma).sum()) == 9  # row and column 0
    assert torch.isfinite(batch_covariance(x[1:], validate=False)).all()


def test_float64_on_the_triton_backend_is_refused():
    if "triton" not in BACKENDS:
        pytest.skip("no triton backend here")
    with pytest.raises(TypeError, match="use backend='torch' for float64"):
        batch_covariance(torch.randn(10, 3, dtype=torch.float64, device=DEVICE), backend="triton")
