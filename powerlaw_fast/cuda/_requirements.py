"""What the CUDA C++ backend needs, and the errors that say which piece is missing."""

from __future__ import annotations

import functools

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INSTALL_HINT = (
    "pip install powerlaw-fast[cuda12] (CUDA 12) or powerlaw-fast[cuda13] (CUDA 13), "
    "which installs CuPy"
)


class CudaBackendUnavailable(ValueError):
    """backend='cuda' cannot run here (no CUDA tensors, no CUDA device, or no kernel sources)."""


class CupyNotInstalled(CudaBackendUnavailable, ImportError):
    """CuPy, which compiles and launches the CUDA C++ kernels, cannot be imported.

    Both a ValueError (like every other backend error) and an ImportError.
    """


@functools.cache
def cupy_import_error() -> str | None:
    """None when ``import cupy`` works, else the reason it fails (cached)."""
    try:
        import cupy  # noqa: F401
    except Exception as err:  # ImportError, or a CuPy built for another CUDA failing to load
        return f"{type(err).__name__}: {err}"
    return None


def cupy_available() -> bool:
    return cupy_import_error() is None


def require_cuda_backend(device: torch.device, dtype: torch.dtype | None = None) -> None:
    """Raise a clear error unless the CUDA C++ backend can run on ``device`` / ``dtype``.

    Checks, in order: tensors on a CUDA device, a CUDA device visible to torch, a supported
    dtype (float32, float16, bfloat16; TypeError for others), CuPy importable, and the kernel
    sources present. Compiles nothing.

    Example::

        >>> import torch
        >>> from powerlaw_fast.cuda import require_cuda_backend
        >>> try:
        ...     require_cuda_backend(torch.device("cpu"), torch.float32)
        ... except ValueError as err:
        ...     print(str(err).split(";")[0])
        backend='cuda': expected CUDA tensors, got tensors on cpu
    """
    device = torch.device(device)
    if device.type != "cuda":
        extra = "" if cupy_available() else f" (CuPy is not installed either: {INSTALL_HINT})"
        raise CudaBackendUnavailable(
            f"backend='cuda': expected CUDA tensors, got tensors on {device}; "
            f"use backend='torch' on the CPU{extra}"
        )
    if not torch.cuda.is_available():
        raise CudaBackendUnavailable(
            "backend='cuda': no CUDA device is visible to torch (torch.cuda.is_available() is "
            f"False; torch {torch.__version__} built for CUDA {torch.version.cuda})"
        )
    if dtype is not None and dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"backend='cuda': expected float32, float16 or bfloat16 tensors, got {dtype}; "
            f"use backend='torch' for float64"
        )
    reason = cupy_import_error()
    if reason is not None:
        raise CupyNotInstalled(
            f"backend='cuda': needs CuPy to compile and launch its kernels, and `import cupy` "
            f"failed ({reason}); {INSTALL_HINT}"
        )
    from powerlaw_fast.cuda._loader import source_dir

    try:
        source_dir()
    except FileNotFoundError as err:
        raise CudaBackendUnavailable(str(err)) from None
