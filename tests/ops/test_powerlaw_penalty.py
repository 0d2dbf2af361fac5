"""ops/powerlaw_penalty.py: eq. (2) on a given spectrum, every backend against the oracle
(tests/oracle.py), both conventions, and its argument checks."""

from __future__ import annotations

import pytest
import torch

from powerlaw_fast import powerlaw_penalty
from tests import oracle
from tests.devices import BACKENDS, DEVICE


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
