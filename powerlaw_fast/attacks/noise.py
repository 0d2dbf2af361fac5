"""White-noise corruption, the paper's third robustness test (appendix figures)."""

from __future__ import annotations

import torch

from powerlaw_fast._validation import check_float_dtype, check_tensor
from powerlaw_fast.attacks._common import (
    check_bounds,
    check_eps,
    check_finite,
    draw,
    make_generator,
)

__all__ = ["white_noise"]


def white_noise(
    x: torch.Tensor,
    sigma,
    *,
    bounds: tuple[float, float] | None = (0.0, 1.0),
    generator: torch.Generator | int | None = None,
) -> torch.Tensor:
    """``clamp(x + sigma * z, lo, hi)`` with z ~ N(0, 1) i.i.d. per pixel.

    A grid of sigmas shares one draw of z (common random numbers): the curve over sigma then
    varies only with sigma, and sigma = 0 returns x exactly.

    Args:
        x: ``[n, *]`` float tensor, finite, and within ``bounds`` when given (as FGSM and PGD
            require: clamping an out-of-range input would hide it).
        sigma: float >= 0 or a sequence of E of them.
        bounds: pixel box, or None for no clamp.
        generator: ``torch.Generator``, int seed or None (seed 0); the global RNG is untouched.

    Returns: shaped like ``x`` (float sigma) or ``[E, *x.shape]``.

    >>> white_noise(torch.zeros(2, 3), [0.0, 0.5], generator=1).shape
    torch.Size([2, 2, 3])
    """
    check_tensor(x, "x")
    check_float_dtype(x, "x")
    sigmas, single = check_eps(sigma, "sigma")
    if bounds is not None:
        bounds = check_bounds(bounds)
        lo, hi = bounds
        bad = ~((x >= lo) & (x <= hi))  # NaN fails both comparisons
        if bool(bad.any()):
            raise ValueError(
                f"x: expected every value within bounds [{lo}, {hi}] (and no NaN), got "
                f"{int(bad.sum())} values outside"
            )
    else:
        check_finite(x, "x")
    gen = make_generator(generator, x.device)
    z = draw(x.shape, "normal", gen, x)
    s = torch.tensor(sigmas, dtype=x.dtype, device=x.device).view(-1, *([1] * x.dim()))
    out = x.detach().unsqueeze(0) + s * z.unsqueeze(0)
    if bounds is not None:
        out.clamp_(bounds[0], bounds[1])
    return out[0] if single else out
