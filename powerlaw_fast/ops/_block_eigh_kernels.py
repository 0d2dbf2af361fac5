"""Triton kernel of :mod:`powerlaw_fast.ops.block_eigh`: cyclic Jacobi on a batch of small
symmetric matrices, one program per matrix, the whole iteration in registers.

Imported on the first launch, not with the package.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _block_jacobi_kernel(
    a_ptr,
    vectors_ptr,
    values_ptr,
    SIZE: tl.constexpr,
    SWEEPS: tl.constexpr,
    IN_PRECISION: tl.constexpr,
):
    # One matrix per program. Each round rotates SIZE / 2 disjoint pairs at once, the pairs of
    # a round-robin tournament (the circle method: index SIZE - 1 fixed, the others turning),
    # so SIZE - 1 rounds meet every pair once: one cyclic Jacobi sweep. A round's rotations
    # form one orthogonal matrix J with two entries per row; A <- J^T A J and Q <- Q J are
    # three SIZE x SIZE dots, which keeps everything in registers and on the tensor cores.
    pid = tl.program_id(0).to(tl.int64)
    idx = tl.arange(0, SIZE)
    offsets = pid * SIZE * SIZE + idx[:, None] * SIZE + idx[None, :]
    a = tl.load(a_ptr + offsets).to(tl.float32)
    eye = idx[:, None] == idx[None, :]
    q = tl.where(eye, 1.0, 0.0)
    last = SIZE - 1
    for _ in range(SWEEPS):
        for r in range(last):
            partner = (2 * r - idx + 2 * last) % last
            partner = tl.where(partner == idx, last, partner)
            partner = tl.where(idx == last, r, partner)
            pair = idx[None, :] == partner[:, None]  # [i, j]: j is i's partner this round
            d = tl.sum(tl.where(eye, a, 0.0), axis=1)
            # the pair's off-diagonal entry, symmetrised (the dots' rounding leaves A a few
            # ulps from symmetric; both members of a pair must see the same rotation)
            off = tl.sum(tl.where(pair, a + tl.trans(a), 0.0), axis=1) * 0.5
            d_partner = tl.sum(tl.where(pair, d[None, :], 0.0), axis=1)
            first = idx < partner
            gap = tl.where(first, d_partner - d, d - d_partner)  # A_qq - A_pp for p < q
            coupled = off != 0.0
            zeta = gap / (2.0 * tl.where(coupled, off, 1.0))
            # the smaller root of t^2 + 2 zeta t - 1 = 0: |angle| <= pi / 4; t -> 0 as the
            # gap dwarfs the coupling (zeta^2 overflows to inf: t = 0, no rotation)
            sign = tl.where(zeta >= 0.0, 1.0, -1.0)
            t = sign / (tl.abs(zeta) + tl.sqrt(1.0 + zeta * zeta))
            t = tl.where(coupled, t, 0.0)
            c = 1.0 / tl.sqrt(1.0 + t * t)
            s = t * c
            j = tl.where(eye, c[:, None], tl.where(pair, tl.where(first, s, -s)[:, None], 0.0))
            a = tl.dot(tl.trans(j), tl.dot(a, j, input_precision=IN_PRECISION),
                       input_precision=IN_PRECISION)  # fmt: skip
            q = tl.dot(q, j, input_precision=IN_PRECISION)
    tl.store(vectors_ptr + offsets, q)
    tl.store(values_ptr + pid * SIZE + idx, tl.sum(tl.where(eye, a, 0.0), axis=1))
