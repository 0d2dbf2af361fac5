"""spec_penalty, projected_spectrum and batch_covariance over gloo process groups (2 and 3
processes, uneven shards) equal the single-process result on the concatenated batch."""

from __future__ import annotations

import pytest
import torch

from powerlaw_fast import batch_covariance, projected_spectrum, spec_penalty
from tests.distributed_utils import run_on_processes, shard_bounds


def _batch(B=61, N=23):
    g = torch.Generator().manual_seed(1)
    x = 3.0 + torch.randn(B, N, generator=g) * torch.linspace(2.0, 0.1, N)
    V = torch.linalg.qr(torch.randn(N, N, generator=g))[0]
    return x, V


def _ops_body(rank, world, backend):
    import torch.distributed as dist

    x, V = _batch()
    lo, hi = shard_bounds(x.shape[0], world, rank)
    group = dist.group.WORLD

    full = x.clone().requires_grad_()
    ref = spec_penalty(full, V, tau=4, beta=2.0, backend=backend)
    ref.backward()
    mine = x[lo:hi].clone().requires_grad_()
    got = spec_penalty(mine, V, tau=4, beta=2.0, backend=backend, process_group=group)
    got.backward()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(mine.grad, full.grad[lo:hi], rtol=1e-4, atol=1e-7)

    lam = projected_spectrum(x[lo:hi], V, backend=backend, process_group=group)
    torch.testing.assert_close(lam, projected_spectrum(x, V, backend=backend), rtol=1e-5, atol=0)

    full = x.clone().requires_grad_()
    w = torch.randn(23, 23, generator=torch.Generator().manual_seed(2))
    (batch_covariance(full, backend=backend) * w).sum().backward()
    mine = x[lo:hi].clone().requires_grad_()
    sigma = batch_covariance(mine, backend=backend, process_group=group)
    (sigma * w).sum().backward()
    torch.testing.assert_close(sigma, batch_covariance(x, backend=backend), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mine.grad, full.grad[lo:hi], rtol=1e-4, atol=1e-6)

    # every rank holds the same value
    values = [torch.zeros(()) for _ in range(world)]
    dist.all_gather(values, got.detach())
    assert all(torch.equal(v, values[0]) for v in values)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_global_statistics_over_processes(tmp_path, world, backend):
    if backend == "triton" and torch.cuda.is_available():
        # the processes hold CPU tensors (gloo), which Triton runs only under its interpreter,
        # and the interpreter is off where a GPU is present; the GPU runs the triton kernels
        # in the single-process op tests
        pytest.skip("triton on CPU tensors needs the interpreter, off on a CUDA machine")
    run_on_processes(_ops_body, world, tmp_path, backend)


def _one_row_body(rank, world):
    import torch.distributed as dist

    x, V = _batch(B=7)
    lo, hi = (0, 1) if rank == 0 else (1, 7)  # a rank with a single row is fine
    got = spec_penalty(x[lo:hi], V, tau=3, backend="torch", process_group=dist.group.WORLD)
    torch.testing.assert_close(got, spec_penalty(x, V, tau=3, backend="torch"))
    sigma = batch_covariance(x[lo:hi], backend="torch", process_group=dist.group.WORLD)
    torch.testing.assert_close(sigma, batch_covariance(x, backend="torch"), rtol=1e-5,
                               atol=1e-6)  # fmt: skip


def test_a_rank_may_hold_one_row(tmp_path):
    run_on_processes(_one_row_body, 2, tmp_path)


def test_process_group_requires_initialised_distributed():
    x, V = _batch()
    if torch.distributed.is_initialized():
        pytest.skip("a process group is already initialised")

    class FakeGroup:
        group_name = "nope"

    with pytest.raises(ValueError, match="process_group: torch.distributed is not initialised"):
        spec_penalty(x, V, process_group=FakeGroup())


def _deferred_error_body(rank, world):
    # A GPU defers the status check; each rank's copy completes at its own time (simulated
    # here by a different delay per rank). A rank that raised at a different call than the
    # others would skip an all-reduce and leave them waiting forever: every rank must raise
    # at the same call.
    import torch.distributed as dist

    from powerlaw_fast.ops import status
    from powerlaw_fast.ops.status import DeferredValidationError

    group = dist.group.WORLD
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(40, 12, generator=g)
    V = torch.eye(12)
    bad = x.clone()
    bad[0, 0] = float("nan")
    raised_at = None
    with status.simulate_deferral(delay=3 * rank):
        spec_penalty(bad if rank == 0 else x, V, tau=3, process_group=group)  # call 0
        for call in range(1, 4):
            try:
                spec_penalty(x, V, tau=3, process_group=group)
            except DeferredValidationError as err:
                assert "call #" in str(err) and "non-finite" in str(err)
                raised_at = call
                break
    status.discard_pending()
    calls = torch.tensor([float(raised_at or -1)])
    gathered = [torch.zeros(1) for _ in range(world)]
    dist.all_gather(gathered, calls)
    assert [float(c) for c in gathered] == [1.0] * world, gathered


@pytest.mark.slow
def test_deferred_errors_raise_at_the_same_call_on_every_rank(tmp_path):
    run_on_processes(_deferred_error_body, 2, tmp_path, timeout=60)
