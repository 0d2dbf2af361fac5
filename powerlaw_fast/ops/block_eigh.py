"""Eigendecompositions of a batch of small symmetric matrices ``A [K, b, b]`` (b <= 64) with no
host synchronisation: the blocks of the tracked basis
(:mod:`powerlaw_fast.training._tracked_basis`).

``torch.linalg.eigh`` of a batch is exact but, on a GPU, reads its error flags back to the host
after every call, so a training step that calls it cannot be captured in a CUDA graph. The
Triton row runs cyclic Jacobi instead, one program per matrix: each sweep meets every pair of
indices once (``b - 1`` rounds of ``b / 2`` disjoint rotations, each round three ``b x b``
dots); Jacobi converges quadratically once the off-diagonal is small, and the tracked basis
hands it blocks that are nearly diagonal already. Matrices narrower than a power of two (or
than 16, the smallest dot) are padded with decoupled slots below their spectrum, which Jacobi
leaves alone and the sort puts first (ascending), to be dropped. The plain-torch twin is
``torch.linalg.eigh``.

Stage ``block_eigh``: ``A [K, b, b]`` float32 or float64 -> ``(values [K, b]`` ascending,
``vectors [K, b, b]`` with the eigenvectors as columns), in A's dtype (the Triton row computes
in float32).

Example::

    >>> import torch
    >>> from powerlaw_fast.ops.block_eigh import block_eigh
    >>> A = torch.diag_embed(torch.tensor([[3.0, 1.0, 2.0]]))
    >>> block_eigh(A, backend="torch")[0]
    tensor([[1., 2., 3.]])
"""

from __future__ import annotations

import functools

import torch

from powerlaw_fast._backend import resolve_backend
from powerlaw_fast.ops import _alloc
from powerlaw_fast.ops._triton_gemm import next_power_of_2
from powerlaw_fast.ops.backends import implementation, register

# Sweeps of the Triton row. From a random dense 64 x 64 matrix Jacobi needs about 7 to reach
# float32's rounding (tests/ops/test_block_eigh.py measures it); the tracked basis's blocks are
# within one step's drift of diagonal, where 2 or 3 suffice.
JACOBI_SWEEPS = 8
MAX_BLOCK = 64


@functools.cache
def _kernels():
    """This family's Triton kernel (:mod:`powerlaw_fast.ops._block_eigh_kernels`), imported on
    the first launch so that importing the package does not import triton."""
    from powerlaw_fast.ops import _block_eigh_kernels

    return _block_eigh_kernels


@register("block_eigh", "torch")
def block_eigh_torch(A: torch.Tensor):
    """Reference: ``torch.linalg.eigh`` (LAPACK or cuSOLVER; synchronises on a GPU)."""
    return torch.linalg.eigh(A)


@register("block_eigh", "triton")
def block_eigh_triton(A: torch.Tensor, sweeps: int = JACOBI_SWEEPS):
    """Cyclic Jacobi, one program per matrix; float32 arithmetic, no host synchronisation."""
    K, b, _ = A.shape
    size = max(16, next_power_of_2(b))  # tl.dot's smallest shape (triton 3.6)
    work = A.float()
    if size != b:  # decoupled slots below the spectrum: Jacobi leaves them, the sort drops them
        floor = work.abs().sum(2).amax() + 1.0  # Gershgorin: below every eigenvalue
        padded = torch.zeros(K, size, size, device=A.device, dtype=torch.float32)
        padded[:, :b, :b] = work
        tail = padded.diagonal(dim1=1, dim2=2)[:, b:]
        tail.copy_(-floor * torch.arange(1, size - b + 1, device=A.device))
        work = padded
    work = work.contiguous()
    vectors = _alloc.empty((K, size, size), device=A.device, dtype=torch.float32)
    values = _alloc.empty((K, size), device=A.device, dtype=torch.float32)
    # tf32x3: float32-accurate dots on tensor cores (tf32 alone would leave 1e-3 of the largest
    # eigenvalue in the smallest; "ieee" float32 dots spill 8-18 KB per thread on sm_90); 4
    # warps: ptxas reports 255 registers and about 100 bytes of spill for b = 64 under triton
    # 3.6 and 3.9 (8 warps: 416 under 3.6)
    precision = "ieee" if A.device.type == "cpu" else "tf32x3"
    _kernels()._block_jacobi_kernel[(K,)](work, vectors, values, SIZE=size, SWEEPS=sweeps,
                                          IN_PRECISION=precision, num_warps=4)  # fmt: skip
    values, order = values.sort(dim=1)
    vectors = vectors.gather(2, order[:, None, :].expand(K, size, size))
    if size != b:  # the padding's eigenvalues sort first (ascending): drop them
        values, vectors = values[:, size - b :], vectors[:, :b, size - b :]
    return values.to(A.dtype), vectors.to(A.dtype)


def block_eigh(A: torch.Tensor, *, backend: str = "auto"):
    """Eigenvalues (ascending) and eigenvectors (columns) of each symmetric ``A [K, b, b]``.

    Args:
        A: ``[K, b, b]`` symmetric, float32 or float64, b <= 64 (its lower triangle is not
            assumed: the Triton row reads the whole matrix).
        backend: "auto" (Triton for CUDA tensors, torch otherwise), "torch" or "triton".

    Returns:
        ``(values [K, b], vectors [K, b, b])`` in A's dtype, as ``torch.linalg.eigh``.
    """
    if A.dim() != 3 or A.shape[1] != A.shape[2] or not 1 <= A.shape[1] <= MAX_BLOCK:
        raise ValueError(f"A: expected [K, b, b] with 1 <= b <= {MAX_BLOCK}, got shape "
                         f"{tuple(A.shape)}")  # fmt: skip
    if backend not in ("auto", "torch", "triton"):  # no CUDA C++ row: Triton is the GPU's
        raise ValueError(f"backend: expected 'auto', 'torch' or 'triton', got {backend!r}")
    name = resolve_backend(backend, A.device, dtype=torch.float32)
    return implementation("block_eigh", name)(A)
