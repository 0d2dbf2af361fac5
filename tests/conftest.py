"""Test configuration: without CUDA, Triton kernels run under its CPU interpreter.

TRITON_INTERPRET must be set before triton is first imported, so this runs before any test
module imports powerlaw_fast.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(params=[0], autouse=False)
def seeded():
    torch.manual_seed(0)
    yield


@pytest.fixture
def device():
    """CUDA when present, else the CPU (Triton kernels then run under the interpreter)."""
    from tests.devices import DEVICE

    return DEVICE


@pytest.fixture
def poisoned(monkeypatch):
    """Every buffer a launcher allocates starts as NaN (floats) or -7 (integers): a kernel that
    leaves any element unwritten fails the test."""
    from powerlaw_fast.ops import _alloc

    def nan_empty(shape, *, device, dtype):
        t = torch.empty(shape, device=device, dtype=dtype)
        return t.fill_(float("nan") if dtype.is_floating_point else -7)

    monkeypatch.setattr(_alloc, "empty", nan_empty)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
