"""Reference implementations of the penalty in plain PyTorch: the baselines the benchmarks
measure against and the float64 formulas the tests check every kernel with (one module for both).

Each is differentiable by torch's autograd and uses the paper's convention (1-indexed tau)
unless said otherwise:

- :func:`literal_spectrum`, :func:`literal_penalty`: the paper's text taken literally in
  float64 (the covariance first, then ``diag(V^T Sigma V)``, a sort and eq. (2)): the tests'
  reference.
- :func:`projection_penalty`: the projection form, ``lam = colsum(((x - mu) V)^2) / (B - 1)``.
- :func:`covariance_penalty`: the covariance first, then ``diag(V^T Sigma V)`` (the authors').
- :func:`authors_loop_penalty`: the authors' algorithm (josuenassar/power_law): covariance
  first, a Python loop over the eigenvalues, 0-indexed tau, non-positive values skipped.
- :func:`eigvalsh_penalty`: exact per-batch eigenvalues (``torch.linalg.eigvalsh``), no V.

Example::

    >>> import torch
    >>> from powerlaw_fast.baselines import projection_penalty
    >>> x = torch.randn(64, 16, requires_grad=True)
    >>> projection_penalty(x, torch.eye(16), tau=3).backward()
"""

from __future__ import annotations

import torch


def _widen(t: torch.Tensor) -> torch.Tensor:
    """Half-precision values are summed and compared in float32."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def penalty_from_spectrum(lam: torch.Tensor, *, alpha=1.0, tau=10, beta=1.0) -> torch.Tensor:
    """Eq. (2) over ``lam [N]`` (any order), paper convention, autograd through the sort."""
    N = lam.shape[0]
    s = torch.sort(lam, descending=True).values
    n = torch.arange(1, N + 1, device=lam.device, dtype=lam.dtype)
    gam = s[tau - 1].detach() * (tau / n) ** alpha
    r = s[tau - 1 :] / gam[tau - 1 :]
    return beta / N * ((r - 1) ** 2 + torch.relu(r - 1)).sum()


def literal_spectrum(x: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """``diag(V^T Sigma V)`` with ``Sigma = (x - mu)^T (x - mu) / (B - 1)``, in float64."""
    x = x.flatten(1).double()
    centred = x - x.mean(0)
    sigma = centred.T @ centred / (x.shape[0] - 1)
    return torch.diagonal(V.double().T @ sigma @ V.double())


def literal_penalty(x, V, *, alpha=1.0, tau=10, beta=1.0):
    """Eq. (2) on :func:`literal_spectrum`, float64."""
    return penalty_from_spectrum(literal_spectrum(x, V), alpha=alpha, tau=tau, beta=beta)


def projection_penalty(x, V, *, alpha=1.0, tau=10, beta=1.0):
    x = x.flatten(1)
    z = (x - x.mean(0)) @ V
    lam = _widen(z).pow(2).sum(0) / (x.shape[0] - 1)
    return penalty_from_spectrum(lam, alpha=alpha, tau=tau, beta=beta)


def covariance_penalty(x, V, *, alpha=1.0, tau=10, beta=1.0):
    x = x.flatten(1)
    c = x - x.mean(0)
    sigma = c.T @ c / (x.shape[0] - 1)
    lam = _widen(torch.diagonal(V.T @ sigma @ V))
    return penalty_from_spectrum(lam, alpha=alpha, tau=tau, beta=beta)


def authors_loop_penalty(x, V, *, alpha=1.0, tau=10, beta=1.0):
    """``tau`` is 0-indexed here, as in the authors' code."""
    x = x.flatten(1)
    c = x - x.mean(0)
    cov = c.T @ c / (x.shape[0] - 1)
    cov = (cov + cov.T) / 2
    eigs = torch.sort(torch.diag(V.T @ cov @ V), descending=True).values
    with torch.no_grad():
        kappa = eigs[tau] * (tau + 1) ** alpha
    total = torch.zeros(1, device=x.device, dtype=eigs.dtype)
    for n in range(tau + 1, eigs.shape[0]):
        if eigs[n] > 0:  # a host synchronisation per eigenvalue, as in the original
            gamma = kappa / (n + 1) ** alpha
            total = total + (eigs[n] / gamma - 1) ** 2 + torch.relu(eigs[n] / gamma - 1)
    return beta * total[0] / x.shape[1]


def eigvalsh_penalty(x, V=None, *, alpha=1.0, tau=10, beta=1.0):
    """Exact per-batch eigenvalues instead of the projection on a fixed basis (``V`` unused)."""
    x = x.flatten(1)
    c = _widen(x - x.mean(0))
    sigma = c.T @ c / (x.shape[0] - 1)
    lam = torch.linalg.eigvalsh(sigma)
    return penalty_from_spectrum(lam, alpha=alpha, tau=tau, beta=beta)
