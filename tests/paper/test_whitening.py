import pytest
import torch

from powerlaw_fast.paper.whitening import Whiten


def correlated(batch, n, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g, dtype=dtype)
    return torch.randn(batch, n, generator=g, dtype=dtype) @ mix + 3.0


def reference_whiten(x, eps):
    """Literal eq. (10) in float64: R^-1 (x - mu) with R R^T = Sigma + eps I."""
    x = x.to(torch.float64)
    mu = x.mean(0)
    cov = torch.cov(x.T) + eps * torch.eye(x.shape[1], dtype=torch.float64)
    R = torch.linalg.cholesky(cov)
    return (torch.linalg.inv(R) @ (x - mu).T).T


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 2e-3)])
def test_batch_covariance_is_identity(dtype, tol):
    x = correlated(200, 7, dtype)
    y = Whiten(7, eps=0.0)(x)
    assert y.dtype == dtype and y.shape == x.shape
    cov = torch.cov(y.double().T)
    torch.testing.assert_close(cov, torch.eye(7, dtype=torch.float64), atol=tol, rtol=0)
    torch.testing.assert_close(
        y.double().mean(0), torch.zeros(7, dtype=torch.float64), atol=tol, rtol=0
    )


def test_matches_literal_formula_with_eps():
    x = correlated(50, 6)
    torch.testing.assert_close(Whiten(6, eps=1e-2)(x), reference_whiten(x, 1e-2))


def test_bfloat16_input_keeps_dtype():
    x = correlated(64, 5, torch.float32).to(torch.bfloat16)
    y = Whiten(5)(x)
    assert y.dtype == torch.bfloat16
    ref = reference_whiten(x.float(), 1e-5)
    torch.testing.assert_close(y.double(), ref, atol=0.1, rtol=0.05)


def test_gradcheck_float64():
    layer = Whiten(3, eps=1e-3).double()
    x = correlated(6, 3).requires_grad_(True)
    assert torch.autograd.gradcheck(layer, (x,), eps=1e-6, atol=1e-5)
    assert torch.autograd.gradgradcheck(layer, (x,), eps=1e-6, atol=1e-4)


def test_gradient_flows_through_statistics():
    # With the statistics treated as constants, the sum of outputs would have a gradient of
    # R^-T 1 per row; through the mean it is exactly zero (each output column sums to zero).
    x = correlated(20, 4).requires_grad_(True)
    Whiten(4)(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.zeros_like(x), atol=1e-10, rtol=0)


def test_multidim_input_is_flattened_and_reshaped():
    x = correlated(40, 12).reshape(40, 3, 2, 2)
    y = Whiten(12)(x)
    assert y.shape == (40, 3, 2, 2)
    torch.testing.assert_close(y.reshape(40, 12), Whiten(12)(x.reshape(40, 12)))


def test_non_contiguous_input():
    x = correlated(30, 10)[:, ::2]
    assert not x.is_contiguous()
    torch.testing.assert_close(Whiten(5)(x), Whiten(5)(x.contiguous()))


def test_running_statistics_and_eval_modes():
    layer = Whiten(4, momentum=0.5, eval_mode="running")
    x1, x2 = correlated(30, 4, torch.float32, 1), correlated(30, 4, torch.float32, 2)
    layer.train()
    layer(x1)
    layer(x2)
    assert int(layer.num_batches_tracked) == 2
    # r0 = (0, I); r1 = 0.5 r0 + 0.5 s1; r2 = 0.5 r1 + 0.5 s2
    mean = 0.25 * x1.mean(0) + 0.5 * x2.mean(0)
    cov = 0.25 * torch.eye(4) + 0.25 * torch.cov(x1.T) + 0.5 * torch.cov(x2.T)
    torch.testing.assert_close(layer.running_mean, mean)
    torch.testing.assert_close(layer.running_cov, cov)

    layer.eval()
    single = x1[:1]
    y = layer(single)  # one sample works with running statistics
    R = torch.linalg.cholesky(cov.double() + 1e-5 * torch.eye(4, dtype=torch.float64))
    ref = torch.linalg.solve_triangular(R, (single.double() - mean.double()).T, upper=False).T
    torch.testing.assert_close(y.double(), ref, atol=1e-4, rtol=1e-4)
    before = layer.running_cov.clone()
    layer(x2)
    torch.testing.assert_close(layer.running_cov, before)  # eval does not update

    batch_mode = Whiten(4, eval_mode="batch").eval()
    torch.testing.assert_close(batch_mode(x1), Whiten(4)(x1))  # batch stats even in eval


def test_bad_inputs():
    layer = Whiten(4)
    with pytest.raises(ValueError, match="at least 2 samples"):
        layer(torch.randn(1, 4))
    with pytest.raises(ValueError, match="expected 4 features"):
        layer(torch.randn(10, 5))
    with pytest.raises(ValueError, match=r"\[B, N\]"):
        layer(torch.randn(4))
    with pytest.raises(TypeError, match="floating dtype"):
        layer(torch.ones(10, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        layer([[1.0] * 4] * 3)
    with pytest.raises(ValueError, match="not positive definite"):
        layer(torch.full((10, 4), float("nan")))
    with pytest.raises(ValueError, match="eval_mode"):
        Whiten(4, eval_mode="ema")
    with pytest.raises(ValueError, match="momentum"):
        Whiten(4, momentum=1.5)
    with pytest.raises(ValueError, match="num_features"):
        Whiten(0)
