"""Every docstring example in the package runs as written (CUDA-only ones need a GPU)."""

import doctest
import importlib
import pkgutil

import pytest
import torch

import powerlaw_fast

CUDA_ONLY = {"powerlaw_fast.cuda", "powerlaw_fast.cuda.ops"}
MODULES = sorted(
    info.name
    for info in pkgutil.walk_packages(powerlaw_fast.__path__, prefix="powerlaw_fast.")
    if info.name != "powerlaw_fast.__main__"
)


@pytest.mark.parametrize("name", ["powerlaw_fast", *MODULES])
def test_docstring_examples(name):
    if name in CUDA_ONLY and not torch.cuda.is_available():
        pytest.skip("its examples need a CUDA device")
    module = importlib.import_module(name)
    torch.manual_seed(0)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
