"""batch_covariance and column_mean against float64 references."""

from __future__ import annotations

import pytest
import torch

from powerlaw_fast import batch_covariance
from powerlaw_fast.ops.backends import implementation
from tests.devices import BACKENDS, DEVICE, skip_unsupported

TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def reference_covariance(x):
    x = x.flatten(1).double()
    c = x - x.mean(0)
    return c.T @ c / (x.shape[0] - 1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,N", [(2, 3), (37, 100), (257, 129), (100, 37)])
def test_matches_float64(backend, B, N):
    x = (torch.randn(B, N) * torch.linspace(0.1, 3, N)).to(DEVICE)
    out = batch_covariance(x, backend=backend)
    assert out.shape == (N, N) and out.dtype == torch.float32
    ref = reference_covariance(x)
    assert float((out.double() - ref).abs().max() / ref.abs().max()) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_dtypes(backend, dtype):
    skip_unsupported(backend, dtype)
    x = torch.randn(150, 70).to(DEVICE, dtype)
    out = batch_covariance(x, backend=backend)
    ref = reference_covariance(x)
    assert float((out.double() - ref).abs().max() / ref.abs().max()) < TOL[dtype]


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_mean_and_non_contiguous(backend):
    base = (5.0 + 0.1 * torch.randn(200, 80)).to(DEVICE)
    x = base[:, ::2]
    assert not x.is_contiguous()
    out = batch_covariance(x, backend=backend)
    ref = reference_covariance(x)
    assert float((out.double() - ref).abs().max() / ref.abs().max()) < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_matches_float64(backend):
    x = torch.randn(40, 13, device=DEVICE)
    w = torch.randn(13, 13, dtype=torch.float64, device=DEVICE)
    leaf = x.clone().requires_grad_()
    (batch_covariance(leaf, backend=backend).double() * w).sum().backward()
    ref = x.double().requires_grad_()
    (reference_covariance(ref) * w).sum().backward()
    torch.testing.assert_close(leaf.grad.double(), ref.grad, rtol=1e-4, atol=1e-5)


def test_gradcheck_float64():
    x = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: batch_covariance(t, backend="torch"), (x,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,N", [(131, 133), (2, 1), (600, 70)])
def test_outputs_fully_written_and_right(poisoned, backend, B, N):
    # every buffer starts as NaN: an element a kernel skips fails the comparison
    x = (3.0 + torch.randn(B, N)).to(DEVICE)
    ref = reference_covariance(x)
    out = batch_covariance(x, backend=backend).double()
    assert float((out - ref).abs().max() / ref.abs().max()) < 1e-5
    mean = implementation("column_mean", backend)(x)
    torch.testing.assert_close(mean.double(), x.double().mean(0), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_column_mean(backend):
    x = (5 + torch.randn(301, 67, device=DEVICE))[:, 1:]
    torch.testing.assert_close(
        implementation("column_mean", backend)(x).double(), x.double().mean(0),
        rtol=1e-6, atol=1e-6,
    )


def test_bad_input():
    with pytest.raises(ValueError, match="x: expected at least 2 dims"):
        batch_covariance(torch.randn(5))
    with pytest.raises(ValueError, match="B = 1"):
        batch_covariance(torch.randn(1, 5))
    with pytest.raises(TypeError, match="x: expected a floating dtype"):
        batch_covariance(torch.ones(4, 5, dtype=torch.int32))


def test_opcheck():
    from powerlaw_fast.ops import covariance

    x = torch.randn(20, 6, device=DEVICE, requires_grad=True)
    op = covariance.BATCH_COVARIANCE
    for backend in BACKENDS:
        settings = covariance.CovarianceSettings(backend=backend, group_name="")
        torch.library.opcheck(op.custom_op, ([x], *settings))
        sigma, mean, count = op.custom_op([x.detach()], *settings)
        grad = torch.randn(6, 6, device=DEVICE)
        torch.library.opcheck(op.backward_op, ([grad], [x.detach(), mean, count], [x.detach()],
                                               *settings))  # fmt: skip
