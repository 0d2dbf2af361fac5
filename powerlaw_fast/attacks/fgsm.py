"""FGSM (eq. 6 of Nassar et al. 2020) over an epsilon grid from ONE input gradient.

``x_adv = clamp(x + eps * sign(grad_x CE(model(x), y)), lo, hi)``. The gradient at x does not
depend on eps, so the whole grid costs one forward/backward plus one fused write of E x n rows.

For a robustness curve (:func:`fgsm_search`) the forward of that gradient pass also gives the
clean verdict (eps = 0 costs nothing more), and by default the grid is judged in increasing eps
with nested balls: a sample fooled by the FGSM point of eps_i is fooled at every eps_j > eps_i
(that point lies in the larger ball), so only survivors are classified at eps_j.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from powerlaw_fast._torch_helpers import accumulation_dtype, eval_mode
from powerlaw_fast.attacks._common import (
    AttackResult,
    check_bounds,
    check_eps,
    check_inputs,
    check_labels,
    fp32_forward,
    input_gradient,
    misclassified,
)
from powerlaw_fast.ops.attack_step import pgd_update, resolve_step_backend

__all__ = ["fgsm", "fgsm_search", "fgsm_sweep"]


def fgsm_sweep(model, x: torch.Tensor, y: torch.Tensor, eps_list: list[float],
               bounds: tuple[float, float], backend: str) -> torch.Tensor:
    """Validated core (model already in eval mode): ``[E, n, *]`` adversarial examples."""
    n, E = x.shape[0], len(eps_list)
    x_leaf = x.detach().clone().requires_grad_(True)
    grad = input_gradient(model, x_leaf, y.long()).reshape(n, -1)
    x2d = x.detach().reshape(n, -1)
    eps_dtype = accumulation_dtype(x.dtype)
    eps_rows = torch.tensor(eps_list, dtype=eps_dtype, device=x.device).repeat_interleave(n)
    # A step of max(eps) >= every row's eps, then the projection onto each row's ball, gives
    # exactly x + eps_row * sign(g): the ball's edge x +- eps is the same float operation.
    with torch.no_grad():
        out = pgd_update(x2d, x2d, grad, eps_rows, max(eps_list), bounds, backend=backend)
    return out.view(E, *x.shape)


def fgsm_search(model, x: torch.Tensor, y: torch.Tensor, eps_list: list[float],
                bounds: tuple[float, float], backend: str, *, final_iterate: bool = False,
                max_batch: int | None = None) -> AttackResult:
    """Verdicts of FGSM over the grid (model in eval mode, inputs validated), ``adv`` None.

    Default: a sample is fooled at eps_j when x or the FGSM point of some eps_i <= eps_j is
    misclassified (never weaker than judging each eps on its own; monotone in eps).
    ``final_iterate=True``: each eps judged on its own FGSM point, as a per-eps loop does.
    Every verdict is an fp32 forward of the very example it judges.
    """
    n = x.shape[0]
    device = x.device
    y = y.long()
    x2d = x.detach().reshape(n, -1)
    x_leaf = x.detach().clone().requires_grad_(True)
    with torch.enable_grad(), fp32_forward(device):
        logits = model(x_leaf)
        (grad,) = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), x_leaf)
    grad = grad.reshape(n, -1)
    clean_wrong = logits.detach().argmax(dim=1) != y
    levels = sorted(set(eps_list))
    L = len(levels)
    level_idx = torch.tensor([levels.index(e) for e in eps_list], device=device)
    first_entry = torch.tensor([eps_list.index(v) for v in levels] + [-1], device=device)
    row_forwards = 0
    if final_iterate:  # every eps on its own point; eps = 0 is the clean verdict
        wrong = torch.empty((L, n), dtype=torch.bool, device=device)
        for u, eps in enumerate(levels):
            wrong[u] = clean_wrong if eps == 0.0 else _fooled_at(model, x, x2d, grad, y, eps,
                                                                bounds, backend, max_batch)
            row_forwards += 0 if eps == 0.0 else n
        success = wrong[level_idx]
        E = len(eps_list)
        found_at = torch.where(success, torch.arange(E, device=device)[:, None], -1)
        zero = torch.tensor([e == 0.0 for e in eps_list], device=device)[:, None]
        step = torch.where(success, torch.where(zero, 0, 1), -1)
        return AttackResult(None, success, step, found_at, row_steps=n,
                            row_forwards=row_forwards)
    # nested: level_of[i] = the smallest level whose ball holds a fooling point (L: none)
    level_of = torch.where(clean_wrong, 0, L)
    for u, eps in enumerate(levels):
        alive = (level_of == L).nonzero().squeeze(1)
        if eps == 0.0 or alive.numel() == 0:
            continue
        hit = _fooled_at(model, x[alive], x2d[alive], grad[alive], y[alive], eps, bounds,
                         backend, max_batch)
        row_forwards += int(alive.numel())
        level_of[alive[hit]] = u
    success = level_of[None, :] <= level_idx[:, None]
    # step 0: x itself was misclassified; 1: an FGSM point
    step = torch.where(success, torch.where(clean_wrong, 0, 1)[None, :], -1)
    found_at = torch.where(success, first_entry[level_of][None, :], -1)
    return AttackResult(None, success, step, found_at, row_steps=n, row_forwards=row_forwards)


def _fooled_at(model, x, x2d, grad, y, eps, bounds, backend, max_batch) -> torch.Tensor:
    """FGSM verdict at one radius: a step of eps then the projection on the eps-ball, which is
    exactly x + eps * sign(g), classified by an fp32 forward."""
    with torch.no_grad():
        adv = pgd_update(x2d, x2d, grad, eps, eps, bounds, backend=backend)
    return misclassified(model, adv.view(-1, *x.shape[1:]), y, max_batch)


def fgsm(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps,
    *,
    bounds: tuple[float, float] = (0.0, 1.0),
    backend: str = "auto",
) -> torch.Tensor:
    """Fast gradient sign method for one eps or a grid of E eps (one gradient for all).

    Args:
        model: maps ``[n, *]`` to ``[n, classes]`` logits; run in eval mode, modes restored,
            parameters get no ``.grad``.
        x: ``[n, *]`` float inputs within ``bounds``; y: ``[n]`` integer labels in
            ``[0, classes)``.
        eps: float >= 0 or a sequence of them. bounds: pixel box ``(lo, hi)``.
        backend: update kernel: "auto" | "torch" | "triton" | "cuda".

    Returns: shaped like ``x`` for a float eps, ``[E, *x.shape]`` for a sequence.

    >>> model = torch.nn.Linear(4, 3)
    >>> x, y = torch.rand(5, 4), torch.tensor([0, 1, 2, 0, 1])
    >>> fgsm(model, x, y, [0.0, 0.1, 0.2]).shape
    torch.Size([3, 5, 4])
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    eps_list, single = check_eps(eps)
    bounds = check_bounds(bounds)
    check_inputs(x, y, bounds)
    resolved = resolve_step_backend(backend, x.device, x.dtype)
    with eval_mode(model):
        check_labels(model, x, y)
        adv = fgsm_sweep(model, x, y, eps_list, bounds, resolved)
    return adv[0] if single else adv
