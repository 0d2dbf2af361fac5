"""Every csrc/*.cu compiles for sm_90 with warnings as errors, and matches its Python launcher.

Runs wherever nvcc is found (no GPU needed). Checks:
- nvcc -arch=sm_90 -Werror all-warnings -c on each file (full device + host compile);
- the self-contained text the loader hands NVRTC (includes pasted in) compiles alone, with the
  options CuPy's RawModule adds (-ftz=true, --device-as-default-execution-space);
- every kernel instance the launchers name exists, with the parameter widths of its
  KernelSpec signature (a wrong argument list would otherwise only fail on a GPU);
- the PGD kernel has no flush-to-zero instruction even under -ftz=true (bitwise agreement
  with torch needs subnormals);
- optionally, NVRTC itself (libnvrtc, e.g. from the nvidia-cuda-nvrtc wheel) compiles each
  source without a warning: skipped when libnvrtc is not found.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import ctypes.util
import glob
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from powerlaw_fast.cuda import _loader
from powerlaw_fast.cuda.ops import KERNELS

NVCC = shutil.which("nvcc")
CSRC = Path(__file__).resolve().parents[2] / "csrc"
SOURCES = sorted(p.name for p in CSRC.glob("*.cu"))
ARCH = "sm_90"
# CuPy's RawModule compiles with these besides the caller's options (cupy/cuda/compiler.py);
# nvcc knows only the first (the second is NVRTC's).
CUPY_EXTRA = ("-ftz=true", "--device-as-default-execution-space")
NVCC_CUPY_EXTRA = ("-ftz=true",)
# PTX parameter type of each KernelSpec signature letter.
PTX_PARAM = {"p": "u64", "q": "u64", "f": "f32", "i": "u32"}

needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found")


def _nvcc(args: list[str]) -> subprocess.CompletedProcess:
    cmd = [NVCC, f"-arch={ARCH}", "--std=c++17", "-Werror", "all-warnings", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Compile every file both ways, in parallel: {file: (full_compile, ptx_compile, ptx)}."""
    tmp = tmp_path_factory.mktemp("csrc")

    def one(name: str):
        full = _nvcc(["-c", "-o", os.devnull, str(CSRC / name)])
        # The text NVRTC gets, alone in an empty folder: no include path can rescue it.
        expanded = tmp / name
        expanded.write_text(_loader.kernel_source(name))
        ptx_path = tmp / (name + ".ptx")
        ptx = _nvcc(["-ptx", *NVCC_CUPY_EXTRA, "-o", str(ptx_path), str(expanded)])
        text = ptx_path.read_text() if ptx.returncode == 0 else ""
        return name, (full, ptx, text)

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        return dict(pool.map(one, SOURCES))


def test_sources_exist():
    assert SOURCES, f"no CUDA sources in {CSRC}"
    assert {spec.file for spec in KERNELS} <= set(SOURCES)


@needs_nvcc
@pytest.mark.parametrize("name", SOURCES)
def test_nvcc_compiles_with_warnings_as_errors(compiled, name):
    full, _, _ = compiled[name]
    assert full.returncode == 0, f"nvcc failed on {name}:\n{full.stdout}\n{full.stderr}"
    assert "warning" not in (full.stdout + full.stderr).lower()


@needs_nvcc
@pytest.mark.parametrize("name", SOURCES)
def test_nvrtc_text_is_self_contained(compiled, name):
    _, ptx, text = compiled[name]
    assert ptx.returncode == 0, f"expanded {name} failed:\n{ptx.stdout}\n{ptx.stderr}"
    assert ".entry" in text


def _ptx_entries(ptx: str) -> dict[str, list[str]]:
    entries = {}
    for match in re.finditer(r"\.entry\s+(\w+)\s*\((.*?)\)", ptx, flags=re.DOTALL):
        entries[match.group(1)] = re.findall(r"\.param\s+\.(\w+)", match.group(2))
    return entries


@needs_nvcc
@pytest.mark.parametrize("spec", KERNELS, ids=lambda s: s.name)
def test_launcher_signatures_match_kernels(compiled, spec):
    entries = _ptx_entries(compiled[spec.file][2])
    expected = [PTX_PARAM[kind] for kind in spec.signature]
    for name in spec.instances():
        assert name in entries, f"{name} not in {spec.file} (has {sorted(entries)})"
        assert entries[name] == expected, f"{name}: kernel {entries[name]}, launcher {expected}"


@needs_nvcc
def test_pgd_kernel_keeps_subnormals_under_ftz(compiled):
    text = compiled["pgd_update.cu"][2]
    body = text[text.index(".entry") :]
    assert ".ftz" not in body
    assert "fma" not in body  # x + step * sign must stay two roundings, as in torch


# --------------------------------------------------------------------------------------------
# NVRTC proper, when a libnvrtc is at hand (no GPU needed to compile)
# --------------------------------------------------------------------------------------------
def _find_nvrtc() -> str | None:
    env = os.environ.get("POWERLAW_FAST_NVRTC")
    if env:
        return env
    for module in ("nvidia.cu13", "nvidia.cuda_nvrtc", "nvidia.cu12"):
        try:
            package = __import__(module, fromlist=["__path__"])
        except ImportError:
            continue
        for folder in package.__path__:
            hits = sorted(glob.glob(os.path.join(folder, "lib", "libnvrtc.so*")))
            hits = [h for h in hits if "builtins" not in h and ".alt." not in h]
            if hits:
                return hits[0]
    return ctypes.util.find_library("nvrtc")


def _load_nvrtc(path: str):
    folder = os.path.dirname(path)
    # libnvrtc dlopens its builtins by soname: load them first from the same folder.
    for builtins in sorted(glob.glob(os.path.join(folder, "libnvrtc-builtins.so*"))):
        if ".alt." not in builtins:
            ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)
    return ctypes.CDLL(path)


def _nvrtc_compile(lib, source: str, name: str, options: list[str]) -> tuple[int, str]:
    prog = ctypes.c_void_p()
    created = lib.nvrtcCreateProgram(
        ctypes.byref(prog), source.encode(), name.encode(), 0, None, None
    )
    assert created == 0
    opts = (ctypes.c_char_p * len(options))(*(o.encode() for o in options))
    status = lib.nvrtcCompileProgram(prog, len(options), opts)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return status, log.value.decode(errors="replace")


@pytest.mark.parametrize("name", SOURCES)
def test_nvrtc_compiles_without_warnings(name):
    path = _find_nvrtc()
    if path is None:
        pytest.skip("libnvrtc not found (pip install nvidia-cuda-nvrtc or set POWERLAW_FAST_NVRTC)")
    try:
        lib = _load_nvrtc(path)
    except OSError as err:
        pytest.skip(f"libnvrtc at {path} does not load: {err}")
    options = [*_loader.NVRTC_OPTIONS, *CUPY_EXTRA, f"-arch={ARCH}"]
    status, log = _nvrtc_compile(lib, _loader.kernel_source(name), name, options)
    assert status == 0, log
    assert "warning" not in log.lower(), log
