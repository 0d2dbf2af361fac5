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


def reference_pgd_any(model, x, y, eps, steps, step_size, bounds=(0.0, 1.0), x_start=None):
    """The same textbook loop, judged on every iterate: (fooled [n], first fooling step [n] or
    -1, the first fooling iterate where fooled else the final one). Independent of the library:
    no retirement, no compaction, every row steps to the end."""
    lo, hi = bounds
    x_adv = x.clone() if x_start is None else x_start.clone()
    n = x.shape[0]
    first = torch.full((n,), -1, dtype=torch.long)
    kept = x_adv.clone()
    for k in range(steps + 1):
        with torch.no_grad():
            wrong = model(x_adv).argmax(1) != y
        new = wrong & (first < 0)
        first[new] = k
        kept[new] = x_adv[new]
        if k == steps:
            break
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y, reduction="sum")
        (g,) = torch.autograd.grad(loss, x_adv)
        x_adv = x_adv.detach() + step_size * g.sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(lo, hi)
    out = torch.where((first >= 0).view(-1, *([1] * (x.dim() - 1))), kept, x_adv)
    return first >= 0, first, out


def mostly_correct_labels(model, x, wrong_every=5):
    """Labels the model gets right on clean inputs, except every ``wrong_every``-th sample:
    so attacks have work to do and clean misclassifications are still covered."""
    with torch.no_grad():
        y = model(x).argmax(1)
    y[::wrong_every] = (y[::wrong_every] + 1) % 10
    return y


class Recording(torch.nn.Module):
    """A model that records each forward call's batch size and whether its input needs grad."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, []

    def forward(self, x):
        self.calls.append((x.shape[0], x.requires_grad))
        return self.inner(x)
