"""Eq. (2) of Nassar et al. (2020) on a spectrum: sort, the power-law target anchored at tau,
the penalty and dR/dlam, in one program (Triton), with its plain-torch twin and its CUDA C++
row. :mod:`powerlaw_fast.ops.spectral_penalty` runs this stage on the projected spectrum of a
batch; :func:`powerlaw_penalty` runs it on a given spectrum.

The stage ``spectrum_penalty`` writes the scratch layout of :mod:`powerlaw_fast.ops._layout`.

Example::

    >>> import torch
    >>> from powerlaw_fast.ops.powerlaw_penalty import powerlaw_penalty
    >>> lam = torch.tensor([4.0, 2.0, 1.0, 0.3])
    >>> # kappa = 2 * 2; r_3 = 1 / (4 / 3) = 0.75, r_4 = 0.3: (0.0625 + 0.49) / 4
    >>> round(float(powerlaw_penalty(lam, tau=2)), 4)
    0.1381
"""

from __future__ import annotations

import functools
import math

import torch

from powerlaw_fast._backend import resolve_backend
from powerlaw_fast._validation import check_float_dtype, check_real, check_tensor
from powerlaw_fast.ops import _alloc, status
from powerlaw_fast.ops._autograd import FusedOp
from powerlaw_fast.ops._layout import (
    MAX_FUSED_N,
    scratch_dR_dlam,
    scratch_size,
    scratch_status,
    scratch_width,
)
from powerlaw_fast.ops._plan import kink_tolerance
from powerlaw_fast.ops._settings import Settings, anchor_index, check_beta, status_raiser
from powerlaw_fast.ops._triton_gemm import next_power_of_2
from powerlaw_fast.ops.backends import implementation, register


@functools.cache
def _kernels():
    """The Triton kernels (:mod:`powerlaw_fast.ops._spectral_kernels`), imported on the first
    launch so that importing the package does not import triton."""
    from powerlaw_fast.ops import _spectral_kernels

    return _spectral_kernels


# --------------------------------------------------------------------------------------------
# The stage: Triton launcher, plain-torch twin, CUDA C++ row
# --------------------------------------------------------------------------------------------
@register("spectrum_penalty", "triton")
def spectrum_penalty_triton(src, count, anchor, alpha, beta, skip, mean_tol, tiny, kink_tol):
    """``src``: moments ``[2, M, N]`` (or a spectrum ``[N]`` when ``mean_tol is None``);
    ``count``: rows (a number, or a 0-dim tensor after an all-reduce); ``tiny``: the anchor
    test's fraction of the spectrum's mean; ``kink_tol``: the relu's rounding band -> scratch."""
    N = src.shape[-1]
    if N > MAX_FUSED_N:
        return spectrum_penalty_torch(
            src, count, anchor, alpha, beta, skip, mean_tol, tiny, kink_tol
        )
    parts = 2 if mean_tol is None else 3
    out = _alloc.empty((scratch_size(N, parts),), device=src.device, dtype=torch.float32)
    block = max(16, next_power_of_2(N))
    from_ptr = isinstance(count, torch.Tensor)
    _kernels()._spectrum_penalty_kernel[(1,)](
        src, count if from_ptr else src, out,
        src.shape[1] if mean_tol is not None else 1, N,
        float(count) if count is not None and not from_ptr else 0.0,
        mean_tol or 0.0, anchor, alpha, beta, tiny, kink_tol,
        FROM_MOMENTS=mean_tol is not None, COUNT_FROM_PTR=from_ptr,
        SKIP_NONPOSITIVE=skip, BLOCK=block, num_warps=4 if block <= 1024 else 8,
    )  # fmt: skip
    return out


def finish_spectrum_torch(moments, count, mean_tol):
    """``[2, M, N]`` row-block moments -> (``lam [N] = (S2 - S1^2 / B) / (B - 1)``, with
    values at the rounding level of ``S2`` set to 0 (see the module docstring); the column
    means of Z, ``S1 / B``, which the backward subtracts)."""
    s1, s2 = moments.sum(1)
    raw = s2 - s1 * s1 / count
    noise = (raw <= mean_tol * s2) & (s2 != float("inf"))
    return torch.where(noise, 0.0, raw) / (count - 1), s1 / count


@register("spectrum_penalty", "torch")
def spectrum_penalty_torch(src, count, anchor, alpha, beta, skip, mean_tol, tiny, kink_tol):
    """Twin of :func:`spectrum_penalty_triton`, the same scratch layout and the same decisions.

    Where one ulp could flip a branch, the choice is made on purpose and identically in every
    backend (so no verdict depends on a platform's ``log``/``exp``):

    - the anchor's own term is left out of the sum: it is ``(1 - 1)^2 + max(0, 1 - 1) = 0`` in
      value and slope by definition, but a rank ratio computed as ``exp(alpha * (log n -
      log tau))`` lands on 1 +- an ulp, and above 1 the relu would give the anchor a slope;
    - the relu's kink: where ``|r - 1|`` is within the rounding of ``r`` (``kink_tol``), the
      sign of ``r - 1`` is not known, and the subgradient 0 is taken (an exact power law then
      has gradient exactly 0 on every machine);
    - ties sort by column, the lower column first (a stable descending sort).
    """
    lam, zbar = (src, None) if mean_tol is None else finish_spectrum_torch(src, count, mean_tol)
    N = lam.shape[0]
    ordered, order = torch.sort(lam, descending=True, stable=True)
    ranks = torch.arange(1, N + 1, device=lam.device, dtype=lam.dtype)
    rank_ratio = torch.exp(alpha * (torch.log(ranks) - math.log(anchor + 1)))
    s_anchor = ordered[anchor]
    r = ordered / s_anchor * rank_ratio
    active = ranks > anchor + 1
    if skip:
        active = active & (ordered > 0)
    d = r - 1.0
    term = torch.where(active, d * d + d.clamp_min(0.0), 0.0)
    slope = (2.0 * d + (d > kink_tol).to(lam.dtype)) * rank_ratio / s_anchor
    grad_sorted = torch.where(active, slope * (beta / N), 0.0)
    grad = torch.empty_like(lam).scatter_(0, order, grad_sorted)
    penalty = term.sum() * (beta / N)
    nonfinite = (~torch.isfinite(lam)).sum().to(lam.dtype)
    overflow = (~torch.isfinite(grad_sorted[active])).any() | ~torch.isfinite(penalty)
    s_first = ordered[0]
    underflow = torch.finfo(lam.dtype).tiny / torch.finfo(lam.dtype).eps
    anchor_code = torch.where(
        (s_first > 0) & (s_first < underflow),
        2.0,
        (~(s_anchor > tiny * ordered.clamp_min(0).mean())).to(lam.dtype),
    )
    head = torch.stack(
        [penalty, nonfinite, anchor_code.to(lam.dtype), (overflow & (nonfinite == 0)).to(lam.dtype)]
    )
    return torch.cat([head, grad, lam] + ([] if zbar is None else [zbar.to(lam.dtype)]))


@register("spectrum_penalty", "cuda")
def spectrum_penalty_cuda(src, count, anchor, alpha, beta, skip, mean_tol, tiny, kink_tol):
    """The spectrum finished in torch, eq. (2) by csrc/powerlaw_penalty.cu -> scratch."""
    lam, zbar = (src, None) if mean_tol is None else finish_spectrum_torch(src, count, mean_tol)
    from powerlaw_fast.cuda import ops as cuda_ops

    penalty, grad, code = cuda_ops.powerlaw_penalty_cuda(
        lam.float(), alpha, anchor, beta, skip, tiny, kink_tol
    )
    overflow = (~torch.isfinite(penalty) | ~torch.isfinite(grad).all()) & (code[0] == 0)
    parts = [penalty.reshape(1), code.float(), overflow.reshape(1).float(), grad, lam]
    return torch.cat(parts + ([] if zbar is None else [zbar]))


# --------------------------------------------------------------------------------------------
# The op on a given spectrum, eager and compiled (FusedOp)
# --------------------------------------------------------------------------------------------
def _sorted_penalty(lam: torch.Tensor, settings: Settings) -> torch.Tensor:
    scratch = implementation("spectrum_penalty", settings.backend)(
        lam.contiguous(), None, settings.anchor, settings.alpha, settings.beta,
        settings.skip_nonpositive, None, 0.0,
        kink_tolerance(lam.shape[0], settings.alpha, lam.dtype),
    )  # fmt: skip
    status.check(scratch_status(scratch), settings.validate, status_raiser(settings),
                 op="powerlaw_penalty")  # fmt: skip
    return scratch


def _forward(inputs, settings: Settings):
    return [_sorted_penalty(inputs[0], settings)]


def _fake(inputs, settings: Settings):
    lam = inputs[0]
    return [lam.new_empty((scratch_size(lam.shape[0], 2),))]


def _backward(grads, saved, inputs, settings: Settings):
    (scratch,) = saved
    return [grads[0] * scratch_dR_dlam(scratch, scratch_width(scratch, 2))]


# lam -> (R,): one autograd node eagerly, powerlaw_fast::powerlaw_penalty(_backward) compiled
POWERLAW_PENALTY = FusedOp(
    "powerlaw_penalty", Settings, forward=_forward, fake=_fake,
    outputs=lambda results: (results[0][0],), save=lambda inputs, results: [results[0]],
    backward=_backward, label=lambda settings: "powerlaw_penalty",
)  # fmt: skip


def powerlaw_penalty(
    lam: torch.Tensor,
    *,
    alpha: float = 1.0,
    tau: int = 10,
    beta: float = 1.0,
    convention: str = "paper",
    backend: str = "auto",
    validate: bool | str = "deferred",
) -> torch.Tensor:
    """Eq. (2) on a given spectrum ``lam [N]`` (any order; it is sorted descending inside).

    See :func:`spec_penalty` for the arguments and the two conventions. Differentiable in lam.

    Example::

        >>> lam = 1.0 / torch.arange(1, 51, dtype=torch.float64)
        >>> bool(powerlaw_penalty(lam, tau=10) < 1e-20)   # an exact 1/n spectrum costs nothing
        True
    """
    if not torch.compiler.is_compiling():
        status.poll()
    check_tensor(lam, "lam")
    if lam.dim() != 1 or lam.numel() < 1:
        raise ValueError(f"lam: expected a 1-D spectrum [N], got shape {tuple(lam.shape)}")
    check_float_dtype(lam, "lam")
    if lam.dtype in (torch.float16, torch.bfloat16):
        lam = lam.float()
    anchor = anchor_index(lam.shape[0], tau, convention)
    alpha = check_real(alpha, "alpha", low=0.0, low_inclusive=False)
    beta = check_beta(beta)
    mode = status.validation_mode(validate)
    name = resolve_backend(backend, lam.device, dtype=lam.dtype)
    settings = Settings(backend=name, anchor=anchor, alpha=alpha, beta=beta,
                        skip_nonpositive=convention == "authors", validate=mode, source="lam",
                        tau=tau)  # fmt: skip
    return POWERLAW_PENALTY([lam], settings)[0]
