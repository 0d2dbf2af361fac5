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

from powerlaw_fast._backend import tf32_allowed, triton_available, triton_interpreter_active


def dot_precision(operand_dtype: torch.dtype) -> str:
    """``"ieee"`` (exact float32) or ``"tf32"`` for a GEMM whose operands have this dtype."""
    if operand_dtype == torch.float32 and not tf32_allowed():
        return "ieee"
    return "tf32"


def dot_in_fp32(operand_dtype: torch.dtype) -> bool:
    """Widen bfloat16 operands to float32 before ``tl.dot`` (interpreter only, see above)."""
    return operand_dtype == torch.bfloat16 and triton_interpreter_active()


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

if triton_available():
    import triton
    import triton.language as tl

    def gemm_configs():
        """Tiles for the ``[B, N] x [N, N]`` GEMMs (BLOCK_M is fixed by the caller)."""
        if triton_interpreter_active():
            # The interpreter's cost is per program instance: few, large tiles.
            return [triton.Config({"BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8})]
        return [
            triton.Config({"BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for n, k, w, s in GEMM_CONFIGS
        ]

    @triton.jit
    def round_to_tf32(v):
        """float32 -> float32 holding the nearest TF32 value (ties away from zero)."""
        bits = v.to(tl.int32, bitcast=True)
        bits = (bits + 0x1000) & -8192  # -8192 = 0xFFFFE000: keep sign, exponent, 10 bits
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def accumulate_dot(
        a, b, acc, IN_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr
    ):
        """``acc + a @ b`` under the precision rules of this module."""
        if DOT_IN_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IN_PRECISION == "tf32":
            if a.dtype == tl.float32:
                a = round_to_tf32(a)
            if b.dtype == tl.float32:
                b = round_to_tf32(b)
        return tl.dot(a, b, acc, input_precision=IN_PRECISION)

    @triton.jit
    def grouped_tile(pid, num_m, num_n, GROUP_M: tl.constexpr):
        """Program id -> (row block, column block); row blocks that share columns of the
        right-hand operand run together, so its tiles stay in L2."""
        width = GROUP_M * num_n
        group = pid // width
        first_m = group * GROUP_M
        size_m = min(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % width) % size_m
        pid_n = (pid % width) // size_m
        return pid_m, pid_n
