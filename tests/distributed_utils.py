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
