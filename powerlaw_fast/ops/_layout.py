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
