"""Summaries of an eigenspectrum: the power-law exponent (log-log fit) and the effective
dimension (rank reaching a fraction of the variance). Ranks are 1-indexed, as in the paper.
"""

from __future__ import annotations

import math

import torch

from .._validation import check_int_range, check_real


def _as_spectrum(eigenvalues, name: str = "eigenvalues") -> torch.Tensor:
    if not isinstance(eigenvalues, torch.Tensor):
        try:
            eigenvalues = torch.as_tensor(eigenvalues, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(
                f"{name}: expected a 1-D tensor or sequence of numbers, got "
                f"{type(eigenvalues).__name__}"
            ) from None
    if eigenvalues.dim() != 1 or eigenvalues.numel() < 1:
        raise ValueError(
            f"{name}: expected a non-empty 1-D spectrum, got shape {tuple(eigenvalues.shape)}"
        )
    lam = eigenvalues.detach().to(device="cpu", dtype=torch.float64)
    if not bool(torch.isfinite(lam).all()):
        raise ValueError(f"{name}: contains NaN or infinite values")
    return lam


def fit_power_law(
    eigenvalues, *, start: int = 10, stop: int | None = None
) -> tuple[float, float, tuple[int, int]]:
    """Least-squares fit of ``log lam_n = intercept - alpha * log n`` over ranks start..stop.

    Ranks are 1-indexed and inclusive; natural logs, so ``lam_n ~ exp(intercept) * n^-alpha``.
    The default window starts at the paper's tau = 10. With ``stop=None`` the window ends at
    the last rank before the first non-positive eigenvalue (numerically zero tail); an explicit
    window containing a non-positive value is an error.

    Returns ``(alpha, intercept, (start, stop))``.

    Example::

        >>> import torch
        >>> from powerlaw_fast.training.fits import fit_power_law
        >>> n = torch.arange(1, 501, dtype=torch.float64)
        >>> alpha, intercept, window = fit_power_law(3.0 * n ** -1.2)
        >>> round(alpha, 6), window
        (1.2, (10, 500))
    """
    lam = _as_spectrum(eigenvalues)
    size = lam.numel()
    start = check_int_range(start, "start", 1, size, f" (1-indexed rank, N = {size})")
    if stop is None:
        nonpositive = torch.nonzero(lam[start - 1 :] <= 0)
        stop = size if nonpositive.numel() == 0 else start - 1 + int(nonpositive[0])
        if stop - start + 1 < 2:
            raise ValueError(
                f"eigenvalues: fewer than 2 positive values from rank start = {start}; cannot fit"
            )
    else:
        stop = check_int_range(
            stop, "stop", start + 1, size, f" (1-indexed, after start = {start})"
        )
        if bool((lam[start - 1 : stop] <= 0).any()):
            raise ValueError(
                f"eigenvalues: ranks {start}..{stop} include non-positive values; a log-log fit "
                f"needs positive eigenvalues (choose a smaller stop)"
            )
    ranks = torch.arange(start, stop + 1, dtype=torch.float64)
    log_n = ranks.log()
    log_lam = lam[start - 1 : stop].log()
    design = torch.stack([torch.ones_like(log_n), log_n], dim=1)
    coef = torch.linalg.lstsq(design, log_lam.unsqueeze(1)).solution.squeeze(1)
    return -float(coef[1]), float(coef[0]), (start, stop)


def effective_dimension(eigenvalues, threshold: float = 0.9) -> int:
    """The 1-indexed rank n at which the cumulative variance first reaches ``threshold``.

    The eigenvalues are sorted in descending order first; negative values (rounding noise of a
    covariance's zero eigenvalues) count as 0. This is the star in the paper's spectrum plots.

    Example::

        >>> from powerlaw_fast.training.fits import effective_dimension
        >>> effective_dimension([5.0, 3.0, 1.0, 1.0])
        3
    """
    lam = _as_spectrum(eigenvalues)
    threshold = check_real(threshold, "threshold", low=0.0, low_inclusive=False)
    if threshold > 1.0:
        raise ValueError(f"threshold: expected a fraction in (0, 1], got {threshold}")
    lam = lam.clamp_min(0.0).sort(descending=True).values
    total = float(lam.sum())
    if total <= 0.0:
        raise ValueError("eigenvalues: the total variance is zero; the dimension is undefined")
    cumulative = lam.cumsum(0) / total
    # A relative slack of a few ulps so that an exact hit (e.g. 9/10 of the variance) counts.
    reached = torch.nonzero(cumulative >= threshold * (1.0 - 4 * math.ulp(1.0)))
    return int(reached[0]) + 1
