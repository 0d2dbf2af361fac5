"""The CUDA backend's host side on a CPU-only machine: errors, source loading, launch plumbing.

The kernels themselves need a GPU (tests/cuda/test_cuda_backend.py); here a recording stand-in
replaces the launch, so grids, argument lists and buffer sizes are checked without one.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch

import powerlaw_fast.cuda as cuda_pkg
from powerlaw_fast import batch_covariance, projected_spectrum, spec_penalty
from powerlaw_fast.cuda import _loader, _requirements, ops
from powerlaw_fast.ops.attack_step import pgd_update


# --------------------------------------------------------------------------------------------
# Clear errors
# --------------------------------------------------------------------------------------------
@pytest.fixture
def fresh_cupy_probe():
    _requirements.cupy_import_error.cache_clear()
    yield
    _requirements.cupy_import_error.cache_clear()


@pytest.fixture
def no_cupy(monkeypatch, fresh_cupy_probe):
    monkeypatch.setitem(sys.modules, "cupy", None)  # `import cupy` raises ImportError


@pytest.fixture
def fake_cuda_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def test_import_needs_no_cupy(no_cupy):
    assert not cuda_pkg.cupy_available()
    for name in cuda_pkg.__all__:
        assert hasattr(cuda_pkg, name)


@pytest.mark.parametrize(
    "call",
    [
        lambda x, V: spec_penalty(x, V, tau=3, backend="cuda"),
        lambda x, V: projected_spectrum(x, V, backend="cuda"),
        lambda x, V: batch_covariance(x, backend="cuda"),
        lambda x, V: pgd_update(x, x, x, 0.1, 0.01, backend="cuda"),
    ],
    ids=["spec_penalty", "projected_spectrum", "batch_covariance", "pgd_update"],
)
def test_cpu_tensors_are_refused(call):
    x = torch.randn(8, 5)
    with pytest.raises(
        ValueError, match=r"backend='cuda': expected CUDA tensors, got tensors on cpu"
    ):
        call(x, torch.eye(5))


def test_cpu_message_also_names_missing_cupy(no_cupy):
    with pytest.raises(
        ValueError, match=r"CuPy is not installed either: pip install powerlaw-fast"
    ):
        cuda_pkg.require_cuda_backend(torch.device("cpu"), torch.float32)


def test_missing_cupy_says_how_to_install(no_cupy, fake_cuda_device):
    with pytest.raises(cuda_pkg.CupyNotInstalled) as info:
        cuda_pkg.require_cuda_backend(torch.device("cuda", 0), torch.float32)
    message = str(info.value)
    assert "import cupy" in message
    assert "powerlaw-fast[cuda12]" in message and "powerlaw-fast[cuda13]" in message
    assert isinstance(info.value, ImportError) and isinstance(info.value, ValueError)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a device")
def test_no_cuda_device():
    with pytest.raises(ValueError, match=r"no CUDA device is visible to torch"):
        cuda_pkg.require_cuda_backend(torch.device("cuda", 0), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32])
def test_unsupported_dtype(fake_cuda_device, dtype):
    with pytest.raises(TypeError, match=rf"float32, float16 or bfloat16 tensors, got {dtype}"):
        cuda_pkg.require_cuda_backend(torch.device("cuda", 0), dtype)


def test_missing_sources(monkeypatch, tmp_path, fake_cuda_device):
    monkeypatch.setattr(_requirements, "cupy_import_error", lambda: None)
    monkeypatch.setattr(_loader, "source_dirs", lambda: [tmp_path])
    with pytest.raises(
        ValueError, match=r"sources \(csrc/\*\.cu\) were not found.*POWERLAW_FAST_CSRC"
    ):
        cuda_pkg.require_cuda_backend(torch.device("cuda", 0), torch.float32)


def test_requirements_met(monkeypatch, fake_cuda_device):
    monkeypatch.setattr(_requirements, "cupy_import_error", lambda: None)
    cuda_pkg.require_cuda_backend(torch.device("cuda", 0), torch.bfloat16)


# --------------------------------------------------------------------------------------------
# Source loading
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted({spec.file for spec in ops.KERNELS}))
def test_kernel_source_is_self_contained(name):
    text = _loader.kernel_source(name)
    assert '#include "' not in text
    assert "#include <" not in text  # nothing NVRTC would have to find on disk
    assert text.count("#define POWERLAW_FAST_COMMON_CUH") == 1


def test_includes_pasted_once(tmp_path):
    (tmp_path / "a.cuh").write_text('#include "b.cuh"\nint a;\n')
    (tmp_path / "b.cuh").write_text("int b;\n")
    text = _loader.expand_includes('#include "a.cuh"\n#include "b.cuh"\n#include <x.h>\n', tmp_path)
    assert text.count("int b;") == 1 and "int a;" in text and "#include <x.h>" in text


def test_source_dir_from_environment(monkeypatch, tmp_path):
    (tmp_path / "common.cuh").write_text("// test\n")
    monkeypatch.setenv("POWERLAW_FAST_CSRC", str(tmp_path))
    assert _loader.source_dir() == tmp_path


# --------------------------------------------------------------------------------------------
# Launch plumbing, recorded instead of launched
# --------------------------------------------------------------------------------------------
class Recorder:
    def __init__(self):
        self.calls = []

    def kernel(self, file_name, name):
        return (file_name, name)

    def launch(self, tensor, fn, grid, block, args):
        assert all(isinstance(g, int) and 1 <= g for g in grid) and len(grid) == 3
        assert len(block) == 3 and math.prod(block) <= 1024
        assert grid[1] <= ops.MAX_GRID_Y
        self.calls.append((fn[1], grid, block, args))

    def names(self):
        return [c[0] for c in self.calls]


@pytest.fixture
def recorder(monkeypatch):
    rec = Recorder()
    monkeypatch.setattr(_loader, "kernel", rec.kernel)
    monkeypatch.setattr(_loader, "launch", rec.launch)
    monkeypatch.setattr(ops, "_check_cuda", lambda device, **tensors: None)
    monkeypatch.setattr(ops, "_mm_out_dtype_ok", False)  # CPU torch has no mm(out_dtype=)
    return rec


@pytest.mark.parametrize("B,chunks", [(2, 1), (512, 1), (513, 2), (5000, 10)])
def test_column_reduce_chunks(recorder, B, chunks):
    x = torch.zeros(B, 37)
    ops.column_reduce_cuda(x, square=True, scale=0.5)
    first = recorder.calls[0]
    assert first[0] == "column_sumsq_f32"
    assert first[1] == (2, chunks, 1) and first[2] == ops.REDUCE_BLOCK
    rows_per_chunk, scale = int(first[3][5]), float(first[3][6])
    assert rows_per_chunk * chunks >= B > rows_per_chunk * (chunks - 1)
    if chunks == 1:
        assert recorder.names() == ["column_sumsq_f32"] and scale == 0.5
    else:
        assert recorder.names() == ["column_sumsq_f32", "column_finalize"] and scale == 1.0
        assert int(recorder.calls[1][3][1]) == chunks and float(recorder.calls[1][3][3]) == 0.5


def test_column_reduce_huge_batch_fits_the_grid(recorder):
    B = 40_000_000  # an expanded view: no memory behind it
    x = torch.zeros(1, 3).expand(B, 3)
    ops.column_reduce_cuda(x, square=False, scale=1.0 / B)
    grid, args = recorder.calls[0][1], recorder.calls[0][3]
    assert grid[1] <= ops.MAX_GRID_Y and int(args[5]) * grid[1] >= B
    assert int(args[1]) == 0  # stride 0 passed through, no copy


@pytest.mark.parametrize("N", [1, 10, 32, 33, 257, 1000])
def test_column_grid_covers(N):
    bx, by, bz = ops._column_block(N)
    assert bx * by * bz == ops.COLUMN_THREADS and bx % 32 == 0
    for B in (1, 7, 300, 10**8):
        gx, gy, _ = ops._column_grid(B, N, (bx, by, bz))
        assert gx * bx >= N > (gx - 1) * bx
        assert gy <= ops.MAX_GRID_Y and (gy * by >= B or gy == ops.MAX_GRID_Y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_op_launch_sequences(recorder, dtype):
    x = torch.randn(40, 300).T  # non-contiguous [300, 40]
    V = torch.eye(40, dtype=dtype)
    x = x.to(dtype)
    sfx = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}[dtype]
    lam, z = cuda_pkg.projected_spectrum_cuda(x, V)
    assert lam.shape == (40,) and lam.dtype == torch.float32 and z.dtype == dtype
    assert recorder.names() == [f"column_sum_{sfx}", f"centre_columns_{sfx}", f"column_sumsq_{sfx}"]
    strides = recorder.calls[0][3][1:3]
    assert (int(strides[0]), int(strides[1])) == x.stride()

    recorder.calls.clear()
    grad = cuda_pkg.spectrum_backward_cuda(torch.ones(40), z, V)
    assert grad.shape == (300, 40) and grad.dtype == dtype
    assert recorder.names() == [f"scale_columns_{sfx}"]
    assert float(recorder.calls[0][3][5]) == pytest.approx(2.0 / 299)

    recorder.calls.clear()
    sigma = cuda_pkg.batch_covariance_cuda(x)
    assert sigma.shape == (40, 40) and sigma.dtype == torch.float32
    assert recorder.names() == [f"column_sum_{sfx}", f"centre_columns_{sfx}"]


def test_penalty_launch(recorder):
    lam = torch.rand(100)
    penalty, grad, status = cuda_pkg.powerlaw_penalty_cuda(lam, 1.0, 9, 2.0, True, 1e-6, 3e-6)
    name, grid, block, args = recorder.calls[0]
    assert name == "powerlaw_penalty" and grid == (1, 1, 1) and block == (ops.PENALTY_THREADS, 1, 1)
    assert [int(a) for a in args[2:4]] == [100, 9] and int(args[9]) == 1
    # tiny, kink_tol, the underflow level: float32's smallest normal over its epsilon
    assert [float(a) for a in args[6:9]] == pytest.approx([1e-6, 3e-6, 2.0**-126 / 2.0**-23])
    assert penalty.shape == () and grad.shape == (100,) and status.dtype == torch.int32
    with pytest.raises(ValueError, match="anchor"):
        cuda_pkg.powerlaw_penalty_cuda(lam, 1.0, 100, 2.0, True)
    with pytest.raises(TypeError, match="float32 spectrum"):
        cuda_pkg.powerlaw_penalty_cuda(lam.double(), 1.0, 9, 2.0, True)


def test_pgd_launch(recorder):
    R, S, D = 12, 4, 50
    x_nat = torch.rand(S, D)
    out = torch.empty(R, D)
    cuda_pkg.pgd_update_cuda(x_nat, x_nat, x_nat, torch.rand(R), 0.01, 0.0, 1.0, out)
    name, grid, block, args = recorder.calls[0]
    assert name == "pgd_update_f32" and block == (64, 4, 1) and grid == (1, 3, 1)
    assert [int(args[i]) for i in (3, 7, 11)] == [S, S, S]
    assert [int(a) for a in args[17:19]] == [R, D]
    with pytest.raises(TypeError, match="x_nat"):
        cuda_pkg.pgd_update_cuda(x_nat, x_nat.double(), x_nat, torch.rand(R), 0.1, 0.0, 1.0, out)


def test_pack_args_checks_the_signature():
    with pytest.raises(TypeError, match="expects 3 arguments"):
        ops.pack_args("pqf", (None, 1))
    with pytest.raises(TypeError, match="pointer argument"):
        ops.pack_args("pqf", (12345, 1, 1.0))
    packed = ops.pack_args("pqfi", (None, 2**40, 0.1, 3))
    assert [a.dtype.name for a in packed] == ["uint64", "int64", "float32", "int32"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_float32_gemm_output_path(recorder, monkeypatch, dtype):
    monkeypatch.setattr(ops, "_mm_float32_out", lambda a, b: a.float() @ b.float())
    x = torch.randn(30, 20, dtype=dtype)
    sumsq, z = cuda_pkg.centred_projection_cuda(x, torch.eye(20, dtype=dtype), torch.zeros(20))
    sfx = "f16" if dtype == torch.float16 else "bf16"
    assert recorder.names() == [f"centre_columns_{sfx}", f"column_sumsq_f32_copy_{sfx}"]
    assert z.dtype == dtype and sumsq.dtype == torch.float32
    copy_args = recorder.calls[1][3]
    assert len(copy_args) == len(ops.COLUMN_SUMSQ_COPY.signature)
    assert int(copy_args[8]) == z.data_ptr()
