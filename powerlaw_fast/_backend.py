"""Which implementation runs an op: plain torch, the Triton kernels or the CUDA C++ kernels.

``"auto"`` picks Triton for CUDA tensors when triton imports and torch otherwise, so the CPU
path (tests, the demo on a laptop) never pays for the Triton interpreter.
"""

from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("auto", "torch", "triton", "cuda")


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # triton missing or broken: the torch backend still works
        return False
    return True


def triton_interpreter_active() -> bool:
    """True when TRITON_INTERPRET=1, i.e. Triton kernels run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str, device: torch.device, *, dtype: torch.dtype | None = None) -> str:
    """Map a user's ``backend`` argument to ``"torch"``, ``"triton"`` or ``"cuda"``.

    Raises a ValueError that says what is missing when the requested backend cannot run on
    ``device`` (or ``dtype``).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda" and triton_available() and dtype != torch.float64:
            return "triton"
        return "torch"
    if backend == "triton":
        if not triton_available():
            raise ValueError("backend='triton': triton is not installed (pip install triton)")
        if device.type != "cuda" and not triton_interpreter_active():
            raise ValueError(
                f"backend='triton': expected CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 "
                f"set before triton is imported), got tensors on {device}"
            )
        if dtype == torch.float64:
            raise TypeError(
                "backend='triton': expected float32, float16 or bfloat16 tensors, got float64; "
                "use backend='torch' for float64"
            )
        return "triton"
    if backend == "cuda":
        from powerlaw_fast.cuda import require_cuda_backend

        require_cuda_backend(device, dtype)
        return "cuda"
    return "torch"


def tf32_allowed() -> bool:
    """Follow torch: "highest" means exact float32 products, "high"/"medium" allow TF32."""
    return torch.get_float32_matmul_precision() != "highest"
