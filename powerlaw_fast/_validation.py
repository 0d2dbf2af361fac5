"""Argument checks shared by every public function.

Each error names the argument, what was expected and what was given.
"""

from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(t, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    return t


def check_float_dtype(t: torch.Tensor, name: str) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name}: expected a floating dtype (float16, bfloat16, float32, float64), "
            f"got {t.dtype}"
        )


def as_batch_matrix(x, name: str = "x", *, min_batch: int = 2) -> torch.Tensor:
    """``x`` as ``[B, N]``: a ``[B, *]`` tensor is flattened per sample (a view when possible)."""
    check_tensor(x, name)
    if x.dim() < 2:
        raise ValueError(
            f"{name}: expected at least 2 dims [B, N] or [B, *], got shape {tuple(x.shape)}"
        )
    check_float_dtype(x, name)
    if x.shape[0] < min_batch:
        raise ValueError(
            f"{name}: expected a batch of at least {min_batch} rows to estimate a covariance, "
            f"got B = {x.shape[0]}"
        )
    if x.dim() > 2:
        x = x.flatten(1)
    if x.shape[1] < 1:
        raise ValueError(
            f"{name}: expected at least one feature per sample, got shape {tuple(x.shape)}"
        )
    return x


def check_basis(V, x: torch.Tensor, compute_dtype=None, name: str = "V") -> torch.Tensor:
    """``V [N, N]`` on x's device in x's dtype (or ``compute_dtype``); returns V detached, in
    ``compute_dtype`` when one is given (a cast costs one N x N copy per call: keep V in it)."""
    check_tensor(V, name)
    n = x.shape[1]
    if V.dim() != 2 or V.shape[0] != n or V.shape[1] != n:
        raise ValueError(
            f"{name}: expected shape [N, N] = [{n}, {n}] (eigenvectors as columns, "
            f"N = features of x), got {tuple(V.shape)}"
        )
    allowed = {x.dtype} if compute_dtype is None else {x.dtype, compute_dtype}
    if V.dtype not in allowed:
        expected = " or ".join(sorted(str(d) for d in allowed))
        raise TypeError(f"{name}: expected dtype {expected} (the dtype of x), got {V.dtype}")
    if V.device != x.device:
        raise ValueError(f"{name}: expected device {x.device} (the device of x), got {V.device}")
    if V.requires_grad:
        raise ValueError(
            f"{name}: expected a constant basis (requires_grad=False), got one that requires "
            f"grad; the penalty holds V constant (the paper refreshes it outside the gradient), "
            f"so pass {name}.detach()"
        )
    if compute_dtype is not None and V.dtype != compute_dtype:
        V = V.to(compute_dtype)
    return V.detach()


def check_orthonormal(V: torch.Tensor, name: str = "V") -> None:
    """``V^T V = I`` to V's rounding (one N x N GEMM and a synchronisation: an opt-in check).

    Each entry of ``V^T V`` is a dot product of N terms rounded to V's unit roundoff ``u``
    (the float32 accumulation adds at most ``N u_32``): 16 (2 u + N u_32) is the bound.
    """
    N = V.shape[0]
    u = torch.finfo(V.dtype).eps / 2
    u_acc = min(u, 2.0**-24)
    gram = V.double().T @ V.double()
    off = float((gram - torch.eye(N, dtype=torch.float64, device=V.device)).abs().max())
    if not off <= 16.0 * (2.0 * u + N * u_acc):
        raise ValueError(
            f"{name}: expected orthonormal columns (V^T V = I, eigenvectors of a symmetric "
            f"matrix), got max |V^T V - I| = {off:.3g}"
        )


def check_real(value, name: str, *, low: float, low_inclusive: bool) -> float:
    if (
        isinstance(value, torch.Tensor)
        or not isinstance(value, numbers.Real)
        or isinstance(value, bool)
    ):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__}")
    value = float(value)
    ok = value >= low if low_inclusive else value > low
    if not ok or not math.isfinite(value):
        bound = ">=" if low_inclusive else ">"
        raise ValueError(f"{name}: expected a finite number {bound} {low}, got {value}")
    return value


def check_int_range(value, name: str, low: int, high: int, why: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an integer, got {type(value).__name__}")
    value = int(value)
    if not low <= value <= high:
        raise ValueError(f"{name}: expected an integer in {low}..{high}{why}, got {value}")
    return value
