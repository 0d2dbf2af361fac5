"""A sweep: many runs into one folder, resumable, shared out under ``torchrun``.

:func:`run_sweep` skips every run whose JSON already exists, is complete and has the same
config, so an interrupted sweep resumes where it stopped. Under ``torchrun``
(``WORLD_SIZE > 1``) ``parallel="runs"`` divides the runs among the processes, each on its own
device (``cuda:LOCAL_RANK``), the most efficient for a many-run sweep; ``parallel="data"``
trains every run data-parallel over all processes
(:mod:`~powerlaw_fast.paper.experiments.parallel`), and rank 0 evaluates and writes the JSON.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .build import Data, default_device
from .config import RunConfig
from .parallel import DataParallel, check_data_parallel, distributed_shard
from .results import read_result, temporary_files
from .run import run_experiment


def sweep_device(device: torch.device | str | None) -> torch.device:
    """The device of this process: under torchrun with CUDA, ``cuda:LOCAL_RANK``."""
    device = torch.device(device) if device is not None else default_device()
    _, world = distributed_shard()
    if world > 1 and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0") or 0))
    return device


def run_sweep(
    configs: Sequence[RunConfig],
    out_dir,
    data: Data,
    *,
    device: torch.device | str | None = None,
    progress: bool = True,
    parallel: str = "runs",
) -> list[tuple[str, str]]:
    """Run every config into ``out_dir/<name>.json``, skipping the complete ones.

    A run is skipped when its JSON exists, is complete and was made with the same config (also
    under the name older versions gave it, :attr:`RunConfig.legacy_name`); a JSON from a
    different config is replaced (an old-named one is removed, the run written under the new
    name), and the temporary files a killed writer left for
    this process's runs are removed. Under torchrun
    (``WORLD_SIZE > 1``), ``parallel="runs"`` makes this process run the configs ``i`` with
    ``i % WORLD_SIZE == RANK``; ``parallel="data"`` trains every run over all processes
    (rank 0 decides what to skip and writes the results; ``out_dir`` must be shared).

    Returns ``[(name, "ran" | "skipped"), ...]`` for this process's runs.
    """
    if parallel not in ("runs", "data"):
        raise ValueError(f"parallel: expected 'runs' or 'data', got {parallel!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rank, world = distributed_shard()
    device = sweep_device(device)
    data_parallel = None
    if world > 1 and parallel == "data":
        for cfg in configs:
            check_data_parallel(cfg, device)
        data_parallel = DataParallel.initialise(device)
        mine = list(configs)
    else:
        mine = [cfg for i, cfg in enumerate(configs) if i % world == rank]
    if data_parallel is None or rank == 0:
        # these runs are this process's alone: a temporary file of one is a killed writer's
        for cfg in mine:
            for name in {cfg.name, cfg.legacy_name}:
                for stale in temporary_files(out_dir, name):
                    stale.unlink(missing_ok=True)
    outcome = []
    bar = tqdm(mine, desc=f"runs (rank {rank}/{world})" if world > 1 else "runs", unit="run",
               disable=not progress or (data_parallel is not None and rank != 0))
    for cfg in bar:
        path = out_dir / f"{cfg.name}.json"
        done = read_result(path)
        # a folder from an older version holds the run under its old name
        # (shallow-shallow-...): resume from it; a different config's is replaced below
        legacy = out_dir / f"{cfg.legacy_name}.json"
        if done is None and legacy != path and legacy.exists():
            done, path = read_result(legacy), legacy
        skip = done is not None and _same_config(done["config"], cfg)
        if data_parallel is not None:
            import torch.distributed as dist

            decision = [skip]
            dist.broadcast_object_list(decision, src=0, group=data_parallel.group)
            skip = bool(decision[0])
        if skip:
            outcome.append((cfg.name, "skipped"))
            continue
        if path != out_dir / f"{cfg.name}.json":  # rerun under the new name, not beside it
            if data_parallel is None or rank == 0:
                path.unlink(missing_ok=True)
            path = out_dir / f"{cfg.name}.json"
        bar.set_postfix_str(cfg.name)
        run_experiment(cfg, data, device=device, out_path=path, progress=progress,
                       parallel=data_parallel)
        outcome.append((cfg.name, "ran"))
    bar.close()
    return outcome


def _same_config(stored: dict, cfg: RunConfig) -> bool:
    """A stored config equals ``cfg``; fields added since it was written count at their
    defaults (a sweep from before a new option resumes instead of rerunning), and ``notes``
    (documentation, e.g. a preset's explanation, which may be reworded) do not count."""
    wanted = {**cfg.to_dict(), "notes": None}
    if {**stored, "notes": None} == wanted:
        return True
    try:
        return {**RunConfig.from_dict(stored).to_dict(), "notes": None} == wanted
    except (TypeError, ValueError):
        return False
