"""FGSM over an epsilon grid: one gradient, and exactly eq. (6) of the paper per epsilon."""

import pytest
import torch
import torch.nn.functional as F
from attack_helpers import Recording, make_data, make_mlp

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


# --- found by `nox -s mutants -- attacks/fgsm.py` (issue 28): each test below fails for a
# one-line change of fgsm.py that the tests above let through


def one_line_fgsm_in(model, x, y, eps, bounds):
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), x)
    return (x.detach() + eps * g.sign()).clamp(*bounds)


def labelled(n, wrong_every=4):
    model, (x, _) = make_mlp(), make_data(n=n)
    x = 2 * x - 1  # in [-1, 1]
    with torch.no_grad():
        y = model(x).argmax(1)
    y[::wrong_every] = (y[::wrong_every] + 1) % 10
    return model, x, y


def wrong(model, x, y):
    with torch.no_grad():
        return model(x).argmax(1) != y


def test_custom_bounds_equal_the_one_line_definition():
    model, x, y = labelled(8)
    adv = fgsm(model, x, y, [0.0, 0.3, 1.5], bounds=(-1.0, 1.0))
    for e, a in zip([0.0, 0.3, 1.5], adv, strict=True):
        assert torch.equal(a, one_line_fgsm_in(model, x, y, e, (-1.0, 1.0)))
    assert (adv[1] < 0).any() and adv.min() >= -1.0


@pytest.mark.parametrize("final_iterate", [False, True])
def test_curve_with_custom_bounds_judges_the_one_line_points(final_iterate):
    from powerlaw_fast.attacks import robustness_curve

    model, x, y = labelled(16)
    eps = [0.0, 0.05, 0.2, 1.0]
    per_eps = torch.stack([wrong(model, one_line_fgsm_in(model, x, y, e, (-1.0, 1.0)), y)
                           for e in eps])
    c = robustness_curve(model, (x, y), eps, attack="fgsm", bounds=(-1.0, 1.0),
                         final_iterate=final_iterate, progress=False)
    expect = per_eps if final_iterate else torch.cummax(per_eps.int(), 0).values.bool()
    assert torch.equal(c.success, expect)
    # the clamp to [-1, 1] matters here: with [0, 1] the points differ
    assert not torch.equal(per_eps, torch.stack(
        [wrong(model, one_line_fgsm_in(model, x, y, e, (0.0, 1.0)).clamp(-1, 1), y)
         for e in eps]))


def test_final_iterate_verdicts_steps_and_work():
    from powerlaw_fast.attacks.fgsm import fgsm_search

    model, x, y = labelled(12)
    rec = Recording(model)
    eps = [0.1, 0.0, 0.4, 0.1]  # unsorted, duplicated
    r = fgsm_search(rec.eval(), x, y, eps, (-1.0, 1.0), "torch", final_iterate=True,
                    max_batch=5)
    per_eps = torch.stack([wrong(model, one_line_fgsm_in(model, x, y, e, (-1.0, 1.0)), y)
                           for e in eps])
    assert torch.equal(r.success, per_eps) and r.adv is None
    zero = torch.tensor([e == 0.0 for e in eps])[:, None]
    assert torch.equal(r.step, torch.where(r.success, torch.where(zero, 0, 1), -1))
    assert torch.equal(r.found_at, torch.where(r.success, torch.arange(4)[:, None], -1))
    assert (r.row_steps, r.row_forwards) == (12, 2 * 12)  # one gradient; two radii > 0
    assert [c for c in rec.calls if c[1]] == [(12, True)]
    verdicts = [rows for rows, grad in rec.calls if not grad]
    assert sum(verdicts) == r.row_forwards and max(verdicts) <= 5


def test_nested_verdicts_steps_and_work():
    from powerlaw_fast.attacks.fgsm import fgsm_search

    model, x, y = labelled(12)
    rec = Recording(model)
    eps = [0.03, 0.0, 0.01]
    r = fgsm_search(rec.eval(), x, y, eps, (-1.0, 1.0), "torch", max_batch=3)
    per_eps = torch.stack([wrong(model, one_line_fgsm_in(model, x, y, e, (-1.0, 1.0)), y)
                           for e in eps])
    clean = wrong(model, x, y)
    at_01 = per_eps[2] | clean
    at_03 = at_01 | per_eps[0]
    assert torch.equal(r.success, torch.stack([at_03, clean, at_01]))
    assert clean.any() and (at_01 & ~clean).any() and (at_03 & ~at_01).any() and (~at_03).any()
    assert torch.equal(r.step, torch.where(r.success, torch.where(clean, 0, 1)[None, :], -1))
    # found_at: the caller's index of the smallest radius whose point fooled the sample
    first = torch.where(clean, 1, torch.where(at_01, 2, 0))
    assert torch.equal(r.found_at, torch.where(r.success, first[None, :], -1))
    # only the survivors of each smaller radius are classified again
    assert r.row_steps == 12 and r.row_forwards == int((~clean).sum() + (~at_01).sum())
    verdicts = [rows for rows, grad in rec.calls if not grad]
    assert sum(verdicts) == r.row_forwards and max(verdicts) <= 3


def test_nested_skips_radii_once_every_sample_is_fooled():
    from powerlaw_fast.attacks.fgsm import fgsm_search

    model, x, y = labelled(6)
    rec = Recording(model)
    r = fgsm_search(rec.eval(), x, y, [0.0, 2.0, 3.0], (-1.0, 1.0), "torch")
    assert r.success[1:].all()  # a step of 2 in [-1, 1] fools every sample here
    assert r.row_forwards == int((~wrong(model, x, y)).sum())  # radius 3 costs nothing


def test_nested_attacks_a_single_survivor():
    from powerlaw_fast.attacks.fgsm import fgsm_search

    model, x, y = labelled(12)
    keep = ~wrong(model, x, y)
    x1, y1 = x[keep][:1], y[keep][:1]  # one clean-correct sample
    point = one_line_fgsm_in(model, x1, y1, 0.5, (-1.0, 1.0))
    assert wrong(model, point, y1).all()
    r = fgsm_search(model.eval(), x1, y1, [0.0, 0.5], (-1.0, 1.0), "torch")
    assert r.success.tolist() == [[False], [True]] and r.row_forwards == 1


def test_a_model_that_is_not_a_module_is_named():
    x, y = make_data(n=2)
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module, got function"):
        fgsm(lambda t: t, x, y, 0.1)
