"""An independent float64 oracle for eq. (2) of Nassar et al. (2020), DESIGN.md section 2.

It imports nothing from ``powerlaw_fast`` and shares no code with it: the package's kernels
*and* its float64 baselines (``powerlaw_fast.baselines``) are tested against this module like
any other implementation. It is written to be read against the paper, not to be fast::

    mu      = mean_b x_b
    Sigma   = (x - mu)^T (x - mu) / (B - 1)
    lam_n   = v_n^T Sigma v_n                 for every column v_n of V
    s       = lam sorted in descending order  (n = 1 .. N)
    gam_n   = kappa n^-alpha,   kappa = s_tau tau^alpha   (a constant: no gradient)
    R       = beta / N sum_{n = tau..N} [(s_n / gam_n - 1)^2 + max(0, s_n / gam_n - 1)]

Conventions (``convention=``): ``"paper"``: tau counts from 1 and every term is summed;
``"authors"`` (josuenassar/power_law): tau counts from 0 (anchor = the (tau + 1)-th largest
value), terms with s_n <= 0 are skipped; both divide by N, the width.

The anchor's own term (n = tau) is left out of the sum. Its value is identically 0: with kappa
held constant, s_tau / gam_tau = s_tau tau^alpha / (s_tau tau^alpha) = 1, so the term is
(1 - 1)^2 + max(0, 1 - 1) = 0 and its slope 2 (r - 1) / gam + [r > 1] / gam is 0 as well
(the relu's subgradient 0 is taken at the kink, as everywhere). Evaluating it in floating
point instead gives r = 1 +- an ulp; above 1 autograd would give the anchor a relu slope of
beta / (N gam_tau) that eq. (2) does not have. Leaving the term out is exact, not a shortcut.

Gradients come from ``torch.autograd`` in float64 through these literal formulas.
"""

from __future__ import annotations

import torch

CONVENTIONS = ("paper", "authors")


def spectrum(x: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """``lam [N]``, ``lam_n = v_n^T Sigma v_n`` in V's column order, float64 (differentiable)."""
    x = x.reshape(x.shape[0], -1).double()
    V = V.double()
    B = x.shape[0]
    mu = x.mean(dim=0)
    sigma = (x - mu).T @ (x - mu) / (B - 1)
    return torch.stack([V[:, n] @ sigma @ V[:, n] for n in range(V.shape[1])])


def anchor_rank(tau: int, convention: str) -> int:
    """The anchor's 1-indexed rank."""
    if convention not in CONVENTIONS:
        raise ValueError(convention)
    return tau if convention == "paper" else tau + 1


def penalty_from_spectrum(lam, *, alpha=1.0, tau=10, beta=1.0, convention="paper"):
    """Eq. (2) on a spectrum ``lam [N]`` (any order), float64, differentiable in lam."""
    lam = lam.double()
    N = lam.shape[0]
    s = torch.sort(lam, descending=True, stable=True).values  # s[n - 1] is s_n
    t = anchor_rank(tau, convention)
    kappa = s[t - 1].detach() * t**alpha
    total = lam.new_zeros(())
    for n in range(t + 1, N + 1):  # n = t: identically 0 in value and slope (module doc)
        if convention == "authors" and not s[n - 1] > 0:
            continue
        gam_n = kappa * n**-alpha
        r_n = s[n - 1] / gam_n
        total = total + (r_n - 1) ** 2 + torch.clamp(r_n - 1, min=0)
    return beta / N * total


def penalty(x, V, *, alpha=1.0, tau=10, beta=1.0, convention="paper"):
    """Eq. (2) on the batch ``x [B, N]`` and basis ``V [N, N]``, float64, differentiable in x."""
    kw = dict(alpha=alpha, tau=tau, beta=beta, convention=convention)
    return penalty_from_spectrum(spectrum(x, V), **kw)


def _value_and_grad(fn, t, **kw):
    leaf = t.detach().double().requires_grad_(True)
    value = fn(leaf, **kw)
    if not value.requires_grad:  # no term in the sum (tau = N): R = 0, gradient 0
        return value.detach(), torch.zeros_like(leaf)
    (grad,) = torch.autograd.grad(value, leaf)
    return value.detach(), grad


def penalty_and_grad(x, V, **kw):
    """``(R, dR/dx)`` in float64; ``kw``: alpha, tau, beta, convention."""
    return _value_and_grad(lambda t, **k: penalty(t, V, **k), x, **kw)


def spectrum_penalty_and_grad(lam, **kw):
    """``(R, dR/dlam)`` in float64 for a given spectrum (gradient in lam's own order)."""
    return _value_and_grad(penalty_from_spectrum, lam, **kw)
