"""The Triton kernels compile for sm_90 with the argument specialisation a GPU launch uses.

The interpreter runs kernels without specialising their arguments, so it misses what only the
compiler sees: an int argument equal to 1 becomes a constexpr (no ``.to()``), and shared memory
can exceed the device's limit. Here each launcher runs against meta tensors with its kernel
swapped for a recorder; the recorded call is specialised as triton's JIT does and compiled
ahead of time for an H100 (sm_90) by triton's own NVIDIA backend and ptxas: no GPU needed.
Runs in a subprocess, because this process imported triton with TRITON_INTERPRET=1.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
H100_SHARED_MEMORY = 232448  # bytes per block (227 KiB)

SCRIPT = textwrap.dedent(
    """
    import sys, torch, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction
    from powerlaw_fast.ops import centring, covariance, grouped_penalty as gp
    from powerlaw_fast.ops import spectral_penalty as sp
    from tests.ops.sm90_specialise import specialise
    from powerlaw_fast.ops import powerlaw_penalty as pp
    from powerlaw_fast.ops import _spectral_kernels as spk, _grouped_kernels as gpk
    from powerlaw_fast.ops import _covariance_kernels as covk, _centring_kernels as cek


    class Recorder:
        def __init__(self):
            self.calls = []
        def __getitem__(self, grid):
            return lambda *args, **kwargs: self.calls.append((args, kwargs))

    def compile_launch(module, name, launcher, *args):
        kernel = getattr(module, name)
        recorder = Recorder()
        setattr(module, name, recorder)
        try:
            launcher(*args)
        finally:
            setattr(module, name, kernel)
        fn = kernel
        while not isinstance(fn, JITFunction):
            fn = fn.fn
        config = kernel.configs[0] if isinstance(kernel, Autotuner) else None
        (call_args, call_kwargs), = recorder.calls
        values = dict(zip(fn.arg_names, call_args), **call_kwargs)
        values.update(config.kwargs if config else {})
        signature, constants, attrs = specialise(fn, values)
        options = {"num_warps": config.num_warps, "num_stages": config.num_stages} if config else {}
        compiled = triton.compile(ASTSource(fn, signature, constants, attrs),
                                  target=GPUTarget("cuda", 90, 32), options=options)
        print(name, compiled.metadata.shared)

    meta = dict(device="meta")
    f32 = torch.float32
    for N, anchor, count in ((40, 0, 300), (40, 1, 300), (40, 9, 300), (1, 0, 2), (4096, 9, 6144)):
        # anchor 1: tau = 2 (paper) or tau = 1 (authors); N = 1: one column; N = 4096: the
        # widest one-program sort
        moments = torch.empty(2, max(1, count // 128), N, **meta)
        compile_launch(spk, "_spectrum_penalty_kernel", pp.spectrum_penalty_triton,
                       moments, count, anchor, 1.0, 1.0, False, 1e-5, 1e-7, 1e-6)
    compile_launch(spk, "_spectrum_penalty_kernel", pp.spectrum_penalty_triton,
                   torch.empty(40, **meta), None, 3, 1.0, 1.0, True, None, 1e-7, 1e-6)
    compile_launch(spk, "_spectrum_penalty_kernel", pp.spectrum_penalty_triton,
                   torch.empty(2, 3, 40, **meta), torch.empty((), **meta), 3, 1.0, 1.0, False,
                   1e-5, 1e-7, 1e-6)
    x = torch.empty(1, 1, dtype=torch.bfloat16, **meta)
    compile_launch(cek, "_column_mean_kernel", centring.column_mean_triton, x)
    x, V = torch.empty(300, 40, **meta), torch.empty(40, 40, **meta)
    mean = torch.empty(40, **meta)
    compile_launch(cek, "_centre_columns_kernel", centring.centre_columns_triton, x, mean,
                   torch.bfloat16)
    compile_launch(cek, "_column_moments_kernel", centring.column_moments_triton, x)
    torch.set_float32_matmul_precision("high")
    for dtype, compute in ((f32, None), (torch.bfloat16, None), (torch.float16, None),
                           (f32, torch.bfloat16)):
        xd, Vd = x.to(dtype), V.to(compute or dtype)
        plan = sp.plan_for(dtype, 40, compute)
        compile_launch(spk, "_centred_projection_kernel", sp.centred_projection_triton,
                       xd, Vd, mean, plan)
        z = torch.empty(300, 40, dtype=plan.z_dtype, **meta)
        compile_launch(spk, "_scaled_backprojection_kernel", sp.backprojection_triton,
                       z, mean, mean, torch.empty((), **meta), Vd, 0.5, dtype, plan)
    compile_launch(covk, "_centred_gram_kernel", covariance.centred_gram_triton,
                   x, mean, 1.0)
    # the grouped kernels: the forward launcher's four kernels, then the backward
    xs = [torch.empty(300, n, **meta) for n in (40, 1000, 1)]
    Vs = [torch.empty(n, n, **meta) for n in (40, 1000, 1)]
    plan = sp.plan_for(f32, 1000)
    i32, i64 = dict(dtype=torch.int32, **meta), dict(dtype=torch.int64, **meta)
    gp._tables = lambda device, widths, *rest: {
        "widths": torch.empty(3, **i32), "col_off": torch.empty(3, **i64),
        "v_off": torch.empty(3, **i64), "anchors": torch.empty(3, **i32),
        "alphas": torch.empty(3, **meta), "betas": torch.empty(3, **meta),
        "tinies": torch.empty(3, **meta), "kinks": torch.empty(3, **meta), "total": 1041,
    }
    for name in ("_grouped_column_mean_kernel", "_grouped_projection_kernel",
                 "_grouped_penalty_kernel"):
        kernels = {k: getattr(gpk, k) for k in ("_grouped_column_mean_kernel",
                   "_grouped_projection_kernel", "_grouped_penalty_kernel")}
        class Skip:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: None
        for other in kernels:
            if other != name:
                setattr(gpk, other, Skip())
        try:
            settings = gp.GroupedSettings(anchors=(9, 9, 0), alphas=(1.0,) * 3,
                                          betas=(1.0,) * 3, skip_nonpositive=False,
                                          validate="off", names=("a", "b", "c"), taus=(10, 10, 1))
            compile_launch(gpk, name, gp._launch_forward, xs, Vs, gp._tables(None, None),
                           settings, plan)
        finally:
            for k, v in kernels.items():
                setattr(gpk, k, v)
    from powerlaw_fast.ops import block_eigh as be, _block_eigh_kernels as bek
    for b in (64, 5):  # a full block, and one padded to 16
        compile_launch(bek, "_block_jacobi_kernel", be.block_eigh_triton,
                       torch.empty(3, b, b, **meta))
    z = torch.empty(300 * 1041, **meta)
    tables = dict(gp._tables(None, None), widths_host=(40, 1000, 1))
    compile_launch(gpk, "_grouped_backprojection_kernel", gp._launch_backward,
                   torch.empty((), **meta), z, torch.empty(3 * 1041, **meta),
                   torch.empty(1041 * 1041, **meta), tables, 300, f32, plan)
    """
)


def _nvidia_backend_ready() -> bool:
    try:
        import triton.backends.nvidia as nvidia
    except ImportError:
        return False
    return (Path(nvidia.__file__).parent / "bin" / "ptxas").is_file()


@pytest.mark.skipif(not _nvidia_backend_ready(), reason="triton's NVIDIA backend/ptxas missing")
def test_triton_kernels_compile_for_sm90_with_gpu_argument_specialisation():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    lines = result.stdout.split("\n")
    shared = [int(line.split()[-1]) for line in lines if line.strip()]
    assert len(shared) == 25  # one line per compiled kernel variant
    assert max(shared) <= H100_SHARED_MEMORY
