"""Where the op tests run and how close they must come: one place for both.

``DEVICE`` is CUDA when a GPU is present (Triton kernels compiled for real), else the CPU with
Triton's interpreter (set in conftest.py before triton is imported). ``BACKENDS`` are the
backends that can run on that device. Tolerances are relative errors against a float64
evaluation of the paper's formula on the *same rounded inputs*, per dtype and precision.
"""

from __future__ import annotations

import torch

from powerlaw_fast._backend import triton_available

DEVICE = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _backends() -> list[str]:
    names = ["torch"]
    if triton_available():
        names.append("triton")
    if DEVICE.type == "cuda":
        from powerlaw_fast.cuda import cupy_available

        if cupy_available():
            names.append("cuda")
    return names


BACKENDS = _backends()

# (value, gradient) relative tolerance per dtype at exact float32 ("highest") products
TOL = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (2e-4, 2e-4),
    torch.float16: (2e-2, 2e-2),
    torch.bfloat16: (8e-2, 1.5e-1),
}
# TF32 ("high"): no worse than twice the torch backend's own error, or this floor. The gradient
# of eq. (2) jumps by beta / (N gam_n) where r_n crosses 1 (the max(0, r - 1) term), so TF32's
# ~1e-3 spectral error can move a few terms across that kink: the gradient floor is wider.
TF32_FLOOR = (1e-2, 3e-2)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def within_tf32_rule(err: float, torch_err: float, floor: float) -> bool:
    return err <= max(2.0 * torch_err, floor)


def skip_unsupported(backend: str, dtype: torch.dtype) -> None:
    import pytest

    if backend in ("triton", "cuda") and dtype == torch.float64:
        pytest.skip("float64 runs on the torch backend")


def value_and_grad(fn, x, *args, **kwargs):
    """Evaluate ``fn(x, ...)`` and its gradient w.r.t. x (as float64), without touching x."""
    leaf = x.detach().requires_grad_(True)  # keeps x's strides (non-contiguous stays so)
    value = fn(leaf, *args, **kwargs)
    (grad,) = torch.autograd.grad(value, leaf)
    return value.detach().double(), grad.double()
