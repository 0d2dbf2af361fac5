"""Triton GEMM helpers shared by the op families: tile configs, tile order, the dot itself.

Precision rules (the same for every GEMM in the package):

- float32 at ``torch.get_float32_matmul_precision() == "highest"``: exact float32 products.
- float32 otherwise: TF32. The operands are rounded to TF32 *to nearest* (ties away from zero,
  PTX's ``cvt.rna.tf32.f32``) before ``tl.dot``: tensor cores otherwise drop the low 13 bits
  (truncation), a bias that adds up over the reduction; rounded operands give cuBLAS's TF32
  error. Under the interpreter (exact float32 products) the rounding makes the CPU compute
  what the GPU computes.
- bfloat16 operands with float32 accumulation. The interpreter's ``tl.dot`` on bfloat16
  operands is wrong (triton 3.9); products of bfloat16 values are exact in float32, so the
  operands are widened there first.

Example::

    >>> import torch
    >>> from powerlaw_fast.ops._triton_gemm import dot_precision
    >>> dot_precision(torch.bfloat16)
    'tf32'
"""

from __future__ import annotations

import torch

from powerlaw_fast._backend import tf32_allowed, triton_interpreter_active


def dot_precision(operand_dtype: torch.dtype) -> str:
    """``"ieee"`` (exact float32) or ``"tf32"`` for a GEMM whose operands have this dtype."""
    if operand_dtype == torch.float32 and not tf32_allowed():
        return "ieee"
    return "tf32"


def dot_in_fp32(operand_dtype: torch.dtype) -> bool:
    """Widen bfloat16 operands to float32 before ``tl.dot`` (interpreter only, see above)."""
    return operand_dtype == torch.bfloat16 and triton_interpreter_active()


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for launch grids (``triton.cdiv`` without importing triton)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (``triton.next_power_of_2`` without importing triton)."""
    return 1 << max(0, int(n) - 1).bit_length()


def size_bucket(n: int) -> int:
    """Autotune key for a batch size: the next power of two, so a partial last batch (or a
    per-rank shard that varies by a few rows) reuses the tuned config instead of re-tuning."""
    return 1 << max(0, int(n) - 1).bit_length()


# Tiles for the ``[B, N] x [N, N]`` GEMMs (BLOCK_M = 128 is fixed by the callers): (BLOCK_N,
# BLOCK_K, num_warps, num_stages). Each fits sm_90's 227 KiB of shared memory per block at
# float32 operands, the widest (tests/ops/test_triton_sm90_configs.py compiles every one with
# ptxas). Measured there (triton 3.9, sm_90a; shared KiB / spill bytes, TF32 | exact float32):
#   128 x 64, 8 warps, 3 stages: 193 / 32 | 160 / 608
#   128 x 32, 8 warps, 4 stages: 128 / 0  | 112 / 168
#    64 x 32, 4 warps, 4 stages:  96 / 8  |  88 / 160
#   256 x 32, 8 warps, 3 stages: 144 / 104 | 112 / 908
# Replaced: 256 x 64 x 3 stages (288 KiB at TF32: could never launch, 6.5 KB spilled at exact
# float32) and 64 x 64 x 4 stages (the most spills at every precision: 828 bytes TF32, 300 bf16,
# 1464 exact float32). The exact-float32 (FMA) dot spills in every config: no spill-free tile
# with BLOCK_M = 128 was found.
GEMM_CONFIGS = (
    (128, 64, 8, 3),
    (128, 32, 8, 4),
    (64, 32, 4, 4),
    (256, 32, 8, 3),
)

# KERNELS-MOVED _gemm_kernels.py gemm_configs round_to_tf32 accumulate_dot grouped_tile
