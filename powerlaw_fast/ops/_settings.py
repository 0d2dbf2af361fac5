"""The penalty's settings as the ops carry them (primitives only, so custom ops can take them),
the checks of its scalar arguments, and the errors its status words turn into.

Shared by :mod:`powerlaw_fast.ops.spectral_penalty`, :mod:`powerlaw_fast.ops.powerlaw_penalty`
and :mod:`powerlaw_fast.ops.grouped_penalty`.

Example::

    >>> from powerlaw_fast.ops._settings import anchor_index
    >>> anchor_index(50, 10, "paper"), anchor_index(50, 10, "authors")
    (9, 10)
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from powerlaw_fast._validation import check_int_range, check_real
from powerlaw_fast.ops import status

CONVENTIONS = ("paper", "authors")


class Settings(NamedTuple):
    """Everything but the tensors; primitives only, so the custom ops can carry them. Build it
    by keyword: the custom ops take the fields positionally, in this order."""

    backend: str
    anchor: int
    alpha: float
    beta: float
    skip_nonpositive: bool
    validate: str
    source: str  # the argument errors are blamed on
    tau: int
    group_name: str = ""  # "" for one process
    compute: str = ""  # "" (x's dtype) or "bfloat16" / "float32"


def compute_dtype_of(settings: Settings):
    return getattr(torch, settings.compute) if settings.compute else None


def anchor_index(N: int, tau: int, convention: str) -> int:
    """0-based position of the anchor in the descending spectrum."""
    if convention not in CONVENTIONS:
        raise ValueError(f"convention: expected one of {CONVENTIONS}, got {convention!r}")
    if convention == "paper":
        return check_int_range(tau, "tau", 1, N, f" (1-indexed rank, N = {N})") - 1
    return check_int_range(
        tau, "tau", 0, N - 1, f" (0-indexed rank, convention='authors', N = {N})"
    )


def check_beta(beta) -> float:
    beta = check_real(beta, "beta", low=0.0, low_inclusive=True)
    limit = torch.finfo(torch.float32).max
    if beta > limit:
        raise ValueError(
            f"alpha, beta: the penalty or its gradient is not finite in float32 with beta = "
            f"{beta} (expected beta <= {limit:.3g}); use a smaller beta"
        )
    return beta


def status_raiser(settings: Settings):
    def raise_for(values):
        nonfinite, anchor_code, overflow = values[:3]
        if nonfinite:
            raise ValueError(_nonfinite_message(settings.source, int(nonfinite)))
        if settings.source == "spectrum":  # projected_spectrum: no penalty to check
            return
        if anchor_code == 2:
            raise ValueError(
                f"{settings.source}: the spectrum's values are too small for float32 (its "
                f"largest value is below 1e-31, where precision is lost to underflow); the "
                f"penalty does not depend on the scale of the activations, so multiply them by "
                f"a constant"
            )
        if anchor_code:
            what = "its projected spectrum" if settings.source == "x" else "the spectrum"
            raise ValueError(
                f"{settings.source}: the batch is rank-deficient for tau = {settings.tau}: the "
                f"{settings.anchor + 1}-th largest value of {what} (the anchor) is zero, or "
                f"below the rounding level of the computation, so the power-law target is "
                f"undefined; use a larger or more varied batch, or a smaller tau"
                + ("" if settings.source != "x" else
                   " (or float32 activations with torch.set_float32_matmul_precision('highest'),"
                   " which resolve the smallest values)")
            )
        if overflow:
            raise ValueError(
                f"alpha, beta: the penalty or its gradient is not finite in float32 with alpha = "
                f"{settings.alpha} and beta = {settings.beta} ((n / tau)^alpha or beta overflows)"
                f"; use a smaller alpha or beta"
            )

    return raise_for


def _nonfinite_message(source: str, count: int) -> str:
    if source in ("x", "spectrum"):
        return (
            f"x: expected finite activations, got a projected spectrum with {count} non-finite "
            f"values (x contains NaN or inf, or its products overflow)"
        )
    return f"{source}: expected finite values, got {count} non-finite values"


def check_half_gradient(grad_x: torch.Tensor, validate: str, op: str) -> None:
    """A float16 gradient beyond 65504 would come back as inf: an error (deferred like every
    status check), not a silent inf. One reduction, for float16 activations only (bfloat16
    and float32 share float32's range, where the penalty's own overflow check applies)."""
    if grad_x.dtype != torch.float16 or validate == "off":
        return
    bad = (~torch.isfinite(grad_x)).sum().reshape(1).float()
    status.check(bad, validate, _raise_half_overflow, op=op)


def _raise_half_overflow(values):
    if values[0]:
        raise ValueError(
            f"x: the penalty's gradient overflows float16 in {int(values[0])} entries (|dR/dx| > "
            f"65504); use bfloat16 or float32 activations, a smaller beta, or scale the loss down"
        )
