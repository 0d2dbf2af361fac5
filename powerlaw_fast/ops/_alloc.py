"""Output allocation for the kernel launchers, in one place so tests can poison it.

Tests replace :func:`empty` with a version that fills buffers with NaN (or a sentinel for
integers) before each launch: a kernel that leaves any element unwritten then fails them.
"""

from __future__ import annotations

import torch


def empty(shape, *, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, device=device, dtype=dtype)
