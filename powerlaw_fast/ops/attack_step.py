"""The fused PGD / FGSM update: one pass over ``[R, D]`` per attack step.

For every row r (an epsilon replica of a sample) and feature d::

    x_new = clamp(clamp(x_adv + step * sign(grad), x_nat - eps_r, x_nat + eps_r), lo, hi)

which is eq. (8) of Nassar et al. (2020) with the sign of the gradient (Madry et al.'s L-inf
PGD), followed by the pixel box. ``sign(0) = 0`` as ``torch.sign``; a NaN gradient also gives 0
(as ``torch.sign``); a NaN in ``x_adv`` stays NaN (as ``torch.clamp``).

Row cycling: ``x_adv``, ``x_nat`` and ``grad`` may each have R rows or S rows with S dividing R;
row r then reads row ``r % S``. An epsilon grid is laid out epsilon-major (row = e * n + i), so
the ``n`` natural images are read E times but never copied E times, and FGSM reads one shared
gradient for every epsilon.

Established attack libraries spend 7-29 full-size tensor passes per step (sign, scale, add,
subtract, clamp, max, min, ... each its own kernel); this is one read of each input and one write.

Precision: float16 / bfloat16 are computed in float32 and rounded once at the end, float32 in
float32, float64 in float64 (torch backend only). The Triton kernel and the torch reference do
the same operations in the same order, so they agree bit for bit.

The update is the ``pgd_update`` stage of the backend table (:mod:`powerlaw_fast.ops.backends`):
``(x_adv, x_nat, grad, eps_rows, step_size, lo, hi, out) -> out``, inputs already checked by
:func:`pgd_update`. Rows: ``torch`` (:func:`pgd_update_reference` copied into ``out``),
``triton`` (kernel in ``ops/_attack_step_kernels.py``, imported on the first launch) and
``cuda`` (``csrc/pgd_update.cu`` through :mod:`powerlaw_fast.cuda`, imported on first use).

Example::

    >>> from powerlaw_fast.ops.backends import implementation
    >>> implementation("pgd_update", "torch").__name__
    'pgd_update_torch'
"""

from __future__ import annotations

import functools
import math
import numbers

import torch

from powerlaw_fast._backend import resolve_backend, triton_interpreter_active
from powerlaw_fast._torch_helpers import accumulation_dtype
from powerlaw_fast._validation import check_float_dtype, check_real, check_tensor
from powerlaw_fast.ops._triton_gemm import cdiv, next_power_of_2
from powerlaw_fast.ops.backends import implementation, register

__all__ = ["pgd_update", "pgd_update_reference", "resolve_step_backend"]


# --------------------------------------------------------------------------- Triton kernel


@functools.cache
def _kernels():
    """This family's Triton kernels (:mod:`powerlaw_fast.ops._attack_step_kernels`), imported on the
    first launch so that importing the package does not import triton."""
    from powerlaw_fast.ops import _attack_step_kernels

    return _attack_step_kernels


def _tile_sizes(D: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_D, num_warps). The interpreter pays per program, so it gets big tiles."""
    if triton_interpreter_active():
        block_d = min(next_power_of_2(D), 4096)
        return max(1, 16384 // block_d), block_d, 4
    block_d = min(next_power_of_2(D), 512)
    return max(1, 4096 // block_d), block_d, 4


@register("pgd_update", "triton")
def pgd_update_triton(x_adv, x_nat, grad, eps_rows, step_size, lo, hi, out):
    """Launcher: the fused update into ``out [R, D]`` (rows of the inputs cycled)."""
    R, D = out.shape
    block_r, block_d, num_warps = _tile_sizes(D)
    grid = (cdiv(R, block_r), cdiv(D, block_d))
    _kernels()._pgd_update_kernel[grid](
        x_adv, x_nat, grad, eps_rows, out,
        R, D, x_adv.shape[0], x_nat.shape[0], grad.shape[0],
        x_adv.stride(0), x_adv.stride(1), x_nat.stride(0), x_nat.stride(1),
        grad.stride(0), grad.stride(1), eps_rows.stride(0), out.stride(0), out.stride(1),
        step_size, lo, hi,
        BLOCK_R=block_r, BLOCK_D=block_d, num_warps=num_warps,
    )  # fmt: skip
    return out


# --------------------------------------------------------------------------- torch reference
def _cycle_rows(t: torch.Tensor, R: int) -> torch.Tensor:
    return t if t.shape[0] == R else t.repeat(R // t.shape[0], 1)


def pgd_update_reference(
    x_adv: torch.Tensor,
    x_nat: torch.Tensor,
    grad: torch.Tensor,
    eps_rows: torch.Tensor,
    step_size: float,
    lo: float = -math.inf,
    hi: float = math.inf,
) -> torch.Tensor:
    """Plain-torch update, the definition the kernels are tested against.

    Shapes as :func:`pgd_update` (2-D inputs, rows cycled to ``R = eps_rows.shape[0]``).
    Returns a new ``[R, D]`` tensor of ``x_adv``'s dtype.

    >>> x = torch.tensor([[0.5, 0.5, 0.0]])
    >>> g = torch.tensor([[1.0, -2.0, 0.0]])
    >>> pgd_update_reference(x, x, g, torch.tensor([0.1]), 0.3, 0.0, 1.0)
    tensor([[0.6000, 0.4000, 0.0000]])
    """
    R = eps_rows.shape[0]
    compute = accumulation_dtype(x_adv.dtype)
    x = _cycle_rows(x_adv, R).to(compute)
    xn = _cycle_rows(x_nat, R).to(compute)
    g = _cycle_rows(grad, R).to(compute)
    eps = eps_rows.to(compute)[:, None]
    x = x + step_size * torch.sign(g)
    x = torch.clamp(x, min=xn - eps, max=xn + eps)
    return torch.clamp(x, min=lo, max=hi).to(x_adv.dtype)


@register("pgd_update", "torch")
def pgd_update_torch(x_adv, x_nat, grad, eps_rows, step_size, lo, hi, out):
    """The torch row: :func:`pgd_update_reference` written into ``out``."""
    return out.copy_(pgd_update_reference(x_adv, x_nat, grad, eps_rows, step_size, lo, hi))


# --------------------------------------------------------------------------- CUDA C++ row
@register("pgd_update", "cuda")
def pgd_update_cuda(x_adv, x_nat, grad, eps_rows, step_size, lo, hi, out):
    """CUDA C++ row: csrc/pgd_update.cu (powerlaw_fast.cuda, imported on first use)."""
    from powerlaw_fast.cuda import ops

    return ops.pgd_update_cuda(x_adv, x_nat, grad, eps_rows, step_size, lo, hi, out)


# --------------------------------------------------------------------------- public function
def resolve_step_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The table row :func:`pgd_update` runs for ``backend`` on tensors of ``device`` and
    ``dtype`` ("torch", "triton" or "cuda"); a ValueError (TypeError for a dtype) saying what
    is missing when it cannot run there. The attacks resolve once and pass the name on."""
    return resolve_backend(backend, device, dtype=dtype)


def _check_rows(t: torch.Tensor, name: str, R: int, D: int) -> None:
    if t.dim() != 2 or t.shape[1] != D or t.shape[0] < 1 or R % t.shape[0] != 0:
        raise ValueError(
            f"{name}: expected shape [S, {D}] with S dividing R = {R} (row r reads row r % S), "
            f"got {tuple(t.shape)}"
        )


def pgd_update(
    x_adv: torch.Tensor,
    x_nat: torch.Tensor,
    grad: torch.Tensor,
    eps_per_row,
    step_size: float,
    bounds: tuple[float, float] | None = (0.0, 1.0),
    *,
    backend: str = "auto",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One signed-gradient step, projected on each row's L-inf ball and on ``bounds``.

    Args:
        x_adv: ``[R, D]`` current iterates (or ``[S, D]``, S dividing R: row r reads ``r % S``).
        x_nat: ``[S, D]`` natural inputs, row r reads row ``r % S`` (S = R: one per row).
        grad: ``[R, D]`` or ``[S, D]`` loss gradient w.r.t. the iterate, same row rule.
        eps_per_row: ``[R]`` float tensor (each row's radius, >= 0) or a float for every row.
            A float needs ``x_adv`` with all R rows.
        step_size: float >= 0.
        bounds: ``(lo, hi)`` pixel box, or None for no box.
        backend: "auto" | "torch" | "triton" | "cuda".
        out: ``[R, D]`` destination; ``out=x_adv`` updates in place. Must not overlap
            ``x_nat`` or ``grad`` unless it is the very same tensor as ``x_adv``.

    dtypes: float16, bfloat16, float32 (all backends), float64 (torch). All three inputs share
    one dtype and device. Returns ``out`` (a new tensor when ``out`` is None). Never synchronises
    with the host, so it can run inside a CUDA graph.

    >>> x = torch.rand(4, 6); g = torch.randn(4, 6)
    >>> x2 = pgd_update(x, x, g, torch.full((4,), 0.1), 0.01)
    >>> bool(((x2 - x).abs() <= 0.01 + 1e-7).all())
    True
    """
    check_tensor(x_adv, "x_adv")
    check_tensor(x_nat, "x_nat")
    check_tensor(grad, "grad")
    check_float_dtype(x_adv, "x_adv")
    if x_adv.dim() != 2:
        raise ValueError(f"x_adv: expected a 2-D tensor [R, D], got shape {tuple(x_adv.shape)}")
    for t, name in ((x_nat, "x_nat"), (grad, "grad")):
        if t.dtype != x_adv.dtype:
            raise TypeError(
                f"{name}: expected dtype {x_adv.dtype} (the dtype of x_adv), got {t.dtype}"
            )
        if t.device != x_adv.device:
            raise ValueError(
                f"{name}: expected device {x_adv.device} (the device of x_adv), got {t.device}"
            )
    D = x_adv.shape[1]
    eps_dtype = accumulation_dtype(x_adv.dtype)
    if isinstance(eps_per_row, torch.Tensor):
        if eps_per_row.dim() != 1:
            raise ValueError(
                f"eps_per_row: expected a 1-D tensor [R], got shape {tuple(eps_per_row.shape)}"
            )
        if eps_per_row.device != x_adv.device:
            raise ValueError(
                f"eps_per_row: expected device {x_adv.device}, got {eps_per_row.device}"
            )
        check_float_dtype(eps_per_row, "eps_per_row")
        eps_rows = eps_per_row.to(eps_dtype)
    elif isinstance(eps_per_row, numbers.Real) and not isinstance(eps_per_row, bool):
        eps = check_real(eps_per_row, "eps_per_row", low=0.0, low_inclusive=True)
        eps_rows = torch.full((x_adv.shape[0],), eps, dtype=eps_dtype, device=x_adv.device)
    else:
        raise TypeError(
            f"eps_per_row: expected a float or a 1-D tensor, got {type(eps_per_row).__name__}"
        )
    R = eps_rows.shape[0]
    if R < 1:
        raise ValueError("eps_per_row: expected at least one row, got 0")
    _check_rows(x_adv, "x_adv", R, D)
    _check_rows(x_nat, "x_nat", R, D)
    _check_rows(grad, "grad", R, D)
    step_size = check_real(step_size, "step_size", low=0.0, low_inclusive=True)
    if bounds is None:
        lo, hi = -math.inf, math.inf
    else:
        if not isinstance(bounds, (tuple, list)) or len(bounds) != 2:
            raise ValueError(f"bounds: expected a pair (lo, hi) or None, got {bounds!r}")
        lo, hi = float(bounds[0]), float(bounds[1])
        if not lo < hi:
            raise ValueError(f"bounds: expected lo < hi, got {bounds!r}")
    if out is None:
        out = torch.empty((R, D), dtype=x_adv.dtype, device=x_adv.device)
    else:
        check_tensor(out, "out")
        if out.shape != (R, D) or out.dtype != x_adv.dtype or out.device != x_adv.device:
            raise ValueError(
                f"out: expected shape {(R, D)}, dtype {x_adv.dtype}, device {x_adv.device}; got "
                f"{tuple(out.shape)}, {out.dtype}, {out.device}"
            )

    resolved = resolve_step_backend(backend, x_adv.device, x_adv.dtype)
    update = implementation("pgd_update", resolved)
    return update(x_adv, x_nat, grad, eps_rows, step_size, lo, hi, out)
