"""Find the CUDA C++ sources, compile them with NVRTC through CuPy, launch on torch's stream.

Nothing here imports CuPy at module import time: ``import powerlaw_fast.cuda`` works on a
machine without CuPy or a GPU, and the first kernel call compiles its file (then cached).

Source lookup, first hit wins: ``$POWERLAW_FAST_CSRC``, ``powerlaw_fast/cuda/csrc`` (for an
installed wheel that ships the sources as package data), ``<repository>/csrc`` (a source
checkout or an editable install). ``#include "x.cuh"`` lines naming a file of that folder are
replaced by the file's text before compilation, so the text NVRTC sees is self-contained and
CuPy's on-disk kernel cache (keyed by the source text) notices edits to headers too.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

import torch

_INCLUDE = re.compile(r'^\s*#\s*include\s+"([A-Za-z0-9_.]+)"\s*$', re.MULTILINE)
NVRTC_OPTIONS = ("--std=c++17",)

# CUDA C++ suffix of each kernel instance, per torch dtype (csrc/common.cuh's storage types).
DTYPE_SUFFIX = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


def source_dirs() -> list[Path]:
    """Candidate folders holding ``*.cu`` / ``*.cuh``, in lookup order."""
    here = Path(__file__).resolve().parent
    dirs = []
    env = os.environ.get("POWERLAW_FAST_CSRC")
    if env:
        dirs.append(Path(env))
    dirs.append(here / "csrc")
    dirs.append(here.parent.parent / "csrc")
    return dirs


def source_dir() -> Path:
    """The folder the kernels are compiled from; FileNotFoundError naming every place looked in."""
    for folder in source_dirs():
        if (folder / "common.cuh").is_file():
            return folder
    looked = ", ".join(str(d) for d in source_dirs())
    raise FileNotFoundError(
        f"backend='cuda': the CUDA C++ sources (csrc/*.cu) were not found; looked in: {looked}. "
        f"Set POWERLAW_FAST_CSRC to the csrc folder of a powerlaw_fast checkout"
    )


def expand_includes(text: str, folder: Path, _seen: set[str] | None = None) -> str:
    """Paste local ``#include "x.cuh"`` files (recursively, each once) into ``text``."""
    seen = set() if _seen is None else _seen

    def paste(match: re.Match) -> str:
        name = match.group(1)
        path = folder / name
        if not path.is_file():
            return match.group(0)  # not ours: leave it for the compiler
        if name in seen:
            return f"// {name}: already included above"
        seen.add(name)
        return expand_includes(path.read_text(), folder, seen)

    return _INCLUDE.sub(paste, text)


def kernel_source(file_name: str) -> str:
    """The self-contained text NVRTC compiles for ``csrc/<file_name>``."""
    folder = source_dir()
    return expand_includes((folder / file_name).read_text(), folder)


@functools.cache
def _module(file_name: str):
    import cupy

    return cupy.RawModule(code=kernel_source(file_name), options=NVRTC_OPTIONS)


@functools.cache
def kernel(file_name: str, name: str):
    """``cupy.RawKernel`` for ``extern "C"`` kernel ``name`` of ``csrc/<file_name>``.

    Compiled by NVRTC for the current device's architecture at the first launch; CuPy keeps
    one loaded copy per device and caches the binary on disk (~/.cupy/kernel_cache).
    """
    return _module(file_name).get_function(name)


def launch(tensor: torch.Tensor, fn, grid: tuple, block: tuple, args: tuple) -> None:
    """Launch ``fn`` on ``tensor``'s device and on torch's current stream there (no sync)."""
    import cupy

    index = tensor.device.index if tensor.device.index is not None else torch.cuda.current_device()
    stream = torch.cuda.current_stream(index).cuda_stream
    with cupy.cuda.Device(index), cupy.cuda.ExternalStream(stream, index):
        fn(grid, block, args)
