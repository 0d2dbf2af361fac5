"""Several processes: the global mean and row count of a batch sharded over a process group,
and the group's name as the ops carry it (a string, so custom ops can take it).

Example::

    >>> from powerlaw_fast.ops._distributed import group_name_of
    >>> group_name_of(None)
    ''
"""

from __future__ import annotations

import torch


def global_mean(local_mean: torch.Tensor, local_count: int, group):
    """All-reduce (column sums, count) in float64: one message of ``N + 1`` values."""
    stats = torch.cat(
        [
            local_mean.to(torch.float64) * local_count,
            torch.tensor([float(local_count)], dtype=torch.float64, device=local_mean.device),
        ]
    )
    torch.distributed.all_reduce(stats, group=group)
    count = stats[-1]
    return (stats[:-1] / count).to(local_mean.dtype), count


def resolve_group(group_name: str):
    if not group_name:
        return None
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(group_name)


def group_name_of(process_group) -> str:
    """The name that the ops carry for ``process_group`` ("" for a single process).

    A group of one process needs no communication and is treated as none.
    """
    if process_group is None:
        return ""
    import torch.distributed as dist

    if not dist.is_initialized():
        raise ValueError("process_group: torch.distributed is not initialised (init_process_group)")
    if dist.get_world_size(process_group) == 1:
        return ""
    return process_group.group_name
