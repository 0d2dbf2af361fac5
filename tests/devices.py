"""Where the op tests run, and how each device reports validation errors.

``DEVICE`` is CUDA when a GPU is present (Triton kernels compiled for real), else the CPU with
Triton's interpreter (set in conftest.py before triton is imported). ``BACKENDS`` are the
backends that can run on that device. How close a result must come is not here: every numeric
test compares with the float64 oracle (tests/oracle.py) within the bound of the quantity's
rounding (tests/bounds.py), through tests/ops/oracle_checks.py.
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


# --------------------------------------------------------------------------------------------
# Validation errors as each device reports them
# --------------------------------------------------------------------------------------------
DEFERRAL_PATHS = ["device", "deferred"]  # the device's own path; the GPU's deferred path


def deferral_context(path: str):
    """``"device"``: errors as this device reports them (at once on a CPU, deferred on a GPU);
    ``"deferred"``: the GPU's deferred control path, also on a CPU (the same host copy, queue
    and raise at a later call)."""
    import contextlib

    from powerlaw_fast.ops import status

    if path == "deferred" and DEVICE.type != "cuda":
        return status.simulate_deferral(0)
    return contextlib.nullcontext()


def errors_are_deferred() -> bool:
    from powerlaw_fast.ops import status

    return DEVICE.type == "cuda" or status._state["simulated_delay"] is not None


def raises_validation(match: str):
    """Expect the ValueError of a validated op under the default ``validate="deferred"``: from
    the call itself where errors are immediate (CPU tensors), and, where the device defers
    them, from the next call of the package (here :func:`raise_pending_errors`), naming the
    call it came from. Use as ``with raises_validation("..."): op(...)``."""
    import contextlib

    import pytest

    from powerlaw_fast import raise_pending_errors
    from powerlaw_fast.ops.status import DeferredValidationError

    if not errors_are_deferred():
        return pytest.raises(ValueError, match=match)

    @contextlib.contextmanager
    def deferred():
        yield  # the bad call returns normally
        with pytest.raises(DeferredValidationError, match=match) as info:
            raise_pending_errors()
        assert "found by the deferred check of call #" in str(info.value)

    return deferred()
