"""SpectralRegularizer over gloo process groups: the refresh gives every rank the single-process
eigenbasis, and a DistributedDataParallel step matches the single-process step."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from powerlaw_fast import SpectralRegularizer
from tests.distributed_utils import run_on_processes, shard_bounds


def _model():
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 3)
    ).double()


def _data(rows=47):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(rows, 10, generator=g, dtype=torch.float64) * torch.linspace(
        2, 0.2, 10, dtype=torch.float64
    )
    y = torch.randint(0, 3, (rows,), generator=g)
    return x, y


def _refresh_body(rank, world):
    import torch.distributed as dist

    x, _ = _data()
    model = _model()
    single = SpectralRegularizer(model, ["1", "3"], tau=2, progress=False)
    single.refresh(x, batch_size=8)
    reg = SpectralRegularizer(
        model, ["1", "3"], tau=2, progress=False, process_group=dist.group.WORLD
    )
    lo, hi = shard_bounds(x.shape[0], world, rank)
    reg.refresh(x[lo:hi], batch_size=5)  # uneven shards, partial last batches
    for name in ["1", "3"]:
        torch.testing.assert_close(
            reg.eigenvalues(name), single.eigenvalues(name), rtol=1e-10, atol=1e-12
        )
        overlap = (reg.basis(name).double().T @ single.basis(name).double()).abs()
        torch.testing.assert_close(
            overlap, torch.eye(overlap.shape[0], dtype=torch.float64), atol=1e-5, rtol=0
        )
        gathered = [torch.empty_like(reg.basis(name)) for _ in range(world)]
        dist.all_gather(gathered, reg.basis(name))
        assert all(torch.equal(g, gathered[0]) for g in gathered)  # identical on every rank


@pytest.mark.parametrize("world", [2, 3])
def test_refresh_gives_every_rank_the_single_process_basis(tmp_path, world):
    run_on_processes(_refresh_body, world, tmp_path)


def _train_step(model, reg, x, y, scale=1.0):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = nn.functional.cross_entropy(model(x), y) + scale * reg.penalty()
    opt.zero_grad()
    loss.backward()
    opt.step()


def _ddp_body(rank, world):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    x, y = _data(rows=36)
    # single process: the whole batch
    model = _model()
    reg = SpectralRegularizer(model, ["1", "3"], tau=2, beta=5.0, progress=False)
    reg.refresh(x, batch_size=12)
    _train_step(model, reg, x, y)
    expected = [p.detach().clone() for p in model.parameters()]

    # DDP: equal shards (DDP averages the per-rank cross entropies), penalty scaled by world
    model = _model()
    ddp = DistributedDataParallel(model)
    reg = SpectralRegularizer(
        model, ["1", "3"], tau=2, beta=5.0, progress=False, process_group=dist.group.WORLD
    )
    rows = x.shape[0] // world
    shard = slice(rank * rows, (rank + 1) * rows)
    reg.refresh(x[shard], batch_size=7)
    _train_step(ddp, reg, x[shard], y[shard], scale=world)
    for got, want in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(got.detach(), want, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("world", [2, 3])
def test_ddp_step_matches_single_process_step(tmp_path, world):
    run_on_processes(_ddp_body, world, tmp_path)
