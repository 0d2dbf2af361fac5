"""Batched PGD against the plain per-epsilon loop, plus its contracts (modes, grads, RNG).

Tests that compare iterates with the loop use final_iterate=True (the loop's rule); the
default any-iterate search is tested in test_search.py."""

import math
import warnings

import pytest
import torch
from attack_helpers import make_data, make_mlp, reference_pgd

from powerlaw_fast._backend import triton_available
from powerlaw_fast.attacks import pgd

EPS = [0.0, 0.03, 0.1, 0.3]


def wrong(model, x, y):
    with torch.no_grad():
        return model(x).argmax(1) != y


@pytest.mark.parametrize("max_batch", [None, 7, 25])
def test_matches_per_eps_loop_float64(max_batch):
    model, (x, y) = make_mlp(), make_data(n=10)
    adv = pgd(model, x, y, EPS, steps=6, step_size=0.02, max_batch=max_batch, final_iterate=True)
    assert adv.shape == (len(EPS), *x.shape) and adv.dtype == x.dtype
    for e, a in zip(EPS, adv, strict=True):
        ref = reference_pgd(model, x, y, e, 6, 0.02)
        torch.testing.assert_close(a, ref, rtol=0, atol=1e-12)
        assert torch.equal(wrong(model, a, y), wrong(model, ref, y))


def test_matches_per_eps_loop_float32_success_masks():
    model, (x, y) = make_mlp(torch.float32, seed=3), make_data(n=16, dtype=torch.float32)
    adv = pgd(model, x, y, EPS, steps=5, step_size=0.03, final_iterate=True)
    for e, a in zip(EPS, adv, strict=True):
        ref = reference_pgd(model, x, y, e, 5, 0.03)
        # a gradient component near 0 may flip sign with a different batch size: one step off
        assert ((a - ref).abs() <= 2 * 0.03 + 1e-6).all()
        assert torch.equal(wrong(model, a, y), wrong(model, ref, y))


def test_attack_lowers_accuracy_and_eps_zero_is_clean():
    model, (x, y) = make_mlp(), make_data(n=40)
    adv = pgd(model, x, y, [0.0, 0.3], steps=10, step_size=0.05)
    assert torch.equal(adv[0], x)
    clean_wrong = wrong(model, x, y)
    assert torch.equal(wrong(model, adv[0], y), clean_wrong)
    assert wrong(model, adv[1], y).sum() > clean_wrong.sum()


def test_single_eps_returns_shape_of_x():
    model, (x, y) = make_mlp(), make_data(n=5)
    adv = pgd(model, x, y, 0.1, steps=3, final_iterate=True)
    assert adv.shape == x.shape
    torch.testing.assert_close(adv, reference_pgd(model, x, y, 0.1, 3, 0.01), rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_eps_ball_and_bounds_never_left(dtype):
    model, (x, y) = make_mlp(dtype), make_data(n=20, dtype=dtype)
    eps = [0.0, 0.05, 0.2, 0.7]
    adv = pgd(model, x, y, eps, steps=8, step_size=0.1, random_start=True, generator=3)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    for e, a in zip(eps, adv, strict=True):
        assert ((a - x).abs() <= e + tol).all()
        assert (a >= 0).all() and (a <= 1).all()


def test_custom_bounds():
    model, (x, y) = make_mlp(), make_data(n=6)
    x = x * 0.5 - 0.25  # in [-0.25, 0.25]
    adv = pgd(model, x, y, [0.5], steps=5, step_size=0.2, bounds=(-0.25, 0.25))
    assert adv.min() >= -0.25 and adv.max() <= 0.25 and (adv != x).any()


def test_model_modes_restored_and_param_grads_untouched():
    model = make_mlp()
    model.insert(2, torch.nn.Dropout(0.5))
    model.train()
    model[1].eval()  # mixed modes must come back exactly
    modes = [m.training for m in model.modules()]
    model[4].weight.grad = torch.ones_like(model[4].weight)
    x, y = make_data(n=8)
    pgd(model, x, y, [0.1], steps=2)
    assert [m.training for m in model.modules()] == modes
    assert model[1].weight.grad is None and model[1].bias.grad is None
    assert torch.equal(model[4].weight.grad, torch.ones_like(model[4].weight))
    assert all(p.requires_grad for p in model.parameters())
    assert not x.requires_grad


def test_dropout_is_off_during_the_attack():
    """Eval mode: with dropout active the result would depend on the global RNG."""
    model = make_mlp()
    model.insert(2, torch.nn.Dropout(0.5))
    model.train()
    x, y = make_data(n=8)
    a = pgd(model, x, y, 0.1, steps=3, final_iterate=True)
    model.eval()
    torch.testing.assert_close(a, reference_pgd(model, x, y, 0.1, 3, 0.01), rtol=0, atol=1e-12)


class Exploding(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(64, 10).double()

    def forward(self, x):
        raise RuntimeError("boom")


def test_modes_restored_on_exception():
    model = Exploding().train()
    x, y = make_data(n=3)
    with pytest.raises(RuntimeError, match="boom"):
        pgd(model, x, y, 0.1, steps=2)
    assert model.training and model.lin.training


def test_random_start_seeded_and_global_rng_untouched():
    model, (x, y) = make_mlp(), make_data(n=10)
    state = torch.get_rng_state()
    a = pgd(model, x, y, [0.1, 0.2], steps=3, random_start=True, generator=7)
    b = pgd(model, x, y, [0.1, 0.2], steps=3, random_start=True,
            generator=torch.Generator().manual_seed(7))
    c = pgd(model, x, y, [0.1, 0.2], steps=3, random_start=True, generator=8)
    d = pgd(model, x, y, [0.1, 0.2], steps=3, random_start=True)  # default seed: reproducible
    e = pgd(model, x, y, [0.1, 0.2], steps=3, random_start=True)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b) and not torch.equal(a, c) and torch.equal(d, e)


def test_random_start_matches_reference_from_same_start():
    model, (x, y) = make_mlp(), make_data(n=6)
    eps = 0.2
    g = torch.Generator().manual_seed(5)
    u = torch.rand((6, 64), generator=g, dtype=torch.float64).view_as(x)
    start = (x + (2 * u - 1) * eps).clamp(0, 1)
    adv = pgd(model, x, y, eps, steps=4, step_size=0.05, random_start=True, generator=5,
              final_iterate=True)
    ref = reference_pgd(model, x, y, eps, 4, 0.05, x_start=start)
    torch.testing.assert_close(adv, ref, rtol=0, atol=1e-12)


def test_restarts_keep_the_first_fooling_restart():
    model, (x, _) = make_mlp(seed=4), make_data(n=30)
    with torch.no_grad():
        y = model(x).argmax(1)  # every sample starts correctly classified
    kw = dict(steps=1, step_size=0.01, random_start=True, generator=11)
    one = pgd(model, x, y, [0.05], restarts=1, **kw)[0]
    three = pgd(model, x, y, [0.05], restarts=3, **kw)[0]
    fooled_one, fooled_three = wrong(model, one, y), wrong(model, three, y)
    assert (fooled_three | ~fooled_one).all()  # restart 0 is the same run
    assert torch.equal(three[fooled_one], one[fooled_one])
    assert fooled_three.sum() > fooled_one.sum()  # weak attack: later restarts add successes
    assert ((three - x).abs() <= 0.05 + 1e-12).all()


@pytest.mark.skipif(not triton_available(), reason="triton not installed")
def test_triton_backend_equals_torch_backend(device):
    # CUDA when present: Triton runs CPU tensors only under the interpreter (off on a GPU)
    model, (x, y) = make_mlp(torch.float32).to(device), make_data(n=6, dtype=torch.float32)
    x, y = x.to(device), y.to(device)
    a = pgd(model, x, y, [0.0, 0.1], steps=3, backend="triton")
    b = pgd(model, x, y, [0.0, 0.1], steps=3, backend="torch")
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "kw,exc,match",
    [
        (dict(eps=-0.1), ValueError, "eps"),
        (dict(eps=[0.1, -0.1]), ValueError, r"eps\[1\]"),
        (dict(eps=[]), ValueError, "eps"),
        (dict(eps=math.nan), ValueError, "eps"),
        (dict(eps="0.1"), TypeError, "eps"),
        (dict(y=torch.zeros(5, dtype=torch.long)), ValueError, "y"),
        (dict(y=torch.zeros(4)), TypeError, "y"),
        (dict(x=torch.full((4, 1, 8, 8), 1.5, dtype=torch.float64)), ValueError, "x"),
        (dict(x=torch.full((4, 1, 8, 8), math.nan, dtype=torch.float64)), ValueError, "x"),
        (dict(steps=0), ValueError, "steps"),
        (dict(steps=2.5), TypeError, "steps"),
        (dict(step_size=0.0), ValueError, "step_size"),
        (dict(restarts=0), ValueError, "restarts"),
        (dict(restarts=2), ValueError, "random_start"),
        (dict(bounds=(1.0, 0.0)), ValueError, "bounds"),
        (dict(max_batch=0), ValueError, "max_batch"),
        (dict(generator="seed", random_start=True), TypeError, "generator"),
        (dict(backend="jax"), ValueError, "backend"),
        (dict(model=lambda t: t), TypeError, "model"),
    ],
)
def test_bad_input(kw, exc, match):
    x, y = make_data(n=4)
    args = dict(model=make_mlp(), x=x, y=y, eps=0.1)
    args.update(kw)
    with pytest.raises(exc, match=match):
        pgd(args.pop("model"), args.pop("x"), args.pop("y"), args.pop("eps"), **args)


def test_against_torchattacks():
    torchattacks = pytest.importorskip(
        "torchattacks", reason="the cross-check needs `pip install --no-deps torchattacks`"
    )
    model, (x, y) = make_mlp(torch.float32), make_data(n=20, dtype=torch.float32)
    atk = torchattacks.PGD(model, eps=0.1, alpha=0.01, steps=10, random_start=False)
    theirs = atk(x, y)
    ours = pgd(model, x, y, 0.1, steps=10, step_size=0.01, final_iterate=True)
    assert ((ours - theirs).abs() <= 2 * 0.01 + 1e-6).all()
    agree = (wrong(model, ours, y) == wrong(model, theirs, y)).float().mean()
    assert agree >= 0.9


# ----------------------------------------------------------------------------- GPU only
def _cuda_model_and_data(n=64):
    model = make_mlp(torch.float32).cuda()
    x, y = make_data(n=n, dtype=torch.float32)
    return model, x.cuda(), y.cuda()


@pytest.mark.gpu
def test_gpu_cuda_graph_equals_eager():
    model, x, y = _cuda_model_and_data()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the capture must succeed for this model
        graphed = pgd(model, x, y, EPS, steps=10, cuda_graph=True, max_batch=100,
                      final_iterate=True)
    eager = pgd(model, x, y, EPS, steps=10, cuda_graph=False, max_batch=100, final_iterate=True)
    # same kernels on the same shapes: expected bit-equal; cuBLAS may pick another algorithm
    # under capture, so allow a flipped sign of a near-zero gradient (two steps of 0.01)
    assert ((graphed - eager).abs() <= 0.02 + 1e-6).all()
    for g_, e_ in zip(graphed, eager, strict=True):
        assert torch.equal(wrong(model, g_, y), wrong(model, e_, y))


class HostSyncing(torch.nn.Module):
    """Not capturable: reads a value back to the host every forward."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        if float(x.sum()) < -1.0:
            return -self.inner(x)
        return self.inner(x)


@pytest.mark.gpu
def test_gpu_capture_failure_falls_back_with_warning():
    model, x, y = _cuda_model_and_data()
    wrapped = HostSyncing(model)
    with pytest.warns(RuntimeWarning, match="CUDA graph capture failed"):
        out = pgd(wrapped, x, y, EPS, steps=6, cuda_graph=True, final_iterate=True)
    assert torch.equal(out, pgd(model, x, y, EPS, steps=6, cuda_graph=False, final_iterate=True))


@pytest.mark.gpu
def test_gpu_step_loop_never_syncs_with_host():
    from powerlaw_fast.attacks._pgd_final import _ChunkRunner, _Config

    model, x, y = _cuda_model_and_data(n=32)
    for graph in (False, True):
        cfg = _Config(steps=8, step_size=0.01, bounds=(0.0, 1.0), backend="triton",
                      cuda_graph=graph)
        run = _ChunkRunner(model.eval(), (1, 8, 8), 64, 32, torch.float32, x.device, cfg)
        run.load(x.reshape(32, -1), y, torch.full((64,), 0.1, device="cuda"))
        run.x.copy_(run.x_nat.repeat(2, 1))
        run.run(4)  # warm-up and capture happen here
        torch.cuda.set_sync_debug_mode("error")
        try:
            run.run(8)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
def test_gpu_matches_per_eps_loop():
    model, x, y = _cuda_model_and_data()
    adv = pgd(model, x, y, EPS, steps=10, step_size=0.02, final_iterate=True)
    for e, a in zip(EPS, adv, strict=True):
        ref = reference_pgd(model, x, y, e, 10, 0.02)
        assert torch.equal(wrong(model, a, y), wrong(model, ref, y))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_stays_in_ball_up_to_rounding(dtype):
    model, (x, y) = make_mlp(dtype), make_data(n=6, dtype=dtype)
    adv = pgd(model, x, y, [0.0, 0.1], steps=3, step_size=0.05)
    assert adv.dtype == dtype and torch.equal(adv[0], x)
    ulp = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11  # relative rounding, values <= 1
    assert ((adv[1].float() - x.float()).abs() <= 0.1 + ulp).all()
    assert adv.min() >= 0 and adv.max() <= 1


def test_cuda_graph_flag_is_ignored_on_cpu_and_progress_bar_runs():
    model, (x, y) = make_mlp(), make_data(n=6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a = pgd(model, x, y, EPS, steps=2, cuda_graph=True, max_batch=6, progress=True)
    assert torch.equal(a, pgd(model, x, y, EPS, steps=2, cuda_graph=False))


@pytest.mark.gpu
def test_gpu_memory_budget_splits_into_chunks_with_same_result():
    from powerlaw_fast.attacks._common import rows_per_pass

    model, x, y = _cuda_model_and_data(n=256)
    rows = rows_per_pass(model.eval(), x, y, memory_budget=2**20)
    assert 1 <= rows < len(EPS) * 256
    small = pgd(model, x, y, EPS, steps=5, memory_budget=2**20, cuda_graph=False,
                final_iterate=True)
    whole = pgd(model, x, y, EPS, steps=5, max_batch=len(EPS) * 256, cuda_graph=False,
                final_iterate=True)
    assert ((small - whole).abs() <= 2 * 0.01 + 1e-6).all()


# --- found by `nox -s mutants -- attacks/_pgd_final.py` (issue 28): each test below fails for a
# one-line change of the final-iterate runner that the tests above let through


class Recording(torch.nn.Module):
    """Records every forward: (rows, whether the input requires grad, autocast on)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, []

    def forward(self, x):
        self.calls.append((x.shape[0], x.requires_grad, torch.is_autocast_enabled(x.device.type)))
        return self.inner(x)

    def rows(self, grad):
        return sum(r for r, g, _ in self.calls if g == grad)


def labelled(n=10, seed=0, wrong_every=4, dtype=torch.float64):
    """An MLP and data it gets right except every ``wrong_every``-th sample."""
    model, (x, _) = make_mlp(dtype, seed=seed), make_data(n=n, dtype=dtype, seed=seed + 1)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[::wrong_every] = (y[::wrong_every] + 1) % 10
    return model, x, y


def test_final_iterate_work_counts_equal_the_rows_the_model_sees():
    model, x, y = labelled(n=10)
    rec = Recording(model)
    r = pgd(rec, x, y, [0.0, 0.05, 0.2], steps=3, step_size=0.02, random_start=True,
            restarts=2, generator=1, final_iterate=True, details=True)
    # eps = 0 is one clean forward of n rows; each of the 2 radii x 2 restarts runs 3 steps of
    # n rows and one verdict forward of n rows
    assert r.row_steps == 2 * 2 * 10 * 3 == rec.rows(grad=True)
    assert r.row_forwards == 10 + 2 * 2 * 10 == rec.rows(grad=False) - 1  # - the label check
    assert r.unverified == 0


def test_final_iterate_without_verdicts_runs_no_verdict_forward():
    model, x, y = labelled(n=10)
    rec = Recording(model)
    # details=False: no verdicts needed, not even the clean one at eps = 0
    pgd(rec, x, y, [0.0, 0.1, 0.2], steps=3, final_iterate=True)
    assert rec.rows(grad=False) == 1  # the one-row label check, nothing else
    assert rec.rows(grad=True) == 2 * 10 * 3


def test_final_iterate_step_and_found_at_follow_the_verdicts():
    model, x, y = labelled(n=12)
    eps = [0.0, 0.02, 0.3]
    r = pgd(model, x, y, eps, steps=4, step_size=0.01, final_iterate=True, details=True)
    clean_wrong = wrong(model, x, y)
    assert torch.equal(r.success[0], clean_wrong)
    assert 0 < int(r.success[1].sum()) < 12  # both verdicts occur at a radius > 0
    assert torch.equal(r.step[0], torch.where(clean_wrong, 0, -1))
    assert torch.equal(r.step[1:], torch.where(r.success[1:], 4, -1))
    rows = torch.arange(len(eps))[:, None].expand(-1, 12)
    assert torch.equal(r.found_at, torch.where(r.success, rows, -1))


def test_final_iterate_forward_passes_hold_at_most_max_batch_rows():
    model, x, y = labelled(n=10)
    rec = Recording(model)
    r = pgd(rec, x, y, [0.0, 0.05, 0.1], steps=2, random_start=True, restarts=2, generator=0,
            max_batch=4, final_iterate=True, details=True)
    assert max(rows for rows, _, _ in rec.calls) <= 4
    whole = pgd(model, x, y, [0.0, 0.05, 0.1], steps=2, random_start=True, restarts=2,
                generator=0, final_iterate=True, details=True)
    # the chunks draw their starts in another order: only the eps = 0 verdicts must agree
    assert torch.equal(r.success[0], whole.success[0])


def test_final_iterate_restarts_match_the_loop_from_each_start_with_custom_bounds():
    """Restart r starts from the generator's r-th draw; a sample keeps its first fooling
    restart, else the last one, and is fooled when any restart fools it. Inputs in [-1, 1]."""
    model, (x, _) = make_mlp(seed=4), make_data(n=30)
    x = 2 * x - 1
    with torch.no_grad():
        y = model(x).argmax(1)
    eps, steps, step, bounds = 0.05, 1, 0.01, (-1.0, 1.0)
    g = torch.Generator().manual_seed(11)
    finals, fooled = [], []
    for _ in range(3):
        u = torch.rand((30, 64), generator=g, dtype=torch.float64).view_as(x)
        start = (x + (2 * u - 1) * eps).clamp(*bounds)
        finals.append(reference_pgd(model, x, y, eps, steps, step, bounds, x_start=start))
        fooled.append(wrong(model, finals[-1], y))
    first = torch.stack(fooled).int().argmax(0)  # 0 where none fooled
    any_fooled = torch.stack(fooled).any(0)
    pick = torch.where(any_fooled, first, 2)
    expect = torch.stack(finals)[pick, torch.arange(30)]
    # the data must tell the rules apart: a sample fooled only by a later restart, one fooled
    # by restart 0 but not by the last
    assert (any_fooled & ~fooled[0]).any() and (fooled[0] & ~fooled[2]).any()
    kw = dict(steps=steps, step_size=step, random_start=True, restarts=3, generator=11,
              bounds=bounds, final_iterate=True)
    r = pgd(model, x, y, eps, details=True, **kw)
    torch.testing.assert_close(r.adv, expect, rtol=0, atol=1e-12)
    assert torch.equal(r.success, any_fooled)
    torch.testing.assert_close(pgd(model, x, y, eps, **kw), expect, rtol=0, atol=1e-12)


def test_final_iterate_custom_bounds_match_the_loop():
    model, (x, y) = make_mlp(), make_data(n=8)
    x = 2 * x - 1  # in [-1, 1]: a step may leave [0, 1] and must be kept
    adv = pgd(model, x, y, [0.1, 0.5], steps=5, step_size=0.1, bounds=(-1.0, 1.0),
              final_iterate=True)
    for e, a in zip([0.1, 0.5], adv, strict=True):
        ref = reference_pgd(model, x, y, e, 5, 0.1, bounds=(-1.0, 1.0))
        torch.testing.assert_close(a, ref, rtol=0, atol=1e-12)
    assert (adv < 0).any()


def test_final_iterate_conv_model_gets_its_sample_shape():
    torch.manual_seed(0)
    conv = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(3 * 6 * 6, 10)).double()
    x, y = make_data(n=6)
    adv = pgd(conv, x, y, [0.1], steps=3, step_size=0.03, final_iterate=True)
    ref = reference_pgd(conv, x, y, 0.1, 3, 0.03)
    torch.testing.assert_close(adv[0], ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("final_iterate", [True, False])
def test_bf16_precision_runs_gradient_passes_under_autocast_only(final_iterate):
    model, x, y = labelled(n=8, dtype=torch.float32)
    rec = Recording(model)
    pgd(rec, x, y, [0.0, 0.1], steps=2, precision="bf16", final_iterate=final_iterate,
        details=True)
    grads = [autocast for _, g, autocast in rec.calls if g]
    assert grads and all(grads)
    # the verdicts are fp32 forwards (the search's own last forward of a row is not a verdict)
    verdicts = [autocast for _, g, autocast in rec.calls if not g]
    assert not any(verdicts) if final_iterate else not all(verdicts)


@pytest.mark.skipif(not triton_available(), reason="triton not installed")
@pytest.mark.parametrize("final_iterate", [True, False])
def test_the_chosen_backend_runs_every_step(monkeypatch, final_iterate):
    from powerlaw_fast.ops import backends

    calls = []
    triton_row = backends._TABLE[("pgd_update", "triton")]

    def spy(*args):
        calls.append(args[0].shape[0])
        return triton_row(*args)

    monkeypatch.setitem(backends._TABLE, ("pgd_update", "triton"), spy)
    model, x, _ = labelled(n=6, dtype=torch.float32)
    with torch.no_grad():
        y = model(x).argmax(1)  # all clean-correct, and a weak attack: every step runs
    pgd(model, x, y, [0.05], steps=3, step_size=0.001, backend="triton",
        final_iterate=final_iterate)
    assert len(calls) == 3


def test_final_iterate_progress_bar_only_when_asked_and_chunked(capsys):
    import re

    model, (x, y) = make_mlp(), make_data(n=6)
    two_chunks = dict(steps=1, final_iterate=True, max_batch=6)  # one chunk per eps
    pgd(model, x, y, [0.1, 0.2], progress=True, **two_chunks)
    assert re.search(r"(^|\r)pgd: ", capsys.readouterr().err)
    pgd(model, x, y, [0.1, 0.2], progress=False, **two_chunks)
    pgd(model, x, y, [0.1, 0.2], progress=True, steps=1, final_iterate=True)  # one chunk
    assert "pgd" not in capsys.readouterr().err


def test_pgd_sweep_defaults_to_no_bar_and_keeps_runners_in_the_callers_dict(capsys):
    from powerlaw_fast.attacks.pgd import pgd_sweep

    model, (x, y) = make_mlp(), make_data(n=6)
    runners = {}
    kw = dict(steps=2, step_size=0.01, random_start=False, restarts=1, bounds=(0.0, 1.0),
              generator=None, backend="torch", cuda_graph=False, rows_per_chunk=6,
              need_success=True, runners=runners)
    adv, success = pgd_sweep(model.eval(), x, y, [0.1, 0.2], **kw)
    assert "pgd" not in capsys.readouterr().err
    assert len(runners) == 1  # both chunks have one shape: one runner, kept for the caller
    (runner,) = runners.values()
    again, success_again = pgd_sweep(model, x, y, [0.1, 0.2], **kw)
    assert list(runners.values()) == [runner]
    assert torch.equal(adv, again) and torch.equal(success, success_again)
    for e, a in zip([0.1, 0.2], adv, strict=True):
        torch.testing.assert_close(a, reference_pgd(model, x, y, e, 2, 0.01), rtol=0, atol=1e-12)


def test_final_iterate_skips_examples_when_none_are_needed():
    from powerlaw_fast.attacks.pgd import run_pgd

    model, x, y = labelled(n=6)
    result, single = run_pgd(
        model, x, y, [0.0, 0.1], steps=2, step_size=0.01, random_start=False, restarts=1,
        bounds=(0.0, 1.0), generator=None, backend="auto", cuda_graph=False, max_batch=None,
        memory_budget=None, need_adv=False, progress=False, final_iterate=True)
    assert result.adv is None and not single
    assert torch.equal(result.success[0], wrong(model, x, y))


# --- found by `nox -s mutants -- attacks/pgd.py` (issue 28)


def test_single_eps_details_are_squeezed_and_match_the_grid_entry():
    model, x, y = labelled(n=8)
    one = pgd(model, x, y, 0.05, steps=3, details=True)
    grid = pgd(model, x, y, [0.05], steps=3, details=True)
    for key in ("adv", "success", "step", "found_at"):
        assert torch.equal(getattr(one, key), getattr(grid, key)[0]), key
    assert one.found_at.shape == (8,) and (one.row_steps, one.row_forwards) == (
        grid.row_steps, grid.row_forwards)


@pytest.mark.parametrize(
    "kw,exc,match",
    [
        (dict(restarts=3), ValueError, r"restarts: expected 1 without random_start \(restarts "
                                       r"from x itself are identical\), got 3; pass "
                                       r"random_start=True"),
        (dict(final_iterate=None), TypeError, "final_iterate: expected a bool, got NoneType"),
        (dict(compact_every=2.0), TypeError, "compact_every"),
        (dict(compact_every=2**31), ValueError, "compact_every"),
        (dict(memory_budget=0), ValueError, r"memory_budget: expected an integer in 1\.\.\d+ "
                                            r"\(bytes\), got 0"),
        (dict(memory_budget=1.5), TypeError, "memory_budget"),
        (dict(steps=2**31), ValueError, "steps"),
        (dict(restarts=2**31, random_start=True), ValueError, "restarts"),
        (dict(step_size=-0.1), ValueError, "step_size"),
        (dict(step_size=math.inf), ValueError, "step_size"),
    ],
)
def test_bad_arguments_named(kw, exc, match):
    model, (x, y) = make_mlp(), make_data(n=4)
    with pytest.raises(exc, match=match):
        pgd(model, x, y, 0.1, **kw)


def test_memory_budget_and_compact_every_accepted_on_the_cpu():
    model, x, y = labelled(n=8)
    a = pgd(model, x, y, [0.0, 0.1], steps=4, memory_budget=1, compact_every=2**31 - 1,
            details=True)
    b = pgd(model, x, y, [0.0, 0.1], steps=4, compact_every=1, details=True)
    for key in ("adv", "success", "step", "found_at"):
        assert torch.equal(getattr(a, key), getattr(b, key)), key
    assert a.row_steps >= b.row_steps  # rows retire at the next compaction only


def test_labels_checked_skips_the_label_forward():
    from powerlaw_fast.attacks.pgd import run_pgd

    model, x, y = labelled(n=6)
    counts = []
    for checked in (False, True):
        rec = Recording(model)
        run_pgd(rec, x, y, [0.1], steps=1, step_size=0.01, random_start=False, restarts=1,
                bounds=(0.0, 1.0), generator=None, backend="torch", cuda_graph=False,
                max_batch=None, memory_budget=None, need_adv=True, progress=False,
                final_iterate=True, need_success=False, labels_checked=checked)
        counts.append([c[0] for c in rec.calls if not c[1]])
    assert counts == [[1], []]


def test_random_start_off_ignores_the_generator_and_on_uses_it():
    model, x, y = labelled(n=6)
    a = pgd(model, x, y, [0.1], steps=2, generator=1, final_iterate=True)
    b = pgd(model, x, y, [0.1], steps=2, generator=2, final_iterate=True)
    assert torch.equal(a, b)
    torch.testing.assert_close(a[0], reference_pgd(model, x, y, 0.1, 2, 0.01), rtol=0,
                               atol=1e-12)


def test_the_default_is_the_papers_40_steps():
    model, x, y = labelled(n=4)
    r = pgd(model, x, y, [0.1], final_iterate=True, details=True)
    assert r.row_steps == 40 * 4  # 40 steps of the 4 rows at the one nonzero radius
    assert bool((r.step[r.success] == 40).all())


def test_the_largest_step_and_restart_counts_are_accepted():
    # every sample is misclassified at x itself: fooled at eps = 0, so no radius is attacked
    # and even 2**31 - 1 steps (or restarts) cost nothing
    model, x, y = labelled(n=5, wrong_every=1)
    for kw in (dict(steps=2**31 - 1), dict(restarts=2**31 - 1, random_start=True)):
        r = pgd(model, x, y, [0.0, 0.1], details=True, **kw)
        assert bool(r.success.all()) and r.row_steps == 0 and bool((r.step == 0).all())
        assert torch.equal(r.adv[1], x)


@pytest.mark.parametrize(
    "kw,exc,match",
    [
        (dict(step_size=0.0), ValueError,
         r"^step_size: expected a finite number > 0\.0, got 0\.0$"),
        (dict(memory_budget=2**62 + 1), ValueError,
         r"^memory_budget: expected an integer in 1\.\.4611686018427387904 \(bytes\), got "
         r"4611686018427387905$"),
        (dict(model=lambda t: t), TypeError,
         r"^model: expected a torch\.nn\.Module, got function$"),
    ],
)
def test_argument_errors_name_the_argument_and_what_was_given(kw, exc, match):
    args = dict(model=make_mlp())
    args.update(kw)
    x, y = make_data(n=4)
    with pytest.raises(exc, match=match):
        pgd(args.pop("model"), x, y, 0.1, **args)


def test_the_largest_memory_budget_is_accepted():
    model, x, y = labelled(n=4)
    a = pgd(model, x, y, [0.1], steps=2, memory_budget=2**62)
    torch.testing.assert_close(a, pgd(model, x, y, [0.1], steps=2), rtol=0, atol=0)


def _run_pgd(model, x, y, eps, **kw):
    from powerlaw_fast.attacks.pgd import run_pgd

    args = dict(steps=2, step_size=0.01, random_start=False, restarts=1, bounds=(0.0, 1.0),
                generator=None, backend="torch", cuda_graph=False, max_batch=None,
                memory_budget=None, need_adv=True, progress=False)
    args.update(kw)
    return run_pgd(model, x, y, eps, **args)


def test_the_search_skips_examples_when_none_are_needed():
    model, x, y = labelled(n=6)
    result, _ = _run_pgd(model, x, y, [0.0, 0.1], need_adv=False)
    assert result.adv is None
    full, _ = _run_pgd(model, x, y, [0.0, 0.1])
    assert full.adv.shape == (2, *x.shape) and torch.equal(result.success, full.success)


def test_final_iterate_runners_are_kept_in_the_callers_dict():
    # robustness_curve passes one dict for every batch: buffers (and on CUDA the captured
    # graphs) are made once and reused
    model, x, y = labelled(n=6)
    runners = {}
    first, _ = _run_pgd(model, x, y, [0.1, 0.2], final_iterate=True, runners=runners)
    assert len(runners) == 1
    (runner,) = runners.values()
    again, _ = _run_pgd(model, x, y, [0.1, 0.2], final_iterate=True, runners=runners)
    assert list(runners.values()) == [runner] and torch.equal(first.adv, again.adv)
