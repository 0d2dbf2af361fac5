"""Jacobian regularisation baseline, eq. (11) of Nassar et al. (2020).

``R_J = beta_j / B * sum_b ||d f(x_b) / d x_b||_F^2`` with ``f`` the logits, as in the authors'
code, which follows Hoffman, Roberts & Yaida (2019, "Robust learning with Jacobian
regularization") and sets ``beta_j = 0.01``. (The paper's eq. 11 writes the gradient of the loss;
the authors regularised the Jacobian of the logits, which is what this computes.)

Hoffman et al.'s estimator: for ``v`` uniform on the unit sphere in C dimensions (C = number of
logits), ``E[v v^T] = I / C``, so ``C * ||J^T v||^2`` is an unbiased estimate of ``||J||_F^2``.
One vector-Jacobian product per projection replaces the C of the exact Frobenius norm.
"""

from __future__ import annotations

import torch

from .._validation import check_float_dtype, check_int_range, check_real, check_tensor


def _check_inputs(x, logits) -> None:
    check_tensor(x, "x")
    check_tensor(logits, "logits")
    check_float_dtype(x, "x")
    check_float_dtype(logits, "logits")
    if not x.requires_grad:
        raise ValueError(
            "x: expected an input with requires_grad=True that logits were computed from "
            "(call x.requires_grad_() before the forward pass), got requires_grad=False"
        )
    if logits.dim() != 2:
        raise ValueError(f"logits: expected shape [B, C], got {tuple(logits.shape)}")
    if x.dim() < 1 or x.shape[0] != logits.shape[0]:
        raise ValueError(
            f"x: expected the batch size of logits ({logits.shape[0]}) as its first dim, got "
            f"shape {tuple(x.shape)}"
        )
    if logits.grad_fn is None:
        raise ValueError("logits: expected a tensor computed from x (it has no autograd graph)")


def _input_gradient(logits: torch.Tensor, x: torch.Tensor, cotangent: torch.Tensor) -> torch.Tensor:
    (grad,) = torch.autograd.grad(
        logits, x, grad_outputs=cotangent, create_graph=True, retain_graph=True
    )
    return grad


def jacobian_penalty(
    x: torch.Tensor,
    logits: torch.Tensor,
    *,
    beta: float = 0.01,
    projections: int = 1,
    exact: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Eq. (11): ``beta / B * sum_b ||d logits_b / d x_b||_F^2``, differentiable (a scalar).

    Args:
        x: the input batch ``[B, *]`` with ``requires_grad=True``; ``logits`` computed from it.
        logits: ``[B, C]``.
        beta: beta_j (0.01 in the paper).
        projections: number of random projections averaged by the estimator (Hoffman et al.
            use 1). Each costs one backward pass through the network.
        exact: compute the Frobenius norm exactly with C backward passes (unit vectors).
        generator: random source for the projections (its device is where they are drawn).

    Samples must be independent in the forward pass (no batch-norm in training mode, no batch
    whitening): the per-sample Jacobians are read off one batched backward pass, which otherwise
    also picks up cross-sample terms.

    Returns a 0-dim tensor in the dtype of the input gradient; ``create_graph=True`` so the
    penalty trains the network (a double backward).

    Example::

        >>> import torch
        >>> from powerlaw_fast.paper.jacobian import jacobian_penalty
        >>> W = torch.randn(10, 784)
        >>> x = torch.rand(4, 784, requires_grad=True)
        >>> exact = jacobian_penalty(x, x @ W.T, exact=True)
        >>> torch.allclose(exact, 0.01 * (W * W).sum())
        True
    """
    _check_inputs(x, logits)
    beta = check_real(beta, "beta", low=0.0, low_inclusive=True)
    projections = check_int_range(projections, "projections", 1, 1 << 16)
    if not isinstance(exact, bool):
        raise TypeError(f"exact: expected a bool, got {type(exact).__name__}")
    batch, classes = logits.shape

    if exact:
        total = logits.new_zeros(())
        for c in range(classes):
            unit = torch.zeros_like(logits)
            unit[:, c] = 1.0
            grad = _input_gradient(logits, x, unit)
            total = total + (grad * grad).sum()
        return beta / batch * total

    total = logits.new_zeros(())
    for _ in range(projections):
        draw_device = generator.device if generator is not None else logits.device
        v = torch.randn(batch, classes, generator=generator, device=draw_device, dtype=logits.dtype)
        v = v.to(logits.device)
        v = v / v.norm(dim=1, keepdim=True)  # uniform on the unit sphere, one per sample
        grad = _input_gradient(logits, x, v)
        total = total + (grad * grad).sum()
    return beta / batch * (classes / projections) * total
