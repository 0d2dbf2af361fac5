"""Float64 references of the paper's literal formulas, shared by the tests.

These follow the text of the paper, not the library's kernels: the covariance first, then
diag(V^T Sigma V), a sort and eq. (2), differentiated by torch's autograd.
"""

from __future__ import annotations

import torch


def literal_spectrum(x: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """diag(V^T Sigma V) with Sigma = (x - mu)^T (x - mu) / (B - 1), in float64."""
    x = x.flatten(1).double()
    V = V.double()
    centred = x - x.mean(0)
    sigma = centred.T @ centred / (x.shape[0] - 1)
    return torch.diagonal(V.T @ sigma @ V)


def literal_penalty_from_spectrum(lam, *, alpha=1.0, tau=10, beta=1.0):
    """Eq. (2), paper convention: 1-indexed tau, sum n = tau..N, scaled by beta / N."""
    N = lam.shape[0]
    s = torch.sort(lam, descending=True).values
    n = torch.arange(1, N + 1, dtype=lam.dtype, device=lam.device)
    lam_tau = s[tau - 1].detach()
    # gam_n = kappa n^-alpha, kappa = lam_tau tau^alpha, written as lam_tau (tau/n)^alpha so
    # that gam_tau equals lam_tau exactly in floating point.
    gam = lam_tau * (tau / n) ** alpha
    r = s / gam
    terms = (r - 1) ** 2 + torch.relu(r - 1)
    return beta / N * terms[tau - 1 :].sum()


def literal_penalty(x, V, *, alpha=1.0, tau=10, beta=1.0):
    return literal_penalty_from_spectrum(literal_spectrum(x, V), alpha=alpha, tau=tau, beta=beta)


def authors_loop_penalty(x, V, *, alpha=1.0, tau=10, beta=1.0):
    """The authors' algorithm as described: covariance first, 0-indexed tau, a Python loop over
    the sorted eigenvalues that skips non-positive ones, divided by the layer width."""
    x = x.flatten(1).double()
    V = V.double()
    centred = x - x.mean(0)
    cov = centred.T @ centred / (x.shape[0] - 1)
    cov = (cov + cov.T) / 2
    eigs = torch.sort(torch.diag(V.T @ cov @ V), descending=True).values
    with torch.no_grad():
        kappa = eigs[tau] * (tau + 1) ** alpha
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    for i in range(tau + 1, eigs.shape[0]):
        if eigs[i] > 0:
            gamma = kappa / (i + 1) ** alpha
            total = total + (eigs[i] / gamma - 1) ** 2 + torch.relu(eigs[i] / gamma - 1)
    return beta * total / x.shape[1]


def value_and_grad(fn, x, *args, **kwargs):
    """Evaluate ``fn(x, ...)`` and its gradient w.r.t. x (as float64), without touching x."""
    leaf = x.detach().requires_grad_(True)  # keeps x's strides (non-contiguous stays so)
    value = fn(leaf, *args, **kwargs)
    (grad,) = torch.autograd.grad(value, leaf)
    return value.detach().double(), grad.double()
