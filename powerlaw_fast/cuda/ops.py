"""Launchers of the CUDA C++ kernels (csrc/*.cu) and the ops composed from them and cuBLAS.

Host logic only: dtype -> kernel instance, strides, grids, output buffers. Tensors are passed
to the kernels as raw pointers (zero copy) with their strides, and every launch goes on torch's
current stream, so these ops order correctly with the surrounding torch work and never
synchronise with the host. The GEMMs are torch.matmul / torch.mm (cuBLAS), so they follow
``torch.get_float32_matmul_precision()`` (TF32 or not) and torch's reduced-precision flags.

Shapes and dtypes: ``x``, ``z`` ``[B, N]`` and ``V`` ``[N, N]`` in float32, float16 or bfloat16
(any strides); spectra, means and coefficients are float32 ``[N]``.

float16 / bfloat16 (the choice for the forward GEMM): ``Z = (x - mu) V`` is computed by cuBLAS
with float32 accumulation and float32 output (``torch.mm(..., out_dtype=torch.float32)``); the
spectrum is the sum of squares of that unrounded Z, and one fused pass also writes Z rounded to
x's dtype for the backward. This is the plain-torch reference's rounding (the spectrum from the
float32 product, Z kept in x's dtype) at the price of a float32 Z buffer. Where torch lacks
``mm(..., out_dtype=)`` the GEMM writes x's dtype and the spectrum is summed from the rounded Z
(relative error about one unit of x's dtype per element, averaging out over the batch).

Example (needs a CUDA device and CuPy)::

    >>> import torch
    >>> from powerlaw_fast.cuda import batch_covariance_cuda, projected_spectrum_cuda
    >>> x = torch.randn(300, 64, device="cuda")
    >>> V = torch.linalg.eigh(torch.cov(x.T))[1]
    >>> lam, z = projected_spectrum_cuda(x, V)       # lam [64] float32, z [300, 64]
    >>> sigma = batch_covariance_cuda(x)              # [64, 64] float32
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from powerlaw_fast.cuda import _loader
from powerlaw_fast.cuda._requirements import SUPPORTED_DTYPES
from powerlaw_fast.ops import _alloc

# Launch geometry; the kernels' __launch_bounds__ and shared arrays assume exactly these.
REDUCE_BLOCK = (32, 8, 1)  # csrc/column_reduce.cu: kReduceCols x kReduceRowLanes
COLUMN_THREADS = 256  # csrc/column_scale.cu, csrc/pgd_update.cu: kColumnThreads, kPgdThreads
PENALTY_THREADS = 1024  # csrc/powerlaw_penalty.cu: kPenaltyThreads
FINALIZE_THREADS = 256
ROWS_PER_CHUNK = 512  # rows summed by one block of column_reduce before the ordered finalize
MAX_GRID_Y = 65535


@dataclass(frozen=True)
class KernelSpec:
    """One kernel family: its file, C name prefix, argument kinds and dtype instances.

    ``signature`` has one letter per C parameter: ``p`` pointer (a tensor, or None for null),
    ``q`` long long, ``f`` float, ``i`` int. tests/cuda/test_compile.py checks it against the
    parameters nvcc reports for every instance, so a mismatch fails on a CPU-only machine.
    """

    file: str
    name: str
    signature: str
    suffixes: tuple[str, ...] = ()

    def instance(self, suffix: str | None = None) -> str:
        return self.name if suffix is None else f"{self.name}_{suffix}"

    def instances(self) -> list[str]:
        return [self.instance(s) for s in self.suffixes] if self.suffixes else [self.name]


_DTYPES = ("f32", "f16", "bf16")
COLUMN_SUM = KernelSpec("column_reduce.cu", "column_sum", "pqqqqqfp", _DTYPES)
COLUMN_SUMSQ = KernelSpec("column_reduce.cu", "column_sumsq", "pqqqqqfp", _DTYPES)
COLUMN_SUMSQ_COPY = KernelSpec(
    "column_reduce.cu", "column_sumsq_f32_copy", "pqqqqqfppqq", ("f16", "bf16")
)
COLUMN_FINALIZE = KernelSpec("column_reduce.cu", "column_finalize", "pqqfp")
CENTRE_COLUMNS = KernelSpec("column_scale.cu", "centre_columns", "pqqpqqpqq", _DTYPES)
SCALE_COLUMNS = KernelSpec("column_scale.cu", "scale_columns", "pqqpqfqqpqq", _DTYPES)
POWERLAW_PENALTY = KernelSpec("powerlaw_penalty.cu", "powerlaw_penalty", "ppqqfffffippp")
PGD_UPDATE = KernelSpec("pgd_update.cu", "pgd_update", "pqqqpqqqpqqqpqpqqqqfff", _DTYPES)
KERNELS = (
    COLUMN_SUM, COLUMN_SUMSQ, COLUMN_SUMSQ_COPY, COLUMN_FINALIZE,
    CENTRE_COLUMNS, SCALE_COLUMNS, POWERLAW_PENALTY, PGD_UPDATE,
)  # fmt: skip

_PACK = {
    "p": lambda v: np.uint64(0 if v is None else v.data_ptr()),
    "q": np.int64,
    "f": np.float32,
    "i": np.int32,
}


def pack_args(signature: str, args: tuple) -> tuple:
    """Convert Python values to the exact C types of ``signature`` (see :class:`KernelSpec`)."""
    if len(args) != len(signature):
        raise TypeError(f"kernel expects {len(signature)} arguments ({signature}), got {len(args)}")
    for kind, value in zip(signature, args, strict=True):
        if kind == "p" and value is not None and not isinstance(value, torch.Tensor):
            raise TypeError(f"kernel pointer argument: expected a tensor or None, got {value!r}")
    return tuple(_PACK[kind](value) for kind, value in zip(signature, args, strict=True))


def run(spec: KernelSpec, suffix: str | None, device_tensor, grid, block, *args) -> None:
    """Launch one instance of ``spec`` on ``device_tensor``'s device and current stream."""
    fn = _loader.kernel(spec.file, spec.instance(suffix))
    _loader.launch(device_tensor, fn, grid, block, pack_args(spec.signature, args))


# --------------------------------------------------------------------------------------------
# Host-side checks: a wrong pointer would not fail loudly, so the launchers check cheaply.
# --------------------------------------------------------------------------------------------
def _suffix(t: torch.Tensor, name: str) -> str:
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name}: backend='cuda' expects float32, float16 or bfloat16, got {t.dtype}"
        )
    return _loader.DTYPE_SUFFIX[t.dtype]


def _check_cuda(device: torch.device, **tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if t.device.type != "cuda" or t.device != device:
            raise ValueError(
                f"{name}: backend='cuda' expects a tensor on {device} (the device of the first "
                f"input), got one on {t.device}"
            )


def _check_matrix(t: torch.Tensor, name: str) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D tensor, got shape {tuple(t.shape)}")


# --------------------------------------------------------------------------------------------
# Kernel launchers
# --------------------------------------------------------------------------------------------
def _column_block(n_cols: int) -> tuple[int, int, int]:
    """(bx, by, 1): bx columns (a power of two in 32..256) times by rows = 256 threads."""
    bx = min(COLUMN_THREADS, max(32, 1 << max(0, n_cols - 1).bit_length()))
    return bx, COLUMN_THREADS // bx, 1


def _column_grid(n_rows: int, n_cols: int, block) -> tuple[int, int, int]:
    return math.ceil(n_cols / block[0]), min(MAX_GRID_Y, math.ceil(n_rows / block[1])), 1


def column_reduce_cuda(
    x: torch.Tensor, *, square: bool, scale: float, copy: torch.Tensor | None = None
) -> torch.Tensor:
    """``scale * sum_b f(x[b, n])`` as float32 ``[N]``, f = identity or square; deterministic.

    ``copy`` (float32 x only): a float16/bfloat16 ``[B, N]`` that also receives x rounded.
    """
    B, N = x.shape
    rows_per_chunk = max(ROWS_PER_CHUNK, math.ceil(B / MAX_GRID_Y))
    chunks = math.ceil(B / rows_per_chunk)
    out = _alloc.empty((N,), device=x.device, dtype=torch.float32)
    target = out if chunks == 1 else _alloc.empty((chunks, N), device=x.device, dtype=torch.float32)
    grid = (math.ceil(N / REDUCE_BLOCK[0]), chunks, 1)
    first_scale = scale if chunks == 1 else 1.0  # with several chunks, finalize scales the total
    common = (x, x.stride(0), x.stride(1), B, N, rows_per_chunk, first_scale, target)
    if copy is not None:
        if x.dtype != torch.float32 or copy.shape != x.shape:
            raise ValueError("copy: expected a [B, N] 16-bit destination for a float32 x")
        run(COLUMN_SUMSQ_COPY, _suffix(copy, "copy"), x, grid, REDUCE_BLOCK,
            *common, copy, copy.stride(0), copy.stride(1))  # fmt: skip
    else:
        spec = COLUMN_SUMSQ if square else COLUMN_SUM
        run(spec, _suffix(x, "x"), x, grid, REDUCE_BLOCK, *common)
    if chunks > 1:
        run(COLUMN_FINALIZE, None, x, (math.ceil(N / FINALIZE_THREADS), 1, 1),
            (FINALIZE_THREADS, 1, 1), target, chunks, N, scale, out)  # fmt: skip
    return out


def column_mean_cuda(x: torch.Tensor) -> torch.Tensor:
    """float32 column means ``[N]`` of ``x [B, N]`` (any strides), deterministic."""
    _check_matrix(x, "x")
    _check_cuda(x.device, x=x)
    return column_reduce_cuda(x, square=False, scale=1.0 / x.shape[0])


def centre_columns_cuda(x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """``(x - mean)`` computed in float32, rounded to x's dtype, contiguous ``[B, N]``."""
    B, N = x.shape
    out = _alloc.empty((B, N), device=x.device, dtype=x.dtype)
    block = _column_block(N)
    run(CENTRE_COLUMNS, _suffix(x, "x"), x, _column_grid(B, N, block), block,
        x, x.stride(0), x.stride(1), mean, B, N, out, out.stride(0), out.stride(1))  # fmt: skip
    return out


def scale_columns_cuda(z: torch.Tensor, coef: torch.Tensor, scale: float) -> torch.Tensor:
    """``z * (coef * scale)`` computed in float32, rounded to z's dtype, contiguous ``[B, N]``."""
    B, N = z.shape
    out = _alloc.empty((B, N), device=z.device, dtype=z.dtype)
    block = _column_block(N)
    run(SCALE_COLUMNS, _suffix(z, "z"), z, _column_grid(B, N, block), block,
        z, z.stride(0), z.stride(1), coef, coef.stride(0), scale, B, N,
        out, out.stride(0), out.stride(1))  # fmt: skip
    return out


def _float32_vector(v: torch.Tensor) -> torch.Tensor:
    return v.to(torch.float32).contiguous()


# torch >= 2.8 has mm(a, b, out_dtype=torch.float32) for 16-bit a, b on CUDA (cuBLAS, float32
# accumulation and output); older torch falls back (see the module docstring).
_mm_out_dtype_ok = "dtype" in torch.ops.aten.mm.overloads()


def _mm_float32_out(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """``a @ b`` accumulated and written in float32 for 16-bit a, b; None if torch cannot."""
    global _mm_out_dtype_ok
    if _mm_out_dtype_ok:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except torch.cuda.OutOfMemoryError:
            raise
        except (RuntimeError, NotImplementedError):
            _mm_out_dtype_ok = False  # the overload exists but has no CUDA kernel here
    return None


# --------------------------------------------------------------------------------------------
# Ops called by powerlaw_fast.ops.* with backend="cuda" (same signatures as the Triton ones)
# --------------------------------------------------------------------------------------------
def centred_projection_cuda(
    x: torch.Tensor, V: torch.Tensor, mean: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [B, N]`` (any strides), ``V [N, N]``, ``mean [N]`` float32 (the local or global
    column means) -> ``(sumsq [N] float32, Z [B, N] in x's dtype)``, ``Z = (x - mean) V`` and
    ``sumsq[n] = sum_b Z[b, n]^2`` (not yet divided by B - 1).

    Centring kernel, one cuBLAS GEMM, column sum-of-squares kernel (deterministic); see the
    module docstring for float16 / bfloat16.
    """
    _check_matrix(x, "x")
    _check_cuda(x.device, x=x, V=V, mean=mean)
    B, N = x.shape
    centred = centre_columns_cuda(x, _float32_vector(mean))
    if x.dtype == torch.float32:
        z = torch.matmul(centred, V)
        return column_reduce_cuda(z, square=True, scale=1.0), z
    z32 = _mm_float32_out(centred, V)
    if z32 is None:
        z = torch.matmul(centred, V)
        return column_reduce_cuda(z, square=True, scale=1.0), z
    z = _alloc.empty((B, N), device=x.device, dtype=x.dtype)
    return column_reduce_cuda(z32, square=True, scale=1.0, copy=z), z


def centred_moments_cuda(
    x: torch.Tensor, V: torch.Tensor, mean: torch.Tensor, operand: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``centred_projection`` stage of the CUDA row (registered by
    :mod:`powerlaw_fast.ops.spectral_penalty`): ``x [B, N]``, ``V [N, N]``, ``mean [N]``
    float32, the GEMM operand dtype -> (``[2, 1, N]`` column sums of Z and Z * Z, ``Z``).

    The centring kernel (plain torch when the operand is not x's dtype), one cuBLAS GEMM, the
    two column-reduction kernels.
    """
    _check_matrix(x, "x")
    _check_cuda(x.device, x=x, V=V, mean=mean)
    if operand == x.dtype:
        centred = centre_columns_cuda(x, _float32_vector(mean))
    else:  # rounded once from float32, as the torch twin does
        centred = (x.float() - mean).to(operand).contiguous()
    z = torch.mm(centred, V.to(operand))
    sums = column_reduce_cuda(z, square=False, scale=1.0)
    sumsq = column_reduce_cuda(z, square=True, scale=1.0)
    return torch.stack([sums, sumsq]).unsqueeze(1), z


def projected_spectrum_cuda(x: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [B, N]``, ``V [N, N]`` -> ``lam [N]`` float32 (``||(x - mu) V[:, n]||^2 / (B - 1)``)
    and ``Z [B, N]`` in x's dtype: column-mean kernel, then :func:`centred_projection_cuda`."""
    sumsq, z = centred_projection_cuda(x, V, column_mean_cuda(x))
    return sumsq / (x.shape[0] - 1), z


def spectrum_backward_cuda(
    coef: torch.Tensor, z: torch.Tensor, V: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """``grad_x [B, N] = scale (Z * coef) V^T`` in z's dtype; ``coef [N]`` = dLoss/dlam and
    ``scale = 2 / (B - 1)`` by default (the global count with a process group).

    Scaling kernel (float32, rounded once to z's dtype) then one cuBLAS GEMM.
    """
    _check_matrix(z, "z")
    _check_cuda(z.device, z=z, coef=coef, V=V)
    if scale is None:
        scale = 2.0 / (z.shape[0] - 1)
    scaled = scale_columns_cuda(z, _float32_vector(coef), scale)
    return torch.matmul(scaled, V.T)


def powerlaw_penalty_cuda(
    lam: torch.Tensor, alpha: float, anchor: int, beta: float, skip_nonpositive: bool,
    tiny: float = 0.0, kink_tol: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """``lam [N]`` float32 -> (penalty [] float32, dR/dlam [N] float32, status int32 [2]).

    ``status = [number of non-finite values, anchor code]`` with the anchor code of the Triton
    kernel (1: the anchor is at most ``tiny`` times the spectrum's mean; 2: the spectrum
    underflows float32); ``kink_tol``: the relu's rounding band. Read the status on the host
    only when validating (it costs a synchronisation).
    """
    _check_cuda(lam.device, lam=lam)
    if lam.dim() != 1 or lam.dtype != torch.float32:
        raise TypeError(
            f"lam: backend='cuda' expects a 1-D float32 spectrum, got {lam.dtype} with shape "
            f"{tuple(lam.shape)}"
        )
    (N,) = lam.shape
    if not 0 <= anchor < N:
        raise ValueError(f"anchor: expected 0 <= anchor < N = {N}, got {anchor}")
    ordered, order = torch.sort(lam, descending=True, stable=True)
    penalty = _alloc.empty((), device=lam.device, dtype=torch.float32)
    grad = _alloc.empty((N,), device=lam.device, dtype=torch.float32)
    status = _alloc.empty((2,), device=lam.device, dtype=torch.int32)
    underflow = torch.finfo(torch.float32).tiny / torch.finfo(torch.float32).eps
    run(POWERLAW_PENALTY, None, lam, (1, 1, 1), (PENALTY_THREADS, 1, 1),
        ordered.contiguous(), order.contiguous(), N, anchor, alpha, beta, tiny, kink_tol,
        underflow, int(bool(skip_nonpositive)), penalty, grad, status)  # fmt: skip
    return penalty, grad, status


def centred_gram_cuda(x: torch.Tensor, mean: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale (x - mean)^T (x - mean)`` for ``x [B, N]`` (any strides; float32, float16,
    bfloat16) and ``mean [N]`` float32 -> float32 ``[N, N]``.

    Centring kernel (centred batch rounded to x's dtype, as the reference), then one cuBLAS
    GEMM accumulating in float32.
    """
    _check_matrix(x, "x")
    _check_cuda(x.device, x=x, mean=mean)
    centred = centre_columns_cuda(x, _float32_vector(mean))
    if x.dtype == torch.float32:
        gram = torch.mm(centred.T, centred)
    else:
        gram = _mm_float32_out(centred.T, centred)
        if gram is None:
            gram = torch.mm(centred.T.float(), centred.float())
    return gram.mul_(scale)


def batch_covariance_cuda(x: torch.Tensor) -> torch.Tensor:
    """``x [B, N]`` (any strides) -> float32 ``[N, N]`` = (x - mu)^T (x - mu) / (B - 1)."""
    return centred_gram_cuda(x, column_mean_cuda(x), 1.0 / (x.shape[0] - 1))


def pgd_update_cuda(
    x_adv: torch.Tensor,
    x_nat: torch.Tensor,
    grad: torch.Tensor,
    eps_rows: torch.Tensor,
    step_size: float,
    lo: float,
    hi: float,
    out: torch.Tensor,
) -> torch.Tensor:
    """One fused PGD step into ``out [R, D]`` (see powerlaw_fast.ops.attack_step.pgd_update).

    ``x_adv``, ``x_nat``, ``grad``: ``[S, D]`` with S dividing R (row r reads row r % S);
    ``eps_rows [R]`` (float32); ``out`` may be ``x_adv`` itself (in place). Returns ``out``.
    """
    for t, name in ((x_adv, "x_adv"), (x_nat, "x_nat"), (grad, "grad"), (out, "out")):
        _check_matrix(t, name)
    _check_cuda(out.device, x_adv=x_adv, x_nat=x_nat, grad=grad, eps_rows=eps_rows, out=out)
    suffix = _suffix(out, "out")
    for t, name in ((x_adv, "x_adv"), (x_nat, "x_nat"), (grad, "grad")):
        if t.dtype != out.dtype:
            raise TypeError(f"{name}: expected dtype {out.dtype} (the dtype of out), got {t.dtype}")
    R, D = out.shape
    if R >= 2**31:
        raise ValueError(f"out: expected fewer than 2**31 rows, got R = {R}")
    if out.numel() == 0:
        return out
    eps_rows = eps_rows.to(torch.float32)
    block = _column_block(D)
    run(PGD_UPDATE, suffix, out, _column_grid(R, D, block), block,
        x_adv, x_adv.stride(0), x_adv.stride(1), x_adv.shape[0],
        x_nat, x_nat.stride(0), x_nat.stride(1), x_nat.shape[0],
        grad, grad.stride(0), grad.stride(1), grad.shape[0],
        eps_rows, eps_rows.stride(0), out, out.stride(0), out.stride(1),
        R, D, step_size, lo, hi)  # fmt: skip
    return out
