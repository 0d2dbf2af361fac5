"""Data-parallel training under ``torchrun``: the process group, the DDP wrapper, the checks.

In ``"data"`` mode (see :func:`~powerlaw_fast.paper.experiments.run_sweep`) every run is
trained over all processes with ``DistributedDataParallel``: each rank takes its share of every
global batch and the spectral regulariser gets the process group, so its refresh and per-batch
spectrum are those of the global batch. Batch norm becomes ``SyncBatchNorm`` (CUDA only); the
whitening variants are refused (their per-batch statistics would be per rank).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from .config import RunConfig


def distributed_shard() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) outside torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    rank = int(os.environ.get("RANK", "0") or 0)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} / WORLD_SIZE={world}: expected 0 <= RANK < WORLD_SIZE")
    return rank, world



@dataclass
class DataParallel:
    """The process group of a data-parallel run: ``world`` ranks, this one ``rank``."""

    group: object
    rank: int
    world: int

    @classmethod
    def initialise(cls, device: torch.device) -> DataParallel:
        """Join (or reuse) the default process group (torchrun's environment): NCCL on CUDA,
        gloo on the CPU."""
        import torch.distributed as dist

        if not dist.is_available():
            raise RuntimeError("data-parallel runs need torch.distributed, which is unavailable")
        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group(backend)
        return cls(dist.group.WORLD, dist.get_rank(), dist.get_world_size())

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier(group=self.group)



def check_data_parallel(cfg: RunConfig, device: torch.device) -> None:
    """Raise ValueError when ``cfg`` cannot be trained data-parallel on ``device``."""
    if cfg.variant in ("whiten", "whiten+specreg-last"):
        raise ValueError(
            f"variant {cfg.variant!r}: data-parallel training is not supported for the whitening "
            f"variants (each rank would whiten with its own batch statistics); use "
            f"--parallel runs"
        )
    if cfg.arch == "shallow" and cfg.batch_norm and device.type != "cuda":
        raise ValueError(
            "batch norm under data-parallel training needs SyncBatchNorm, which needs CUDA; "
            "use --parallel runs on the CPU"
        )


def data_parallel_model(model: nn.Module, cfg: RunConfig, device: torch.device) -> nn.Module:
    """``model`` wrapped in DistributedDataParallel, its batch norms made SyncBatchNorm."""
    from torch.nn.parallel import DistributedDataParallel

    check_data_parallel(cfg, device)
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        # in place: the blocks keep their names, so the regulariser's hooks still find them
        for name, block in list(model.blocks.items()):
            model.blocks[name] = nn.SyncBatchNorm.convert_sync_batchnorm(block)
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def mean_over_ranks(sums: dict, parallel: DataParallel, device: torch.device) -> dict:
    """Each value of ``sums`` averaged over the ranks of ``parallel``."""
    import torch.distributed as dist

    keys = sorted(sums)
    t = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t, group=parallel.group)
    return {k: float(v) / parallel.world for k, v in zip(keys, t.tolist(), strict=True)}
