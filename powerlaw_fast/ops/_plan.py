"""What a penalty call computes in: the GEMM operand dtype, Z's dtype, the dot precision, the
route (fused Triton GEMMs or cuBLAS), and the rounding levels its decisions are made against.

Shared by the spectral penalty, the grouped penalty and their tests.

Example::

    >>> import torch
    >>> from powerlaw_fast.ops._plan import plan_for
    >>> plan_for(torch.bfloat16, 1000).operand
    torch.bfloat16
"""

from __future__ import annotations

import functools
import math
import os
from typing import NamedTuple

import torch

from powerlaw_fast._backend import tf32_allowed
from powerlaw_fast._torch_helpers import accumulation_dtype
from powerlaw_fast.ops._layout import MAX_FUSED_N


class Plan(NamedTuple):
    operand: torch.dtype  # dtype of both GEMM operands (V is cast to it once by the caller)
    z_dtype: torch.dtype  # Z as kept for the backward
    precision: str  # "ieee" or "tf32" for float32 operands
    route: str  # "triton" (fused GEMMs) or "cublas" (torch.mm plus fused passes)


def operand_dtype(x_dtype: torch.dtype, compute_dtype: torch.dtype | None) -> torch.dtype:
    """The GEMM operands' dtype (also Z's): the compute dtype, else x's (float32 for float16)."""
    if x_dtype == torch.float64:
        return torch.float64
    return compute_dtype or (torch.float32 if x_dtype == torch.float16 else x_dtype)


@functools.lru_cache(maxsize=256)
def _plan(x_dtype, compute_dtype, tf32: bool, N: int, forced_route: str) -> Plan:
    if x_dtype == torch.float64:
        return Plan(torch.float64, torch.float64, "ieee", "triton")
    operand = operand_dtype(x_dtype, compute_dtype)
    if operand == torch.float32:
        # float16 inputs: TF32 holds them exactly and cannot overflow where float16 would
        half_input = x_dtype == torch.float16 and compute_dtype is None
        precision = "tf32" if (tf32 or half_input) else "ieee"
    else:
        precision = "tf32"
    route = forced_route if forced_route != "auto" else (
        "triton" if N <= MAX_FUSED_N else "cublas"
    )
    return Plan(operand, operand, precision, route)


def plan_for(x_dtype: torch.dtype, N: int, compute_dtype: torch.dtype | None = None) -> Plan:
    """The :class:`Plan` for activations of ``x_dtype`` and width ``N``."""
    forced = os.environ.get("POWERLAW_FAST_GEMM", "auto")
    return _plan(x_dtype, compute_dtype, tf32_allowed(), N, forced)


def check_compute_dtype(compute_dtype, x_dtype):
    if compute_dtype is None:
        return None
    if compute_dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(
            f"compute_dtype: expected None, torch.float32 or torch.bfloat16, got {compute_dtype}"
        )
    if x_dtype == torch.float64:
        raise TypeError("compute_dtype: float64 activations are computed in float64; pass None")
    return compute_dtype


def mean_tolerance(count: int, dtype: torch.dtype) -> float:
    """Relative rounding level of ``S2 - S1^2 / B`` (see the module docstring)."""
    return 8.0 * torch.finfo(dtype).eps * math.log2(max(count, 2))


def anchor_tolerance(plan: Plan, N: int) -> float:
    """An anchor value at or below this fraction of the spectrum's mean is zero to rounding.

    A direction without variance picks up rounding noise in ``Z = (x - mu) V``: V and the
    operands rounded to the GEMM's unit roundoff ``u_op`` give about ``u_op^2`` times the mean
    eigenvalue, and the float32 (or float64) accumulation over N terms at most
    ``N u_acc^2`` times it; 16x that is the floor. It is relative to the mean, not the
    largest value, so a steep full-rank spectrum (n^-4 at tau = 59: 8e-8 of the largest) is
    not mistaken for a rank-deficient one.
    """
    tf32 = plan.operand == torch.float32 and plan.precision == "tf32"
    u_operand = 2.0**-11 if tf32 else torch.finfo(plan.operand).eps / 2
    u_acc = torch.finfo(accumulation_dtype(plan.operand)).eps / 2
    return 16.0 * (u_operand**2 + N * u_acc**2)


def kink_tolerance(N: int, alpha: float, dtype: torch.dtype) -> float:
    """The rounding band of ``r_n - 1`` around the relu's kink.

    ``r = (s / s_anchor) exp(alpha (log n - log tau))``: one rounding in the ratio, the two
    logs (each within an ulp of its value, at most ``log N``), their difference, the product
    with alpha and exp, at most ``eps (3 + 2 alpha log N)`` relative; twice that is the band
    inside which the sign of ``r - 1`` is not known.
    """
    return 2.0 * torch.finfo(dtype).eps * (3.0 + 2.0 * alpha * math.log(max(N, 2)))
