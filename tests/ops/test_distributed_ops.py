"""spec_penalty, projected_spectrum and batch_covariance over gloo process groups (2 and 3
processes, uneven shards): the global batch's results, against the float64 oracle on the
concatenated batch within the bounds of their rounding."""

from __future__ import annotations

import pytest
import torch

from powerlaw_fast import batch_covariance, projected_spectrum, spec_penalty
from powerlaw_fast.ops.spectral_penalty import penalty_and_spectrum
from tests import bounds
from tests.distributed_utils import run_on_processes, shard_bounds
from tests.ops.oracle_checks import expected_penalty, roundoffs


def _batch(B=61, N=23):
    g = torch.Generator().manual_seed(1)
    x = 3.0 + torch.randn(B, N, generator=g) * torch.linspace(2.0, 0.1, N)
    V = torch.linalg.qr(torch.randn(N, N, generator=g))[0]
    return x, V


def _ops_body(rank, world, backend):
    import torch.distributed as dist

    from powerlaw_fast.ops import spectral_penalty as sp_module

    x, V = _batch()
    lo, hi = shard_bounds(x.shape[0], world, rank)
    group = dist.group.WORLD
    # the rounding floor of S2 - S1^2 / B is set by the global row count, known on the host
    # without a synchronisation as the local rows times the world size
    counts, mean_tolerance = [], sp_module.mean_tolerance
    sp_module.mean_tolerance = lambda count, dtype: counts.append(count) or mean_tolerance(
        count, dtype)  # fmt: skip

    # the global batch's penalty and gradient rows, against the oracle on the whole batch
    R, dR, G, dG = expected_penalty(x, V, backend=backend, tau=4, beta=2.0)
    mine = x[lo:hi].clone().requires_grad_()
    got = spec_penalty(mine, V, tau=4, beta=2.0, backend=backend, process_group=group)
    got.backward()
    bounds.assert_within(got.detach(), R, dR, f"rank {rank}'s penalty")
    bounds.assert_within(mine.grad, G[lo:hi], dG[lo:hi], f"rank {rank}'s gradient rows")
    assert counts == [(hi - lo) * world]
    sp_module.mean_tolerance = mean_tolerance

    lam = projected_spectrum(x[lo:hi], V, backend=backend, process_group=group)
    spec = bounds.spectrum_bound(x, V, **roundoffs(x.dtype, backend))
    bounds.assert_within(lam, spec.lam, spec.dlam + bounds.U[torch.float32] * spec.lam,
                         f"rank {rank}'s spectrum")  # fmt: skip
    both = penalty_and_spectrum(x[lo:hi], V, tau=4, beta=2.0, backend=backend,
                                process_group=group)  # fmt: skip
    assert torch.equal(both[0], got.detach()) and torch.equal(both[1], lam)

    w = torch.randn(23, 23, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    mine = x[lo:hi].clone().requires_grad_()
    sigma = batch_covariance(mine, backend=backend, process_group=group)
    (sigma.double() * w).sum().backward()
    u32 = bounds.U[torch.float32]
    want, bound = bounds.covariance_bound(x, u_op=u32, u_acc=u32)
    bounds.assert_within(sigma, want, bound, f"rank {rank}'s covariance")
    G, dG = bounds.covariance_gradient_bound(x, w, u_acc=u32, u_out=u32)
    bounds.assert_within(mine.grad, G[lo:hi], dG[lo:hi], f"rank {rank}'s covariance gradient")

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


def test_a_process_group_before_init_is_refused_naming_it():
    x, V = _batch()
    message = r"^process_group: torch.distributed is not initialised \(init_process_group\)$"
    for op in (lambda: spec_penalty(x, V, tau=4, process_group=object()),
               lambda: projected_spectrum(x, V, process_group=object()),
               lambda: batch_covariance(x, process_group=object())):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            op()


def test_a_group_of_one_process_is_no_group(tmp_path):
    """A one-process group needs no communication: the single-process op, bit for bit, with
    its rules (a batch of one row has no covariance)."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0,
                            world_size=1)  # fmt: skip
    try:
        x, V = _batch()
        group = dist.group.WORLD
        assert torch.equal(spec_penalty(x, V, tau=4, backend="torch", process_group=group),
                           spec_penalty(x, V, tau=4, backend="torch"))  # fmt: skip
        with pytest.raises(ValueError, match=r"^x: expected a batch of at least 2 rows"):
            spec_penalty(x[:1], V, tau=1, backend="torch", process_group=group)
    finally:
        dist.destroy_process_group()


def _subgroup_body(rank, world):
    import torch.distributed as dist

    pair = dist.new_group([0, 1])  # every rank takes part in making each group
    alone = dist.new_group([0])
    if rank == 2:
        return  # not in the pair: any collective of the pair's ops on the world would hang
    x, V = _batch()
    lo, hi = (0, 30) if rank == 0 else (30, 61)
    R, dR, _, _ = expected_penalty(x, V, backend="torch", tau=4)
    got = spec_penalty(x[lo:hi], V, tau=4, backend="torch", process_group=pair)
    bounds.assert_within(got, R, dR, f"rank {rank}'s penalty over the pair")
    u32 = bounds.U[torch.float32]
    want, bound = bounds.covariance_bound(x, u_op=u32, u_acc=u32)
    sigma = batch_covariance(x[lo:hi], backend="torch", process_group=pair)
    bounds.assert_within(sigma, want, bound, f"rank {rank}'s covariance over the pair")
    if rank == 0:  # a group of one process is no group: one row has no covariance
        with pytest.raises(ValueError, match=r"^x: expected a batch of at least 2 rows"):
            spec_penalty(x[:1], V, tau=1, backend="torch", process_group=alone)


def test_a_subgroup_of_the_world(tmp_path):
    """The ops communicate over the group they are given, not the world (a collective on the
    world would wait for the rank outside the group: the timeout fails it)."""
    run_on_processes(_subgroup_body, 3, tmp_path, timeout=60)
