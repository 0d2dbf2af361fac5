import pytest
import torch
from torch import nn

from powerlaw_fast.paper.jacobian import jacobian_penalty


def tiny_net(seed=0, classes=5, features=6):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(features, 7), nn.Tanh(), nn.Linear(7, classes)).double()


def literal_penalty(net, x, beta):
    """beta / B * sum_b ||d f(x_b) / d x_b||_F^2 from per-sample full Jacobians."""
    total = 0.0
    for xb in x:
        J = torch.autograd.functional.jacobian(lambda v: net(v.unsqueeze(0))[0], xb)
        total += float((J * J).sum())
    return beta * total / x.shape[0]


def test_exact_matches_literal_formula():
    net = tiny_net()
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    got = jacobian_penalty(x, net(x), beta=0.3, exact=True)
    assert got.shape == ()
    assert abs(float(got.detach()) - literal_penalty(net, x.detach(), 0.3)) < 1e-12


def test_image_shaped_input():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 4)).double()
    x = torch.randn(3, 1, 3, 4, dtype=torch.float64, requires_grad=True)
    W = net[1].weight
    torch.testing.assert_close(
        jacobian_penalty(x, net(x), beta=1.0, exact=True), (W * W).sum().detach()
    )


def test_estimator_is_unbiased():
    net = tiny_net(1)
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    logits = net(x)
    exact = float(jacobian_penalty(x, logits, exact=True).detach())
    g = torch.Generator().manual_seed(123)
    draws = torch.stack([jacobian_penalty(x, logits, generator=g).detach() for _ in range(3000)])
    mean, std = float(draws.mean()), float(draws.std())
    assert std > 0  # a genuine random estimate
    assert abs(mean - exact) < 4 * std / len(draws) ** 0.5


def test_projections_average_the_single_draws():
    net = tiny_net(2)
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    logits = net(x)
    many = jacobian_penalty(x, logits, projections=4, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    singles = [jacobian_penalty(x, logits, generator=g) for _ in range(4)]
    torch.testing.assert_close(many, torch.stack(singles).mean())


def test_single_logit_estimate_is_exact():
    net = tiny_net(3, classes=1)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    logits = net(x)
    torch.testing.assert_close(
        jacobian_penalty(x, logits, generator=torch.Generator().manual_seed(0)),
        jacobian_penalty(x, logits, exact=True),
    )


@pytest.mark.parametrize("exact", [True, False])
def test_penalty_trains_parameters(exact):
    # Linear logits x W^T: every sample's Jacobian is W, so R = beta ||W||_F^2, dR/dW = 2 beta W.
    torch.manual_seed(0)
    lin = nn.Linear(6, 3, bias=True).double()
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    R = jacobian_penalty(
        x, lin(x), beta=0.5, exact=exact, projections=1, generator=torch.Generator().manual_seed(0)
    )
    R.backward()
    if exact:
        torch.testing.assert_close(lin.weight.grad, 2 * 0.5 * lin.weight.detach())
    else:
        assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0


def test_float32():
    net = tiny_net().float()
    x = torch.randn(4, 6, requires_grad=True)
    got = jacobian_penalty(x, net(x), beta=0.3, exact=True)
    assert got.dtype == torch.float32
    ref = literal_penalty(net.double(), x.detach().double(), 0.3)
    assert abs(float(got.detach()) - ref) < 1e-5 * max(1.0, ref)


def test_bad_inputs():
    net = tiny_net()
    x = torch.randn(4, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match="requires_grad"):
        jacobian_penalty(x, net(x))
    xg = x.clone().requires_grad_(True)
    logits = net(xg)
    with pytest.raises(ValueError, match=r"\[B, C\]"):
        jacobian_penalty(xg, logits[:, 0])
    with pytest.raises(ValueError, match="batch size"):
        jacobian_penalty(xg, torch.cat([logits, logits]))
    with pytest.raises(ValueError, match="projections"):
        jacobian_penalty(xg, logits, projections=0)
    with pytest.raises(ValueError, match="beta"):
        jacobian_penalty(xg, logits, beta=-1.0)
    with pytest.raises(TypeError, match="exact"):
        jacobian_penalty(xg, logits, exact=1)
    with pytest.raises(ValueError, match="autograd graph"):
        jacobian_penalty(xg, torch.randn(4, 5, dtype=torch.float64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        jacobian_penalty(xg, [[1.0]])
