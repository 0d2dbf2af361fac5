"""Autograd helpers shared by the op families.

Example::

    >>> import torch
    >>> from powerlaw_fast.ops._autograd import refuse_second_order
    >>> g = torch.ones(3)
    >>> refuse_second_order(g, torch.zeros(3), "op") is g   # outside a create_graph backward
    True
"""

from __future__ import annotations

import torch


def refuse_second_order(grad: torch.Tensor, source: torch.Tensor, op: str) -> torch.Tensor:
    """``grad`` (the gradient for the input ``source``) unchanged, but an error if it is
    differentiated in a ``create_graph=True`` backward.

    The kernels' backward is not differentiable, and for the penalty no second derivative is
    consistent with holding kappa constant, so an error beats a silently wrong or missing
    second-order term. ``@once_differentiable`` is not enough: it stays silent when the
    incoming gradient is a constant, and its error node is pruned by ``torch.autograd.grad``
    unless it leads back to ``source``, as this one does.
    """
    if not torch.is_grad_enabled() or not source.requires_grad:
        return grad
    delayed = torch._C._functions.DelayedError(
        f"{op}: its gradient is not differentiable (second-order gradients through it are "
        f"not supported: the paper holds kappa constant, so no second derivative is "
        f"consistent with its gradient); compute second-order terms without it".encode(),
        2,
    )
    return delayed(grad.detach().requires_grad_(True), source)[0]
