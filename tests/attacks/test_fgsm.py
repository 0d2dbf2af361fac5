"""FGSM over an epsilon grid: one gradient, and exactly eq. (6) of the paper per epsilon."""

import pytest
import torch
import torch.nn.functional as F
from attack_helpers import make_data, make_mlp

from powerlaw_fast._backend import triton_available
from powerlaw_fast.attacks import fgsm

EPS = [0.0, 0.05, 0.1, 0.3]


def one_line_fgsm(model, x, y, eps):
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), x)
    return (x.detach() + eps * g.sign()).clamp(0.0, 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_equals_one_line_definition(dtype):
    model, (x, y) = make_mlp(dtype), make_data(n=9, dtype=dtype)
    adv = fgsm(model, x, y, EPS)
    assert adv.shape == (len(EPS), *x.shape)
    for e, a in zip(EPS, adv, strict=True):
        assert torch.equal(a, one_line_fgsm(model, x, y, e))


def test_single_eps_and_eps_zero():
    model, (x, y) = make_mlp(), make_data(n=5)
    assert torch.equal(fgsm(model, x, y, 0.0), x)
    a = fgsm(model, x, y, 0.1)
    assert a.shape == x.shape and torch.equal(a, one_line_fgsm(model, x, y, 0.1))


class Counting(torch.nn.Module):
    """Counts gradient passes (inputs that require grad) and rows through forward-only passes."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls, self.forward_rows = inner, 0, 0

    def forward(self, x):
        if x.requires_grad:
            self.calls += 1
        else:
            self.forward_rows += x.shape[0]
        return self.inner(x)


def test_one_gradient_for_the_whole_grid():
    model = Counting(make_mlp())
    x, y = make_data(n=6)
    fgsm(model, x, y, [0.01 * i for i in range(11)])
    assert model.calls == 1
    assert model.forward_rows == 1  # the label check: one row


def test_modes_and_param_grads():
    model = make_mlp().train()
    x, y = make_data(n=4)
    fgsm(model, x, y, EPS)
    assert model.training and all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.skipif(not triton_available(), reason="triton not installed")
def test_triton_backend_bit_for_bit(device):
    # CUDA when present: Triton runs CPU tensors only under the interpreter (off on a GPU)
    model, (x, y) = make_mlp(torch.float32).to(device), make_data(n=7, dtype=torch.float32)
    x, y = x.to(device), y.to(device)
    assert torch.equal(fgsm(model, x, y, EPS, backend="triton"),
                       fgsm(model, x, y, EPS, backend="torch"))


@pytest.mark.parametrize(
    "kw,exc,match",
    [
        (dict(eps=-0.2), ValueError, "eps"),
        (dict(eps=[0.1, float("inf")]), ValueError, "eps"),
        (dict(y=torch.zeros(3, dtype=torch.long)), ValueError, "y"),
        (dict(x=torch.full((4, 1, 8, 8), -0.1, dtype=torch.float64)), ValueError, "x"),
        (dict(bounds=(0.0, 0.0)), ValueError, "bounds"),
        (dict(backend="cuda"), ValueError, "cuda"),
    ],
)
def test_bad_input(kw, exc, match):
    x, y = make_data(n=4)
    args = dict(x=x, y=y, eps=0.1)
    args.update(kw)
    with pytest.raises(exc, match=match):
        fgsm(make_mlp(), args.pop("x"), args.pop("y"), args.pop("eps"), **args)


@pytest.mark.gpu
def test_gpu_equals_one_line_definition():
    model = make_mlp(torch.float32).cuda()
    x, y = make_data(n=64, dtype=torch.float32)
    x, y = x.cuda(), y.cuda()
    adv = fgsm(model, x, y, EPS)
    for e, a in zip(EPS, adv, strict=True):
        assert torch.equal(a, one_line_fgsm(model, x, y, e))
