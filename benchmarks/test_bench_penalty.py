"""pytest-benchmark version of bench_penalty: ``pytest benchmarks/ --benchmark-only``.

Each width is one group holding this library's implementation and its baselines, so
``pytest-benchmark compare`` follows every implementation across commits. On a CPU it covers
the torch backend at small widths; on a GPU the Triton (and CUDA) backends at the paper's.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.bench_penalty import forward_backward, gemm_floor, implementations, make_inputs
from powerlaw_fast import spec_penalty

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
SIZES = (1024, 4096) if ON_GPU else (128, 384)
IMPLS = ["ours", "torch_projection", "torch_covariance", "eigvalsh", "authors_loop", "gemm_floor"]


def _sync():
    if ON_GPU:
        torch.cuda.synchronize()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("N", SIZES)
def test_penalty_forward_backward(benchmark, impl, N):
    if impl == "authors_loop" and N > (1024 if ON_GPU else 128):
        pytest.skip("the authors' loop is only timed at the smallest width")
    if impl == "eigvalsh" and N > 2048:
        pytest.skip("eigvalsh takes seconds per call above N = 2048")
    benchmark.group = f"spec_penalty fwd+bwd N={N} float32"
    x, V = make_inputs(N, torch.float32, DEVICE)
    if impl == "gemm_floor":
        step = gemm_floor(x, V)
    elif impl == "ours":
        backend = "triton" if ON_GPU else "torch"
        step = forward_backward(lambda a, b: spec_penalty(a, b, tau=10, backend=backend), x, V)
    else:
        impls = implementations(N, include_cuda=False, dtype=torch.float32)
        step = forward_backward(impls[impl], x, V)

    def timed():
        step()
        _sync()

    benchmark.pedantic(timed, rounds=5 if not ON_GPU else 50, warmup_rounds=1)
