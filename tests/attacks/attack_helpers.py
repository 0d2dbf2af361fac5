"""Tiny seeded models, data and the plain per-epsilon PGD loop the batched attacks must match."""

import torch
import torch.nn.functional as F


def make_mlp(dtype=torch.float64, seed=0, d_in=64, hidden=32, classes=10):
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(d_in, hidden), torch.nn.ReLU(),
        torch.nn.Linear(hidden, classes),
    )
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model.to(dtype)


def make_data(n=12, dtype=torch.float64, seed=1, classes=10):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((n, 1, 8, 8), generator=g).to(dtype)
    y = torch.randint(0, classes, (n,), generator=g)
    return x, y


def reference_pgd(model, x, y, eps, steps, step_size, bounds=(0.0, 1.0), x_start=None):
    """The textbook loop, one epsilon at a time."""
    lo, hi = bounds
    x_adv = x.clone() if x_start is None else x_start.clone()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y, reduction="sum")
        (g,) = torch.autograd.grad(loss, x_adv)
        x_adv = x_adv.detach() + step_size * g.sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(lo, hi)
    return x_adv
