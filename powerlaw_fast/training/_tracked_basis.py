"""``basis_update="tracked"``: the eigenbasis of the running covariance followed by small
rotations each step, built from GEMMs, instead of an eigendecomposition per step.

What is tracked. The ``"running"`` mode's covariance ``C_t = (1 - m) C_{t-1} + m S_t`` (``S_t``
the batch's covariance, ``m`` the momentum) and its eigenbasis, which that mode
eigendecomposes every step. Here ``C_{t-1}`` is held only through its eigenpairs ``(V, lam)``;
in that basis the new average is

    M = V^T C_t V = (1 - m) diag(lam) + m Z^T Z / (B - 1),   Z = (X - mean) V   [B, N]

diagonal but for the new batch's off-diagonal, of the order of ``m`` times its sampling error,
and ``V`` times M's eigenvectors is exactly the ``"running"`` mode's basis. M's eigenvectors
are approximated in two sweeps; each sweep

1. diagonalises M's diagonal blocks of ``BLOCK`` consecutive columns exactly (a batched
   ``BLOCK x BLOCK`` eigendecomposition: columns are kept in descending eigenvalue order, so
   eigenvalues too close for one batch to tell apart sit in one block; the blocks' boundaries
   move by half a block between sweeps and steps);
2. rotates towards M's remaining eigenvectors to first order: column j gains ``Theta_ij`` of
   column i,

       Theta_ij = M_ij (d_j - d_i) / ((d_j - d_i)^2 + 16 M_ij^2)       (d = diag M)

   the first-order eigenvector perturbation ``M_ij / (d_j - d_i)`` where ``|M_ij|`` is small
   against the gap, damped to at most 1/8 where it is not (a pair across a block boundary; the
   next sweep's blocks hold it), and each column's angles scaled down to a total of at most
   ``COLUMN_ANGLE`` (0.3 rad; in a dense tail, many small angles driven by one batch's noise
   add up past where the first order holds). The rotation is ``R = I + Theta + Theta^2 / 2``
   (Theta is antisymmetric, so ``R^T R = I + Theta^4 / 4``), in the first sweep made orthogonal
   by one Newton-Schulz step ``R (3 I - R^T R) / 2``: its angles are not small enough for the
   fourth order to vanish (without it ``V^T V`` drifted 2e-2 from the identity on MNIST);
3. between the sweeps, M is rotated with it (``R^T M R``).

Two sweeps leave an off-diagonal of the order of the first sweep's squared angles; one sweep
alone leaves the first-order error, which in this code's prototype moved the trained
spectrum's effective dimension on the shipped MNIST subset (width 500, 3 seeds) from 167 +- 2
(the exact mode) to 177 +- 5, where two sweeps gave 169 +- 1 (tests/training/
test_tracked_basis.py checks both against the exact basis on MNIST).

After the sweeps the columns get unit norm, the eigenvalues are M's Rayleigh quotients for
them (to second order, elementwise), and every ``ORTHONORMALISE_EVERY`` steps one
Newton-Schulz step ``V (3 I - V^T V) / 2`` takes ``V`` back to orthonormal; with a process
group, rank 0's basis is then broadcast.

On a CPU (``method="auto"``) M is eigendecomposed exactly instead (LAPACK's ``eigh`` of an
``N x N`` matrix costs there about as much as two GEMMs): the ``"running"`` mode's basis, from
float32 moments in the current basis rather than a float64 covariance.

Cost per layer and step (sweeps): the projection ``Z`` (``2 B N^2`` flops) and ``Z^T Z`` (its
upper block triangle only, ``GRAM_BLOCKS`` row blocks: ``1.25 B N^2``), eight
``N x N`` GEMMs (``16 N^3``; two more every ``ORTHONORMALISE_EVERY`` steps), ``O(N^2 BLOCK)``
for the blocks and ``O(N^2)`` elementwise work. On a GPU that is a few milliseconds at
N = 8192 where an eigendecomposition takes seconds; on a CPU, whose LAPACK eigendecomposition
costs only about as much as eight GEMMs, it is not much cheaper than the ``"running"`` mode.
The tracker reads no value back: on a GPU the blocks are eigendecomposed by a Triton kernel
(cyclic Jacobi, :mod:`powerlaw_fast.ops.block_eigh`) instead of ``torch.linalg.eigh``, which
checks its info flags on the host, so a step has no host synchronisation and can be captured
in a CUDA graph. With a process group, the batch's sum (``N + 1`` floats) and ``Z^T Z``
(``N^2``) are all-reduced.

Why the tracker projects the batch itself instead of reusing the penalty's ``Z``: the
penalty would then see the basis one batch behind, and on the shipped MNIST subset the exact
eigenbasis of the running covariance before the batch is further from the one with it than
one sweep is (width 500, 2026-12-03: spectrum error 3.4%, the penalty's gradient at cosine
0.95 on average and 0.63 at worst, where two sweeps give 0.2%, 0.999 and 0.993;
tests/training/test_tracked_basis.py). A tracking step therefore does at least the projection
(``2 B N^2`` flops), ``Z^T Z`` (``B N^2`` at best, being symmetric; ``1.25 B N^2`` here) and
one ``V R`` (``2 N^3``), the ``"eigh"`` method exactly that plus the eigendecomposition: at
``B = 1.5 N`` about as much GEMM work again as the per-epoch step's (its penalty is
``4 B N^2``), so no tracker that sees the batch first costs much less than twice the
per-epoch step where GEMMs set the time (``benchmarks/bench_basis.py`` counts each step's
work).

Example::

    >>> import torch
    >>> from powerlaw_fast.training._tracked_basis import track_eigenbasis
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> scales = torch.tensor([4.0, 2.0, 1.0])
    >>> V, lam = torch.eye(3), scales.double() ** 2
    >>> for step in range(100):
    ...     V, lam = track_eigenbasis(V, lam, torch.randn(600, 3) * scales, momentum=0.1,
    ...                               step=step)
    >>> bool(torch.allclose(V.T @ V, torch.eye(3), atol=1e-5))
    True
    >>> bool(V.diagonal().abs().min() > 0.99)  # the eigenbasis of diag(16, 4, 1): the axes
    True
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from powerlaw_fast.ops.block_eigh import block_eigh
from powerlaw_fast.training.accumulator import CovarianceAccumulator

BLOCK = 64  # columns per exactly diagonalised block
SWEEPS = 2  # block + first-order sweeps per step
DAMPING = 16.0  # Theta <= 1 / (2 sqrt(DAMPING)) = 1/8 for pairs the first order cannot resolve
ORTHONORMALISE_EVERY = 4  # steps between two Newton-Schulz steps
# radians, the most one column rotates in one sweep: in a dense tail many small first-order
# angles driven by one batch's noise add up (at N = 2000, B = 3000 to ||Theta||_2 = 1.5, and the
# basis diverged); capped, ||Theta||_2 stays below about 1, where the rotation's second order
# and its Newton-Schulz step hold, while the head's columns, which move far less per step, are
# left alone
COLUMN_ANGLE = 0.3
# Z^T Z from the products of GRAM_BLOCKS column blocks of Z with the columns from theirs on
# (the upper block triangle, mirrored): (k + 1) / (2 k) of the full GEMM's work; at N = 2000,
# B = 3000, one CPU thread, 4 blocks took 202 ms and 8 took 189 ms against 318 ms for the
# full product, and 4 keep each product wide enough for a GPU
GRAM_BLOCKS = 4
# method="auto" on a CPU: LAPACK's eigh of N x N costs about as much as two GEMMs there (at
# N = 2000, one thread: 1.1 s against 0.6 s), so the exact eigendecomposition of M is cheaper
# than the sweeps' eight GEMMs; a GPU's eigh is latency-bound (tens of ms to seconds)
CPU_METHOD = "eigh"


def _all_reduce(tensor: torch.Tensor, group) -> torch.Tensor:
    if group is not None:
        import torch.distributed as dist

        dist.all_reduce(tensor, group=group)
    return tensor


class _Blocks:
    """The block layout of ``N`` columns for one offset (0 or BLOCK / 2): blocks of ``b``
    consecutive columns, the first one ``offset`` wide when the offset is not 0, each padded
    at its end to ``b`` (so eigenvalues sorted in descending order keep the real columns in
    their slots, the padding's below them). ``padding [K, b]`` marks the padding slots,
    ``block_of [N]`` gives each column's block."""

    _cache: dict = {}

    def __init__(self, N: int, offset: int, device: torch.device) -> None:
        b = min(BLOCK, N)
        self.N, self.b = N, b
        self.offset = offset if 0 < offset < N else 0
        head = [self.offset] if self.offset else []
        sizes = head + [min(b, N - s) for s in range(self.offset, N, b)]
        self.K = len(sizes)
        self.tail = self.K * b - N - (b - self.offset if self.offset else 0)
        slots = torch.arange(b)
        self.padding = torch.stack([slots >= size for size in sizes]).to(device)
        self.block_of = torch.repeat_interleave(torch.arange(self.K),
                                                torch.tensor(sizes)).to(device)  # fmt: skip

    @classmethod
    def get(cls, N: int, offset: int, device: torch.device) -> _Blocks:
        key = (N, offset, device)
        blocks = cls._cache.get(key)
        if blocks is None:
            blocks = cls._cache[key] = cls(N, offset, device)
        return blocks

    def pad(self, A: torch.Tensor) -> torch.Tensor:
        """Columns ``[R, N]`` -> ``[R, K, b]`` in the block layout (zeros in the padding)."""
        R, o = A.shape[0], self.offset
        parts = [A[:, :o], A.new_zeros(R, self.b - o), A[:, o:]] if o else [A]
        if self.tail:
            parts.append(A.new_zeros(R, self.tail))
        return torch.cat(parts, dim=1).view(R, self.K, self.b)

    def unpad(self, A: torch.Tensor) -> torch.Tensor:
        """``[R, K, b]`` -> ``[R, N]``, the padding dropped."""
        flat, o = A.reshape(A.shape[0], -1), self.offset
        if o:
            return torch.cat([flat[:, :o], flat[:, self.b : self.b + self.N - o]], dim=1)
        return flat[:, : self.N]


def _times_block_diagonal(A: torch.Tensor, Q: torch.Tensor, blocks: _Blocks) -> torch.Tensor:
    """``A Q_bd`` for ``A [R, N]`` and the block-diagonal ``Q_bd`` whose blocks are ``Q
    [K, b, b]`` (``O(R N b)`` flops instead of a dense GEMM)."""
    return blocks.unpad(torch.einsum("rkb,kbc->rkc", blocks.pad(A), Q))


def _block_sweep(M: torch.Tensor, V: torch.Tensor, blocks: _Blocks, backend: str):
    """Diagonalise M's diagonal blocks exactly: ``(Q_bd^T M Q_bd, V Q_bd)``."""
    K, b = blocks.K, blocks.b
    padded = blocks.pad(blocks.pad(M).view(M.shape[0], K * b).T).view(K, b, K, b)
    diagonal_blocks = padded.diagonal(dim1=0, dim2=2).permute(2, 0, 1).to(torch.float64)
    # padding slots: decoupled, distinct, below every eigenvalue (so sorted last)
    scale = M.diagonal().abs().max().to(torch.float64) + 1.0
    below = -scale * (1.0 + torch.arange(b, dtype=torch.float64, device=M.device))
    slots = diagonal_blocks.diagonal(dim1=1, dim2=2)
    slots.copy_(torch.where(blocks.padding, below.expand_as(slots), slots))
    Q = block_eigh(diagonal_blocks, backend=backend)[1].flip(-1).to(M.dtype)
    rotated = _times_block_diagonal(_times_block_diagonal(M, Q, blocks).T, Q, blocks)
    return rotated, _times_block_diagonal(V, Q, blocks)


def _first_order_angles(M: torch.Tensor, blocks: _Blocks) -> torch.Tensor:
    d = M.diagonal()
    gap = d[None, :] - d[:, None]  # gap[i, j] = d_j - d_i
    theta = M * gap / (gap * gap + DAMPING * M * M).clamp_min(torch.finfo(M.dtype).tiny)
    same = blocks.block_of[:, None] == blocks.block_of[None, :]
    theta.masked_fill_(same, 0.0)  # the blocks are diagonal already
    # each column's total angle capped at COLUMN_ANGLE (the exact eigenvectors of a dense tail
    # follow the batch's noise; following them is neither possible cheaply nor needed); entry
    # (i, j) takes the smaller of its two columns' factors, so theta stays antisymmetric
    scale = (COLUMN_ANGLE / torch.linalg.vector_norm(theta, dim=0).clamp_min(
        torch.finfo(M.dtype).tiny)).clamp_(max=1.0)
    return theta.mul_(torch.minimum(scale[:, None], scale[None, :]))


METHODS = ("auto", "sweeps", "eigh")


def track_eigenbasis(
    V: torch.Tensor,
    lam: torch.Tensor,
    x: torch.Tensor,
    *,
    momentum: float,
    step: int = 0,
    group=None,
    operand_dtype: torch.dtype | None = None,
    method: str = "auto",
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One tracking step: the eigenbasis and eigenvalues of ``(1 - m) V diag(lam) V^T +
    m cov(x)``, approximated as the module docstring describes.

    Args:
        V: ``[N, N]`` float32 (or float64), orthonormal columns, the current basis.
        lam: ``[N]`` float64, the running covariance's eigenvalues in ``V``'s column order.
        x: ``[B, N]`` the batch's activations (any float dtype; not differentiated). With a
            process group, this rank's rows of the global batch.
        momentum: ``m`` in (0, 1], the weight of the batch.
        step: the number of steps before this one (places the blocks' boundaries and the
            Newton-Schulz steps).
        group: a ``torch.distributed`` process group, or None.
        operand_dtype: the dtype of the two ``[B, N]`` GEMMs' operands (default ``V``'s;
            ``torch.bfloat16`` with the penalty's bfloat16 GEMMs).
        method: ``"sweeps"`` (the GEMM sweeps above), ``"eigh"`` (M's exact
            eigendecomposition in ``V``'s dtype, then ``V Q``: the ``"running"`` mode's basis
            from float32 moments; on a CPU, where LAPACK's ``eigh`` of the ``N x N`` M costs
            less than the sweeps' eight GEMMs) or ``"auto"`` (``"eigh"`` on a CPU, else
            ``"sweeps"``: a GPU's ``eigh`` is latency-bound, its GEMMs are not).
        backend: the sweeps' block eigendecompositions (:func:`~powerlaw_fast.ops.block_eigh.
            block_eigh`): "auto" (the Triton Jacobi kernel on a GPU, with no host
            synchronisation; ``torch.linalg.eigh`` in float64 otherwise), "torch" or "triton".

    Returns:
        ``(V_new [N, N]`` in ``V``'s dtype, columns in about descending eigenvalue order,
        ``lam_new [N]`` float64).
    """
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    with torch.no_grad():
        work = V.dtype
        operands = operand_dtype or work
        rows = x.detach()
        B, N = rows.shape
        order = torch.argsort(lam, descending=True, stable=True)
        V, lam = V[:, order], lam[order]
        # the mean of the global batch first, so that each rank centres by the same vector
        total = torch.cat([rows.sum(0, dtype=work), rows.new_full((1,), B, dtype=work)])
        total = _all_reduce(total, group)
        count = total[N]
        centred = (rows.to(work) - total[:N] / count).to(operands)
        Z = centred @ V.to(operands)
        M = _all_reduce(symmetric_gram(Z).to(work), group).mul_(momentum / (count - 1))
        M.diagonal().add_(lam.to(work), alpha=1.0 - momentum)

        if method == "auto":
            method = CPU_METHOD if M.device.type == "cpu" else "sweeps"
        if method == "eigh":
            values, Q = torch.linalg.eigh(M)
            V, lam_new = V @ Q.flip(1), values.flip(0)
        else:
            V, lam_new = _sweeps(M, V, N, step, backend)
            if (step + 1) % ORTHONORMALISE_EVERY == 0:
                V = newton_schulz_step(V)
        if group is not None and (step + 1) % ORTHONORMALISE_EVERY == 0:
            # every rank computed the same; rank 0's, lest rounding ever set them apart
            from powerlaw_fast.training._refresh import broadcast_from_first_rank

            broadcast_from_first_rank(group, V, lam_new)
        return V, lam_new.to(torch.float64)


def _sweeps(M: torch.Tensor, V: torch.Tensor, N: int, step: int, backend: str = "auto"):
    """The block and first-order sweeps of the module docstring: ``(V_new, lam_new)``."""
    half = BLOCK // 2 if N > BLOCK else 0  # N <= BLOCK: one block, an exact sweep
    for sweep in range(SWEEPS):
        blocks = _Blocks.get(N, half * ((step + sweep) % 2), M.device)
        M, V = _block_sweep(M, V, blocks, backend)
        theta = _first_order_angles(M, blocks)
        rotation = torch.addmm(theta, theta, theta, alpha=0.5)
        rotation.diagonal().add_(1.0)
        if sweep + 1 < SWEEPS:
            rotation = newton_schulz_step(rotation)
        V = V @ rotation
        if sweep + 1 < SWEEPS:
            M = rotation.T @ (M @ rotation)
    # M's Rayleigh quotients for e_j + theta[:, j] (the last rotation), to second order
    d = M.diagonal()
    norm2 = 1.0 + (theta * theta).sum(0)
    lam_new = (d + (2.0 * theta * M + theta * theta * d[:, None]).sum(0)) / norm2
    return V / torch.linalg.vector_norm(V, dim=0), lam_new


def symmetric_gram(Z: torch.Tensor) -> torch.Tensor:
    """``Z^T Z [N, N]`` for ``Z [B, N]``, exactly symmetric, from its upper block triangle:
    ``GRAM_BLOCKS`` products of a block of columns with the columns from it on, each mirrored
    (``(k + 1) / (2 k)`` of a full GEMM's work).

    Example::

        >>> import torch
        >>> Z = torch.randn(30, 10)
        >>> G = symmetric_gram(Z)
        >>> bool(torch.equal(G, G.T)) and bool(torch.allclose(G, Z.T @ Z, atol=1e-5))
        True
    """
    N = Z.shape[1]
    gram = Z.new_empty(N, N)
    width = -(-N // GRAM_BLOCKS)
    for start in range(0, N, width):
        end = min(start + width, N)
        upper = Z[:, start:end].T @ Z[:, start:]  # [end - start, N - start]
        gram[start:end, end:] = upper[:, end - start :]
        gram[end:, start:end] = upper[:, end - start :].T
        # a GEMM's diagonal block is symmetric only up to its summation order
        diagonal = upper[:, : end - start]
        gram[start:end, start:end] = diagonal.triu() + diagonal.triu(1).T
    return gram


def newton_schulz_step(V: torch.Tensor) -> torch.Tensor:
    """One step of the Newton-Schulz iteration for the polar factor, ``V (3 I - V^T V) / 2``:
    squares the distance of ``V^T V`` from the identity (for ``||V^T V - I|| < 1``)."""
    gram = V.T @ V
    gram.mul_(-0.5).diagonal().add_(1.5)
    return V @ gram


class TrackedBasis:
    """The tracking state beside the basis store (which holds ``V`` and the eigenvalues): the
    momentum and the number of steps taken (which places the blocks and the Newton-Schulz
    steps, so a resumed run continues exactly)."""

    def __init__(self, momentum: float, method: str = "auto") -> None:
        self.momentum = momentum
        self.method = method
        self.steps = 0

    def step(self, batches: Mapping[str, torch.Tensor], basis: Mapping[str, torch.Tensor],
             values: Mapping[str, torch.Tensor], group,
             operand_dtype: torch.dtype | None = None) -> tuple[dict, dict]:  # fmt: skip
        """Each layer's ``(V, lam)`` after its batch ``[B, N]``. With ``basis`` empty (no
        refresh yet), V and lam come from the first batch's covariance instead (float64,
        an exact eigendecomposition, as the ``"running"`` mode's first step)."""
        from powerlaw_fast.training._refresh import eigenbases

        if not basis:
            covariances = {}
            for name, x in batches.items():
                accumulator = CovarianceAccumulator(x.shape[1], device=x.device)
                try:
                    accumulator.update(x.detach())
                except ValueError as err:
                    raise ValueError(f"layer {name!r}: {err}") from None
                if group is not None:
                    accumulator.all_reduce(group)
                covariances[name] = accumulator.covariance()
            self.steps += 1
            return eigenbases(covariances, group)
        new_basis, new_values = {}, {}
        for name, x in batches.items():
            new_basis[name], new_values[name] = track_eigenbasis(
                basis[name], values[name], x, momentum=self.momentum, step=self.steps,
                group=group, operand_dtype=operand_dtype, method=self.method,
            )  # fmt: skip
        self.steps += 1
        return new_basis, new_values

    def state(self) -> dict:
        return {"tracked_steps": self.steps}

    def load(self, state: Mapping) -> None:
        steps = state.get("tracked_steps", 0)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"state: expected 'tracked_steps' a count >= 0, got {steps!r}")
        self.steps = steps
