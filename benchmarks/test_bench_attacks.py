"""pytest-benchmark version of bench_attacks: ``pytest benchmarks/ --benchmark-only``.

One group per attack (pgd, fgsm) holding this library's sweeps (default any-iterate search,
final-iterate mode, bf16 gradients on a GPU), the plain per-epsilon loop and torchattacks, so
``pytest-benchmark compare`` follows each across commits. On a CPU: the torch backend, a tiny
slice of the test set and a short grid; on a GPU: the Triton step (and the CUDA graph in the
final-iterate mode) on 1000 test images and the full 11-point grid. The model is the paper's
MLP with seeded random weights: these rows track speed, bench_attacks.py measures trained
models.
"""

from __future__ import annotations

import pytest
import torch

import benchmarks.bench_attacks as bench

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
N = 1000 if ON_GPU else 16
STEPS = 40 if ON_GPU else 2


@pytest.fixture(scope="module")
def setup(monkeypatch_module):
    if not ON_GPU:
        monkeypatch_module.setattr(bench, "EPS_GRID", [0.0, 0.1, 0.3])
    x, y = bench.load_test_set(None, N)
    model = bench.build_model("mlp", seed=0).to(DEVICE).eval()
    return model, x.to(DEVICE), y.to(DEVICE)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def _sync():
    if ON_GPU:
        torch.cuda.synchronize()


CASES = [("pgd", "ours"), ("pgd", "ours_final"), ("pgd", "ours_bf16"), ("pgd", "plain_loop"),
         ("pgd", "torchattacks"), ("fgsm", "ours"), ("fgsm", "ours_final"),
         ("fgsm", "plain_loop"), ("fgsm", "torchattacks")]


@pytest.mark.parametrize("attack,impl", CASES)
def test_attack_sweep(benchmark, setup, attack, impl):
    model, x, y = setup
    sweeps, _ = bench.make_sweeps(model, x, y, attack, STEPS, N, "triton" if ON_GPU else "torch",
                                  None)
    if impl not in sweeps:
        pytest.skip(f"{impl}: needs CUDA" if impl == "ours_bf16" else f"{impl}: not installed")
    benchmark.group = f"{attack} mlp n={N} eps={len(bench.EPS_GRID)} ({DEVICE})"
    fn = sweeps[impl]

    def timed():
        acc, work = fn()
        _sync()
        return acc, work

    acc, work = benchmark.pedantic(timed, rounds=3 if not ON_GPU else 5, warmup_rounds=1)
    assert len(acc) == len(bench.EPS_GRID) and all(0.0 <= a <= 1.0 for a in acc)
    assert work["row_steps"] >= 0 and work["row_forwards"] >= 0
    benchmark.extra_info.update(work)
