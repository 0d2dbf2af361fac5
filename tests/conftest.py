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


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
