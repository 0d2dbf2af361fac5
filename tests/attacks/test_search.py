"""The default PGD/FGSM search (any iterate, early retirement, nested balls) against
independent plain per-eps loops: never weaker, every success verified, work saved."""

import importlib
import re
import warnings

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


# --- found by `nox -s mutants -- attacks/_pgd_search.py` (issue 28): each test below fails for
# a one-line change of the search that the tests above let through


def test_random_start_with_custom_bounds_equals_the_loop_from_the_same_start():
    """Inputs in [-1, 1]: the start is clamped to the bounds, every step too, and the search's
    verdicts, steps and examples are the any-iterate loop's from that start."""
    model, x, _ = setup(n=16)
    x = 2 * x - 1
    y = mostly_correct_labels(model, x)
    eps, bounds = 0.1, (-1.0, 1.0)
    g = torch.Generator().manual_seed(5)
    u = torch.rand((16, 64), generator=g, dtype=torch.float64).view_as(x)
    start = (x + (2 * u - 1) * eps).clamp(*bounds)
    r = pgd(model, x, y, eps, steps=STEPS, step_size=0.02, random_start=True, generator=5,
            bounds=bounds, details=True)
    f, k, ex = reference_pgd_any(model, x, y, eps, STEPS, 0.02, bounds, x_start=start)
    clean = wrong(model, x, y)
    assert torch.equal(r.success, f | clean) and (f & ~clean).any() and (~f).any()
    attacked = ~clean
    assert torch.equal(r.step[attacked], k[attacked])
    torch.testing.assert_close(r.adv[attacked], ex[attacked], rtol=0, atol=1e-12)
    assert (r.adv < 0).any() and r.unverified == 0


class GradLiar(torch.nn.Module):
    """Claims every input that requires grad (the attack's step forwards) is of another class;
    honest on every other forward (the clean pass and the final check)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        out = self.inner(x)
        return out.roll(1, dims=1) if x.requires_grad else out


def test_successes_the_final_check_refuses_are_counted_and_reset():
    model, x, y = setup(n=10)
    clean = wrong(model, x, y)
    liar = GradLiar(model)
    with pytest.warns(RuntimeWarning, match=r"pgd: (\d+) adversarial examples failed the final "
                                            r"fp32 check") as record:
        r = pgd(liar, x, y, [0.0, 0.1, 0.2], steps=3, details=True)
    lies = int((~clean).sum())  # every attacked sample "fooled" at step 0 of the first radius
    assert r.unverified == lies > 0 and f"pgd: {lies} adversarial" in str(record[0].message)
    assert torch.equal(r.success, clean[None, :].expand(3, -1))
    assert torch.equal(r.step, torch.where(r.success, 0, -1))
    assert torch.equal(r.found_at, torch.where(r.success, 0, -1))
    # work: one step of every attacked row at the two radii at once; the clean pass and the
    # final check of every claimed success (the clean misclassifications as well)
    assert r.row_steps == 2 * lies
    assert r.row_forwards == 10 + 10


def test_verified_search_work_counts_equal_the_rows_the_model_sees():
    model, x, y = setup(dtype=torch.float32)
    counted = Counting(model)
    r = pgd(counted, x, y, EPS, steps=STEPS, step_size=STEP, precision="bf16", details=True)
    assert r.row_steps == counted.grad_rows > 0
    assert r.row_forwards + 1 == counted.forward_rows  # + the one-row label check
    assert r.unverified == 0


class Rows(torch.nn.Module):
    """Rows of every gradient pass, in order."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.grad_passes = inner, []

    def forward(self, x):
        if x.requires_grad:
            self.grad_passes.append(x.shape[0])
        return self.inner(x)


@pytest.mark.parametrize("n,max_batch,first", [(256, None, 512), (171, None, 342),
                                               (171, 300, 171), (100, None, 300)])
def test_radii_join_while_their_rows_stay_within_the_cpu_group_limit(n, max_batch, first):
    """On the CPU the next radii join one attack while (samples alive) x (radii) <= 512 (and
    <= max_batch): the first gradient pass holds exactly that many rows."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3).double()
    x = torch.rand(n, 4, dtype=torch.float64)
    with torch.no_grad():
        y = model(x).argmax(1)  # every sample starts correctly classified
    rows = Rows(model)
    r = pgd(rows, x, y, [1e-6, 2e-6, 3e-6], steps=1, step_size=1e-6, max_batch=max_batch,
            details=True)
    assert rows.grad_passes[0] == first
    assert not r.success.any() and r.unverified == 0  # nothing found, nothing refused


def test_reduced_precision_lies_are_refused_before_the_final_check():
    """The step's own (autocast) verdicts are re-checked by an fp32 forward before a row
    retires: the liar's claims never reach the final check."""
    model, x, y = setup(dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "failed the final fp32 check" warning
        r = pgd(Liar(model), x, y, EPS, steps=STEPS, step_size=STEP, precision="bf16",
                details=True)
    honest = pgd(model, x, y, EPS, steps=STEPS, step_size=STEP, precision="bf16", details=True)
    assert r.unverified == 0 and honest.unverified == 0
    assert torch.equal(r.success[0], wrong(model, x, y))


@pytest.mark.parametrize("every", [2, 3])
def test_rows_are_compacted_every_compact_every_steps(every):
    model, x, y = setup()
    rows = Rows(model)
    pgd(rows, x, y, [0.03], steps=STEPS, step_size=STEP, compact_every=every)
    sizes = rows.grad_passes
    assert len(sizes) == STEPS
    # the batch shrinks only at a compaction, after every `every` steps
    assert all(sizes[i] == sizes[i - i % every] for i in range(STEPS))
    assert sizes[-1] < sizes[0]


class AllRows(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.sizes = inner, []

    def forward(self, x):
        self.sizes.append(x.shape[0])
        return self.inner(x)


@pytest.mark.parametrize("precision", [None, "bf16"])
def test_every_forward_of_the_search_holds_at_most_max_batch_rows(precision):
    model, x, y = setup(n=40, dtype=torch.float32)
    rec = AllRows(model)
    r = pgd(rec, x, y, EPS, steps=STEPS, step_size=STEP, max_batch=7, precision=precision,
            details=True)
    assert max(rec.sizes) <= 7 and r.success.any()
    assert sum(rec.sizes) == r.row_steps + r.row_forwards + 1  # + the label check


def test_pgd_search_defaults_to_fp32_without_verification_forwards():
    from powerlaw_fast.attacks.pgd import pgd_search

    model, x, y = setup(n=20)
    kw = dict(steps=STEPS, step_size=STEP, random_start=False, restarts=1, bounds=(0.0, 1.0),
              generator=None, backend="torch", rows_per_chunk=4096)
    default = pgd_search(model.eval(), x, y, EPS, **kw)
    fp32 = pgd_search(model, x, y, EPS, precision="fp32", **kw)
    assert (default.row_steps, default.row_forwards) == (fp32.row_steps, fp32.row_forwards)
    assert torch.equal(default.success, fp32.success) and default.adv is not None


def test_search_progress_bar_counts_chunks_times_radii_only_when_asked(capsys):
    model, x, y = setup(n=10)
    pgd(model, x, y, [0.0, 0.01, 0.03], steps=2, max_batch=5, progress=True)
    err = capsys.readouterr().err
    assert re.search(r"(^|\r)pgd: .*\b6/6\b", err)  # 2 chunks x 3 radii
    pgd(model, x, y, [0.0, 0.01, 0.03], steps=2, max_batch=5)
    assert capsys.readouterr().err == ""

