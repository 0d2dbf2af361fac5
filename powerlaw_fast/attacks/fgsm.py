"""FGSM (eq. 6 of Nassar et al. 2020) over an epsilon grid from ONE input gradient.

``x_adv = clamp(x + eps * sign(grad_x CE(model(x), y)), lo, hi)``. The gradient at x does not
depend on eps, so the whole grid costs one forward/backward plus one fused write of E x n rows.
"""

from __future__ import annotations

import torch

from powerlaw_fast.attacks._common import (
    check_bounds,
    check_eps,
    check_inputs,
    eval_mode,
    input_gradient,
)
from powerlaw_fast.ops.attack_step import pgd_update, resolve_step_backend

__all__ = ["fgsm", "fgsm_sweep"]


def fgsm_sweep(model, x: torch.Tensor, y: torch.Tensor, eps_list: list[float],
               bounds: tuple[float, float], backend: str) -> torch.Tensor:
    """Validated core (model already in eval mode): ``[E, n, *]`` adversarial examples."""
    n, E = x.shape[0], len(eps_list)
    x_leaf = x.detach().clone().requires_grad_(True)
    grad = input_gradient(model, x_leaf, y.long()).reshape(n, -1)
    x2d = x.detach().reshape(n, -1)
    eps_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    eps_rows = torch.tensor(eps_list, dtype=eps_dtype, device=x.device).repeat_interleave(n)
    # A step of max(eps) >= every row's eps, then the projection onto each row's ball, gives
    # exactly x + eps_row * sign(g): the ball's edge x +- eps is the same float operation.
    with torch.no_grad():
        out = pgd_update(x2d, x2d, grad, eps_rows, max(eps_list), bounds, backend=backend)
    return out.view(E, *x.shape)


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
        x: ``[n, *]`` float inputs within ``bounds``; y: ``[n]`` integer labels.
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
        adv = fgsm_sweep(model, x, y, eps_list, bounds, resolved)
    return adv[0] if single else adv
