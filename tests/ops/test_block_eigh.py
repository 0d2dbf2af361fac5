"""block_eigh: batched eigendecompositions of small symmetric matrices, the Triton Jacobi kernel
and its twin (torch.linalg.eigh) against float64 LAPACK."""

from __future__ import annotations

import pytest
import torch

from powerlaw_fast.ops import block_eigh as module
from powerlaw_fast.ops.block_eigh import JACOBI_SWEEPS, block_eigh
from tests.devices import BACKENDS, DEVICE

ROWS = [b for b in BACKENDS if b in ("torch", "triton")]
EPS32 = torch.finfo(torch.float32).eps


def _bound(b: int) -> float:
    """Error in units of ||A||_max after the Triton row's Jacobi: each round is two dots whose
    output entries each sum two nonzero products (J has two entries per row), so a round moves
    an entry by at most about 4 eps ||A||; ``sweeps * (size - 1)`` rounds add linearly. LAPACK's
    float32 eigh is far inside this (backward stable: about b eps)."""
    size = max(16, 1 << (b - 1).bit_length())
    return 4 * JACOBI_SWEEPS * (size - 1) * EPS32


def _check(A: torch.Tensor, values: torch.Tensor, vectors: torch.Tensor) -> None:
    exact = torch.linalg.eigvalsh(A.double())
    scale = float(A.abs().amax())
    bound = _bound(A.shape[1]) * scale
    assert values.dtype == A.dtype and vectors.dtype == A.dtype
    assert float((values.double() - exact).abs().max()) <= bound
    Q = vectors.double()
    eye = torch.eye(A.shape[1], dtype=torch.float64, device=A.device)
    assert float((Q.mT @ Q - eye).abs().max()) <= _bound(A.shape[1])
    residual = A.double() @ Q - Q * values.double()[:, None, :]
    assert float(residual.abs().max()) <= bound


@pytest.mark.parametrize("backend", ROWS)
@pytest.mark.parametrize("b", [1, 2, 5, 13])
def test_small_and_ragged_blocks_against_float64(poisoned, backend, b):
    torch.manual_seed(b)
    A = torch.randn(3, b, b, device=DEVICE)
    A = A + A.mT  # indefinite: the padding must sit below negative eigenvalues too
    _check(A, *block_eigh(A, backend=backend))


@pytest.mark.parametrize("backend", ROWS)
def test_a_dense_full_block_converges(backend):
    """A random dense 64 x 64 matrix, the farthest from diagonal the kernel meets: JACOBI_SWEEPS
    sweeps reach the rounding bound (four sweeps leave an error of about 5e-3 of the largest
    eigenvalue, which fails it)."""
    torch.manual_seed(0)
    A = torch.randn(1, 64, 64, device=DEVICE)
    _check(A + A.mT, *block_eigh(A + A.mT, backend=backend))


@pytest.mark.parametrize("backend", ROWS)
def test_ties_and_a_nearly_diagonal_block(backend):
    """What the tracked basis hands it: nearly diagonal, with eigenvalues that tie."""
    torch.manual_seed(1)
    d = torch.tensor([5.0, 3.0, 3.0, 3.0, 1.0, 1.0, 0.5, 0.0], device=DEVICE)
    noise = 1e-3 * torch.randn(2, 8, 8, device=DEVICE)
    A = torch.diag_embed(d.expand(2, 8)) + noise + noise.mT
    _check(A, *block_eigh(A, backend=backend))
    D = torch.diag_embed(d.expand(1, 8)).contiguous()
    values, vectors = block_eigh(D, backend=backend)
    assert torch.equal(values, d.flip(0)[None])
    assert float((vectors.abs() - vectors.abs().round()).abs().max()) == 0.0  # a permutation


def test_float64_blocks_keep_their_dtype():
    A = torch.randn(2, 6, 6, dtype=torch.float64, device=DEVICE)
    A = A + A.mT
    for backend in ROWS:
        values, vectors = block_eigh(A, backend=backend)
        assert values.dtype == vectors.dtype == torch.float64
        _check(A, values, vectors)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match=r"A: expected \[K, b, b\] with 1 <= b <= 64, got shape"):
        block_eigh(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"got shape \(1, 3, 4\)"):
        block_eigh(torch.zeros(1, 3, 4))
    with pytest.raises(ValueError, match=r"got shape \(1, 65, 65\)"):
        block_eigh(torch.zeros(1, 65, 65))
    with pytest.raises(ValueError, match="backend: expected 'auto', 'torch' or 'triton'"):
        block_eigh(torch.zeros(1, 2, 2), backend="cuda")


def test_auto_is_the_kernel_on_a_gpu_and_lapack_on_a_cpu(monkeypatch):
    chosen = []
    monkeypatch.setattr(module, "implementation",
                        lambda stage, name: lambda A: chosen.append((stage, name)))  # fmt: skip
    block_eigh(torch.zeros(1, 2, 2))
    expected = [("block_eigh", "torch")]
    if torch.cuda.is_available():
        block_eigh(torch.zeros(1, 2, 2, device="cuda"))
        expected.append(("block_eigh", "triton"))
    assert chosen == expected
