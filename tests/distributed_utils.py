"""Run a test body on several CPU processes joined by a gloo process group."""

from __future__ import annotations

import os
import sys

import pytest
import torch


def _entry(rank, world, init_file, body, args):
    import torch.distributed as dist

    # the Triton interpreter (set by conftest in the parent) must be on before triton imports
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    body(rank, world, *args)
    # every rank leaves together: tearing gloo down while a peer still talks aborts the peer
    dist.barrier()
    dist.destroy_process_group()
    # Skip the interpreter's teardown: with gloo's threads, static destructors at exit abort
    # now and then ("terminate called without an active exception") after the work is done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_on_processes(body, world: int, tmp_path, *args, timeout: float = 300.0) -> None:
    """Spawn ``world`` processes running ``body(rank, world, *args)``; a failure in any of them
    fails the test, and so do ranks still running after ``timeout`` seconds (ranks waiting
    for each other in a collective would otherwise hang the suite). ``body`` must be a
    module-level function (it is pickled)."""
    import time

    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    init_file = tmp_path / f"init-{world}"
    context = mp.spawn(_entry, args=(world, str(init_file), body, args), nprocs=world,
                       join=False)  # fmt: skip
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {world} ranks did not finish within {timeout:.0f} s: a hang")


def shard_bounds(total: int, world: int, rank: int) -> tuple[int, int]:
    """Uneven shards: rank r gets a share growing with r (the last rank takes the rest)."""
    weights = [r + 1 for r in range(world)]
    cuts = [0]
    for w in weights[:-1]:
        cuts.append(cuts[-1] + max(1, total * w // sum(weights)))
    cuts.append(total)
    return cuts[rank], cuts[rank + 1]


class ThreadGroup:
    """A process group whose ranks are threads of this process: ``patch(monkeypatch)`` replaces
    torch.distributed's ``all_reduce`` (an exact sum in rank order), ``broadcast`` (a copy from
    the source rank), ``get_world_size``, ``get_rank`` and ``get_global_rank``, so that a test
    of the collectives' arithmetic runs in-process (and sees the code under test, which
    spawned workers would import afresh). ``members``: the global ranks of the group's ranks; every
    ``group`` argument passed to a collective is recorded in ``groups``."""

    def __init__(self, members):
        import threading

        self.members = list(members)
        self.barrier = threading.Barrier(len(self.members))
        self.slots = {}
        self.ranks = {}
        self.groups = []
        self.collectives = []  # (name, source) of each collective, recorded by the group's rank 0

    def patch(self, monkeypatch):
        import torch.distributed as dist

        monkeypatch.setattr(dist, "is_available", lambda: True)
        monkeypatch.setattr(dist, "is_initialized", lambda: True)
        for name in ("all_reduce", "broadcast", "get_world_size", "get_global_rank", "get_rank"):
            monkeypatch.setattr(dist, name, getattr(self, name))
        return self

    def _me(self):
        import threading

        return self.ranks[threading.get_ident()]

    def get_world_size(self, group=None):
        self.groups.append(group)
        return len(self.members)

    def get_rank(self, group=None):
        """The rank in ``group``; without one, the global rank."""
        self.groups.append(group)
        rank = self._me()
        return rank if group is not None else self.members[rank]

    def get_global_rank(self, group, group_rank):
        self.groups.append(group)
        return self.members[group_rank]

    def all_reduce(self, tensor, group=None):
        self.groups.append(group)
        rank = self._me()
        self.slots[rank] = tensor.clone()
        self.barrier.wait()
        total = self.slots[0].clone()
        for r in range(1, len(self.members)):
            total += self.slots[r]
        self.barrier.wait()
        tensor.copy_(total)
        if rank == 0:
            self.collectives.append(("all_reduce", None))

    def broadcast(self, tensor, src, group=None):
        self.groups.append(group)
        rank = self._me()
        self.slots[self.members[rank]] = tensor.clone()
        self.barrier.wait()
        tensor.copy_(self.slots[src])
        self.barrier.wait()
        if rank == 0:
            self.collectives.append(("broadcast", src))

    def run(self, body):
        """``body(rank)`` on every rank at once (one thread each); the ranks' results."""
        import threading

        results, errors = [None] * len(self.members), []

        def main(rank):
            self.ranks[threading.get_ident()] = rank
            try:
                results[rank] = body(rank)
            except BaseException as err:  # noqa: BLE001 - re-raised below
                errors.append(err)
                self.barrier.abort()

        threads = [threading.Thread(target=main, args=(r,)) for r in range(len(self.members))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        if errors:
            raise errors[0]
        return results
