"""The benchmark baselines compute the same penalty as the library."""

import pytest
import torch

from powerlaw_fast import spec_penalty
from powerlaw_fast.baselines import (
    authors_loop_penalty,
    covariance_penalty,
    eigvalsh_penalty,
    projection_penalty,
)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(90, 30, generator=g, dtype=torch.float64) * torch.linspace(
        2, 0.1, 30, dtype=torch.float64
    )
    V = torch.linalg.eigh(torch.cov(x.T))[1].flip(1)
    return x, V


@pytest.mark.parametrize("baseline", [projection_penalty, covariance_penalty])
def test_baselines_equal_spec_penalty(batch, baseline):
    x, V = batch
    leaf_a = x.clone().requires_grad_()
    leaf_b = x.clone().requires_grad_()
    a = baseline(leaf_a, V, tau=4, beta=2.0)
    b = spec_penalty(leaf_b, V, tau=4, beta=2.0, backend="torch")
    a.backward()
    b.backward()
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(leaf_a.grad, leaf_b.grad)


def test_authors_loop_equals_authors_convention(batch):
    x, V = batch
    torch.testing.assert_close(
        authors_loop_penalty(x, V, tau=10),
        spec_penalty(x, V, tau=10, convention="authors", backend="torch"),
    )


def test_eigvalsh_equals_projection_on_the_batch_eigenbasis(batch):
    x, V = batch  # V is the batch's own eigenbasis, so diag(V^T Sigma V) are its eigenvalues
    torch.testing.assert_close(
        eigvalsh_penalty(x.float(), tau=4).double(),
        spec_penalty(x, V, tau=4, backend="torch"),
        rtol=1e-4,
        atol=1e-6,
    )
