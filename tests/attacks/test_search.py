"""The default PGD/FGSM search (any iterate, early retirement, nested balls) against
independent plain per-eps loops: never weaker, every success verified, work saved."""

import importlib

import pytest
import torch
from attack_helpers import (
    make_data,
    make_mlp,
    mostly_correct_labels,
    reference_pgd,
    reference_pgd_any,
)

from powerlaw_fast.attacks import RobustnessCurve, fgsm, pgd, robustness_curve

EPS = [0.0, 0.01, 0.03, 0.06, 0.1, 0.3]
STEPS, STEP = 8, 0.01


def setup(n=40, dtype=torch.float64, seed=2):
    model = make_mlp(dtype, seed=seed)
    x, _ = make_data(n=n, dtype=dtype, seed=seed + 1)
    return model, x, mostly_correct_labels(model, x)


def wrong(model, x, y):
    with torch.no_grad():
        return model(x).argmax(1) != y


def loops(model, x, y, eps_grid, steps=STEPS, step=STEP):
    """Per eps: (final-iterate verdict, any-iterate verdict, first step) of the plain loop."""
    final, anyit, first = [], [], []
    for e in eps_grid:
        final.append(wrong(model, reference_pgd(model, x, y, e, steps, step), y))
        f, k, _ = reference_pgd_any(model, x, y, e, steps, step)
        anyit.append(f)
        first.append(k)
    return torch.stack(final), torch.stack(anyit), torch.stack(first)


@pytest.mark.parametrize("max_batch,compact_every", [(None, None), (7, 1), (13, 3), (None, 50)])
def test_default_equals_nested_any_iterate_loop(max_batch, compact_every):
    """success[j] = OR over eps_i <= eps_j of the plain loop's any-iterate verdict, exactly; so
    every sample the final-iterate loop fools is fooled here too."""
    model, x, y = setup()
    r = pgd(model, x, y, EPS, steps=STEPS, step_size=STEP, details=True, max_batch=max_batch,
            compact_every=compact_every)
    final, anyit, _ = loops(model, x, y, EPS)
    nested = torch.cummax(anyit.int(), dim=0).values.bool()
    assert torch.equal(r.success, nested)
    assert (r.success | ~final).all()  # never weaker than the loop
    assert 0 < int(final[1:].sum()) and int((~r.success[-1]).sum()) < x.shape[0]


def test_every_claimed_success_verifies_and_steps_replay():
    model, x, y = setup()
    r = pgd(model, x, y, EPS, steps=STEPS, step_size=STEP, details=True)
    assert r.unverified == 0
    for j, e in enumerate(EPS):
        s = r.success[j]
        adv = r.adv[j]
        assert wrong(model, adv[s], y[s]).all()  # misclassified by an fp32 forward
        assert ((adv - x).abs().flatten(1).amax(1) <= e + 1e-12).all()  # in the eps-ball
        assert adv.min() >= 0 and adv.max() <= 1
        # robust rows: the loop's final iterate at this eps
        ref = reference_pgd(model, x, y, e, STEPS, STEP)
        torch.testing.assert_close(adv[~s], ref[~s], rtol=0, atol=1e-12)
    # the recorded (ball, step) reproduces the example: the plain loop at eps[found_at] stopped
    # after `step` steps gives the same iterate
    for j in range(len(EPS)):
        for i in r.success[j].nonzero().flatten().tolist():
            src, k = int(r.found_at[j, i]), int(r.step[j, i])
            assert 0 <= src <= j and 0 <= k <= STEPS
            if k == 0:
                expect = x[i : i + 1]
            else:
                expect = reference_pgd(model, x[i : i + 1], y[i : i + 1], EPS[src], k, STEP)
            torch.testing.assert_close(r.adv[j, i : i + 1], expect, rtol=0, atol=1e-12)
    not_fooled = ~r.success
    assert (r.step[not_fooled] == -1).all() and (r.found_at[not_fooled] == -1).all()


def test_final_iterate_mode_matches_the_loop_verdicts():
    model, x, y = setup()
    final, _, _ = loops(model, x, y, EPS)
    r = pgd(model, x, y, EPS, steps=STEPS, step_size=STEP, details=True, final_iterate=True)
    assert torch.equal(r.success, final)
    c = robustness_curve(model, (x, y), EPS, steps=STEPS, step_size=STEP, final_iterate=True,
                         batch_size=15, progress=False)
    assert torch.equal(c.success, final)
    assert c.accuracy == pytest.approx((1 - final.double().mean(1)).tolist())


def test_curve_is_monotone_and_handles_any_grid_order():
    model, x, y = setup()
    grid = [0.1, 0.0, 0.03, 0.1, 0.01]  # unsorted, duplicated
    c = robustness_curve(model, (x, y), grid, steps=STEPS, step_size=STEP, batch_size=16,
                         progress=False)
    order = sorted(range(len(grid)), key=grid.__getitem__)
    acc = [c.accuracy[i] for i in order]
    assert all(a >= b for a, b in zip(acc, acc[1:], strict=False))
    assert torch.equal(c.success[0], c.success[3])
    ref = robustness_curve(model, (x, y), sorted(set(grid)), steps=STEPS, step_size=STEP,
                           progress=False)
    for k, e in enumerate(grid):
        assert torch.equal(c.success[k], ref.success[ref.eps.index(e)])
    assert c.accuracy[1] == pytest.approx(1 - wrong(model, x, y).double().mean().item())
    assert c.step.shape == c.found_at.shape == c.success.shape


class Counting(torch.nn.Module):
    """Rows through gradient passes and through forward-only passes."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.grad_rows, self.forward_rows = inner, 0, 0

    def forward(self, x):
        if x.requires_grad:
            self.grad_rows += x.shape[0]
        else:
            self.forward_rows += x.shape[0]
        return self.inner(x)


def test_eps_zero_costs_one_forward_and_no_steps():
    model, x, y = setup(n=10)
    counted = Counting(model)
    c = robustness_curve(counted, (x, y), [0.0], steps=40, progress=False)
    assert counted.grad_rows == 0
    assert counted.forward_rows == 1 + 10 + int(c.success.sum())  # labels, clean, final check
    assert c.work["row_steps"] == 0


def test_work_counts_are_exact_and_smaller_than_the_loop(monkeypatch):
    search_module = importlib.import_module("powerlaw_fast.attacks._pgd_search")

    model, x, y = setup()
    counted = Counting(model)
    r = pgd(counted, x, y, EPS, steps=STEPS, step_size=STEP, details=True)
    assert r.row_steps == counted.grad_rows
    assert r.row_forwards + 1 == counted.forward_rows  # + the one-row label check
    loop_work = len([e for e in EPS if e > 0]) * x.shape[0] * STEPS
    assert r.row_steps < loop_work
    # one radius at a time (no grouping of small batches): less work, the very same answer
    monkeypatch.setattr(search_module, "_GROUP_ROWS", {"cpu": 1, "cuda": 1})
    seq = pgd(model, x, y, EPS, steps=STEPS, step_size=STEP, details=True)
    assert seq.row_steps < loop_work / 2 and seq.row_steps <= r.row_steps
    for key in ("success", "step", "found_at", "adv"):
        assert torch.equal(getattr(seq, key), getattr(r, key)), key
    f = pgd(model, x, y, EPS, steps=STEPS, step_size=STEP, details=True, final_iterate=True)
    assert f.row_steps == loop_work  # eps = 0 skipped, nothing else


def test_fooled_rows_stop_stepping():
    """A sample fooled at step k costs k + 1 rows of forward/backward at its radius, no more."""
    model, x, y = setup()
    _, anyit, first = loops(model, x[:, :], y, [0.03])
    counted = Counting(model)
    r = pgd(counted, x, y, 0.03, steps=STEPS, step_size=STEP, details=True)
    clean = wrong(model, x, y)
    attacked = ~clean
    k = first[0][attacked]
    expected = int(torch.where(k >= 0, torch.clamp(k, max=STEPS - 1) + 1, STEPS).sum())
    # a row fooled at step k takes part in steps 0..k (its fooling iterate is seen in the
    # forward of step k, whose backward still runs before the compaction)
    assert r.row_steps == expected


def test_random_start_never_weaker_than_the_loop_from_the_same_start():
    model, x, y = setup(n=12)
    eps = 0.06
    g = torch.Generator().manual_seed(5)
    u = torch.rand((12, 64), generator=g, dtype=torch.float64).view_as(x)
    start = (x + (2 * u - 1) * eps).clamp(0, 1)
    r = pgd(model, x, y, eps, steps=STEPS, step_size=STEP, random_start=True, generator=5,
            details=True)
    f, _, _ = reference_pgd_any(model, x, y, eps, STEPS, STEP, x_start=start)
    clean = wrong(model, x, y)
    assert torch.equal(r.success, f | clean)


def test_restarts_in_default_mode():
    model, x, y = setup(n=20)
    one = pgd(model, x, y, [0.03], steps=2, random_start=True, generator=3, details=True)
    three = pgd(model, x, y, [0.03], steps=2, random_start=True, restarts=3, generator=3,
                details=True)
    assert (three.success | ~one.success).all()
    assert three.success.sum() >= one.success.sum()
    assert ((three.adv - x).abs().amax() <= 0.03 + 1e-12)


class Liar(torch.nn.Module):
    """Under autocast every prediction is wrong; in fp32 it is the honest model."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        out = self.inner(x)
        if torch.is_autocast_enabled(x.device.type):
            return out.roll(1, dims=1)
        return out


def test_reduced_precision_successes_are_verified_in_fp32():
    model, x, y = setup(dtype=torch.float32)
    liar = Liar(model)
    r = pgd(liar, x, y, EPS, steps=STEPS, step_size=STEP, precision="bf16", details=True)
    clean = wrong(model, x, y)
    assert not r.success[0][~clean].any()  # the lies at eps = 0 and step 0 were refused
    for j in range(len(EPS)):
        assert wrong(model, r.adv[j][r.success[j]], y[r.success[j]]).all()
    assert r.row_forwards > x.shape[0]  # the verification forwards


def test_reduced_precision_on_an_honest_model_stays_close():
    model, x, y = setup(dtype=torch.float32)
    full = robustness_curve(model, (x, y), EPS, steps=STEPS, step_size=STEP, progress=False)
    half = robustness_curve(model, (x, y), EPS, steps=STEPS, step_size=STEP, progress=False,
                            precision="bf16")
    tf32 = robustness_curve(model, (x, y), EPS, steps=STEPS, step_size=STEP, progress=False,
                            precision="tf32")
    assert half.accuracy[0] == full.accuracy[0] and torch.equal(tf32.success, full.success)
    assert max(abs(a - b) for a, b in zip(half.accuracy, full.accuracy, strict=True)) <= 0.1


def test_fgsm_curve_nested_and_final_modes():
    model, x, y = setup()
    adv = fgsm(model, x, y, EPS)
    per_eps = torch.stack([wrong(model, a, y) for a in adv])
    final = robustness_curve(model, (x, y), EPS, attack="fgsm", final_iterate=True,
                             progress=False)
    assert torch.equal(final.success, per_eps)
    nested = robustness_curve(model, (x, y), EPS, attack="fgsm", progress=False)
    assert torch.equal(nested.success, torch.cummax(per_eps.int(), 0).values.bool())
    clean = wrong(model, x, y)
    assert (nested.step[:, clean] == 0).all()
    assert ((nested.step == 1) == (nested.success & ~clean[None, :])).all()
    assert nested.work["row_steps"] == x.shape[0]  # one gradient
    assert nested.work["row_forwards"] < final.work["row_forwards"]


def test_json_round_trip_keeps_steps_and_work(tmp_path):
    model, x, y = setup(n=9)
    c = robustness_curve(model, (x, y), EPS, steps=3, progress=False)
    c.to_json(tmp_path / "c.json")
    back = RobustnessCurve.from_json(tmp_path / "c.json")
    assert torch.equal(back.step, c.step) and torch.equal(back.found_at, c.found_at)
    assert back.work == c.work and "step" not in c.to_dict()


def test_single_eps_details_shapes():
    model, x, y = setup(n=5)
    r = pgd(model, x, y, 0.1, steps=2, details=True)
    assert r.adv.shape == x.shape and r.success.shape == (5,) and r.step.shape == (5,)


@pytest.mark.parametrize(
    "kw,exc,match",
    [
        (dict(precision="fp8"), ValueError, "precision"),
        (dict(final_iterate=1), TypeError, "final_iterate"),
        (dict(compact_every=0), ValueError, "compact_every"),
    ],
)
def test_bad_new_arguments(kw, exc, match):
    model, x, y = setup(n=4)
    with pytest.raises(exc, match=match):
        pgd(model, x, y, 0.1, steps=1, **kw)
    with pytest.raises(exc, match=match):
        robustness_curve(model, (x, y), [0.1], steps=1, progress=False, **kw)


@pytest.mark.gpu
def test_gpu_default_mode_never_weaker_than_the_loop():
    model, x, y = setup(n=64, dtype=torch.float32)
    model, x, y = model.cuda(), x.cuda(), y.cuda()
    r = pgd(model, x, y, EPS, steps=STEPS, step_size=STEP, details=True)
    for j, e in enumerate(EPS):
        ref = reference_pgd(model, x, y, e, STEPS, STEP)
        assert (r.success[j] | ~wrong(model, ref, y)).all()
        assert wrong(model, r.adv[j][r.success[j]], y[r.success[j]]).all()
    # graphs stay in the final-iterate mode, which must still match its eager run
    g = pgd(model, x, y, EPS, steps=STEPS, step_size=STEP, final_iterate=True, cuda_graph=True)
    e_ = pgd(model, x, y, EPS, steps=STEPS, step_size=STEP, final_iterate=True, cuda_graph=False)
    assert ((g - e_).abs() <= 2 * STEP + 1e-6).all()
