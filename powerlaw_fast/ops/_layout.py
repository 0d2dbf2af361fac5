"""Buffer layouts and fixed tile sizes shared by the host launchers and their Triton kernels,
named once (a leaf: it imports nothing of the package).

The spectral penalty's ``scratch`` (float32; float64 on the torch backend for float64 input)::

    [R, #non-finite, anchor code, overflow flag | dR/dlam (N) | lam (N) | Z's column means (N)]

The grouped penalty keeps the same four head values per layer in ``heads [L, 4]`` and the
three vectors of every layer side by side in ``parts [3, TOTAL]``.
"""

from __future__ import annotations

import torch

SCRATCH_HEAD = 4  # penalty, non-finite count, anchor code, overflow flag
BLOCK_M = 128  # GEMM row block, fixed so launchers can size the row-block moments beforehand
# A spectrum whose largest value is below the smallest normal float32 divided by float32's
# epsilon has lost precision to underflow (and 1 / s_anchor overflows): about 9.9e-32.
UNDERFLOW_FLOAT32 = torch.finfo(torch.float32).tiny / torch.finfo(torch.float32).eps
MAX_FUSED_N = 4096  # widest layer for the one-program sort and the Triton GEMM route


# The scratch's parts, by name (``N`` the spectrum's length)
def scratch_size(N: int, parts: int) -> int:
    """Entries of a scratch with ``parts`` vectors of N: 2 (a spectrum's penalty: dR/dlam and
    lam) or 3 (a batch's: also Z's column means)."""
    return SCRATCH_HEAD + parts * N


def scratch_width(scratch: torch.Tensor, parts: int) -> int:
    """N from a scratch of ``parts`` vectors."""
    return (scratch.shape[0] - SCRATCH_HEAD) // parts


def scratch_status(scratch: torch.Tensor) -> torch.Tensor:
    """``[3]``: the non-finite count, the anchor code and the overflow flag."""
    return scratch[1:SCRATCH_HEAD]


def scratch_dR_dlam(scratch: torch.Tensor, N: int) -> torch.Tensor:
    return scratch[SCRATCH_HEAD : SCRATCH_HEAD + N]


def scratch_lam(scratch: torch.Tensor, N: int) -> torch.Tensor:
    return scratch[SCRATCH_HEAD + N : SCRATCH_HEAD + 2 * N]


def scratch_column_means(scratch: torch.Tensor, N: int) -> torch.Tensor:
    return scratch[SCRATCH_HEAD + 2 * N : SCRATCH_HEAD + 3 * N]
