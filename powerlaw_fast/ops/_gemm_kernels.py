"""Triton device helpers for the GEMMs of every op family: the tile configs, the tile order and the
dot under the package's precision rules (see :mod:`powerlaw_fast.ops._triton_gemm`).

Imported on the first launch, not with the package: importing triton is not free, and
the CPU path never needs it.
"""

from __future__ import annotations

import triton
import triton.language as tl

from powerlaw_fast._backend import triton_interpreter_active
from powerlaw_fast.ops._triton_gemm import GEMM_CONFIGS


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
