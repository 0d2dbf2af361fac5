"""Every autotune config of the GEMM kernels fits an H100/H200 (sm_90): shared memory within the
227 KiB a block may use, and (reported) registers and spills as ptxas sees them.

A config that needs more shared memory than the device has can never launch: the autotuner
compiles it, the launch fails, and it is skipped, so it only costs compile time on every new
autotune key. tests/ops/test_triton_sm90_compile.py compiles each kernel with its first config;
this test compiles *every* config of the autotuned GEMM kernels for sm_90 (no GPU needed: the
launch is recorded against meta tensors and compiled ahead of time by triton's NVIDIA backend
and ptxas, as there), at float32 operands, the widest: TF32 ("high", the tensor-core path
with the largest pipelined tiles) for every kernel, and exact float32 ("highest") for the two
per-layer GEMMs. Runs in a subprocess without TRITON_INTERPRET (this process has it on).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SM90_SHARED_MEMORY = 232448  # bytes per block (227 KiB) on sm_90 (H100, H200)

SCRIPT = textwrap.dedent(
    """
    import json, os, re, subprocess, sys, tempfile, torch, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction
    from powerlaw_fast.ops import covariance, grouped_penalty as gp
    from powerlaw_fast.ops import spectral_penalty as sp
    from tests.ops.sm90_specialise import specialise
    from powerlaw_fast.ops import _spectral_kernels as spk, _grouped_kernels as gpk
    from powerlaw_fast.ops import _covariance_kernels as covk, _centring_kernels as cek
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        PTXAS = get_ptxas(90).path
    except Exception:
        PTXAS = None


    class Recorder:
        def __init__(self):
            self.calls = []
        def __getitem__(self, grid):
            return lambda *args, **kwargs: self.calls.append((args, kwargs))

    class Skip:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    def record(module, name, launcher, *args, skip=()):
        kernel = getattr(module, name)
        saved = {k: getattr(module, k) for k in skip}
        recorder = Recorder()
        setattr(module, name, recorder)
        for k in skip:
            setattr(module, k, Skip())
        try:
            launcher(*args)
        finally:
            setattr(module, name, kernel)
            for k, v in saved.items():
                setattr(module, k, v)
        assert isinstance(kernel, Autotuner), name
        (call,) = recorder.calls
        return kernel, call

    def ptxas_usage(ptx):
        if PTXAS is None:
            return None, None
        with tempfile.TemporaryDirectory() as d:
            src = os.path.join(d, "k.ptx")
            with open(src, "w") as f:
                f.write(ptx)
            done = subprocess.run([PTXAS, "-v", "--gpu-name=sm_90a", src, "-o",
                                   os.path.join(d, "k.o")], capture_output=True, text=True)
        log = done.stdout + done.stderr
        regs = re.search(r"Used (\\d+) registers", log)
        spill = re.search(r"(\\d+) bytes spill stores", log)
        return (int(regs.group(1)) if regs else None, int(spill.group(1)) if spill else None)

    def compile_all(label, kernel, call):
        fn = kernel
        while not isinstance(fn, JITFunction):
            fn = fn.fn
        call_args, call_kwargs = call
        for config in kernel.configs:
            values = dict(zip(fn.arg_names, call_args), **call_kwargs)
            values.update(config.kwargs)
            signature, constants, attrs = specialise(fn, values)
            compiled = triton.compile(
                ASTSource(fn, signature, constants, attrs), target=GPUTarget("cuda", 90, 32),
                options={"num_warps": config.num_warps, "num_stages": config.num_stages})
            regs, spills = ptxas_usage(compiled.asm["ptx"])
            print(json.dumps({"kernel": label, "config": {**config.kwargs,
                              "num_warps": config.num_warps, "num_stages": config.num_stages},
                              "shared": compiled.metadata.shared, "registers": regs,
                              "spill_bytes": spills}), flush=True)

    meta = dict(device="meta")
    f32 = torch.float32
    x, V = torch.empty(300, 40, **meta), torch.empty(40, 40, **meta)
    mean = torch.empty(40, **meta)
    for precision in ("high", "highest"):  # TF32, then exact float32
        torch.set_float32_matmul_precision(precision)
        plan = sp.plan_for(f32, 40)
        z = torch.empty(300, 40, dtype=plan.z_dtype, **meta)
        compile_all(f"projection/{precision}", *record(
            spk, "_centred_projection_kernel", sp.centred_projection_triton, x, V, mean, plan))
        compile_all(f"backprojection/{precision}", *record(
            spk, "_scaled_backprojection_kernel", sp.backprojection_triton,
            z, mean, mean, torch.empty((), **meta), V, 0.5, f32, plan))
        if precision == "highest":
            break
        compile_all(f"covariance/{precision}", *record(
            covk, "_centred_gram_kernel", covariance.centred_gram_triton, x, mean, 1.0))
        # the grouped kernels (three layers: 40, 1000 and 1 wide)
        xs = [torch.empty(300, n, **meta) for n in (40, 1000, 1)]
        Vs = [torch.empty(n, n, **meta) for n in (40, 1000, 1)]
        gplan = sp.plan_for(f32, 1000)
        i32, i64 = dict(dtype=torch.int32, **meta), dict(dtype=torch.int64, **meta)
        tables = {
            "widths": torch.empty(3, **i32), "col_off": torch.empty(3, **i64),
            "v_off": torch.empty(3, **i64), "anchors": torch.empty(3, **i32),
            "alphas": torch.empty(3, **meta), "betas": torch.empty(3, **meta),
            "tinies": torch.empty(3, **meta), "kinks": torch.empty(3, **meta), "total": 1041,
        }
        original_tables = gp._tables
        gp._tables = lambda *args, **kwargs: dict(tables)
        try:
            others = ("_grouped_column_mean_kernel", "_grouped_penalty_kernel")
            compile_all(f"grouped_projection/{precision}", *record(
                gpk, "_grouped_projection_kernel", gp._launch_forward, xs, Vs, dict(tables),
                gp.GroupedSettings(anchors=(9, 9, 0), alphas=(1.0,) * 3, betas=(1.0,) * 3,
                                   skip_nonpositive=False, validate="off",
                                   names=("a", "b", "c"), taus=(10, 10, 1)),
                gplan, skip=others))
            compile_all(f"grouped_backprojection/{precision}", *record(
                gpk, "_grouped_backprojection_kernel", gp._launch_backward,
                torch.empty((), **meta), torch.empty(300 * 1041, **meta),
                torch.empty(3 * 1041, **meta), torch.empty(1041 * 1041, **meta),
                dict(tables, widths_host=(40, 1000, 1)), 300, f32, gplan))
        finally:
            gp._tables = original_tables
    """
)


def _nvidia_backend_ready() -> bool:
    try:
        import triton.backends.nvidia as nvidia
    except ImportError:
        return False
    return (Path(nvidia.__file__).parent / "bin" / "ptxas").is_file()


@pytest.fixture(scope="module")
def sm90_usage():
    """One JSON line per (kernel/precision, config): shared bytes, registers, spill bytes."""
    if not _nvidia_backend_ready():
        pytest.skip("triton's NVIDIA backend/ptxas missing")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=900,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


@pytest.mark.slow
def test_every_gemm_config_fits_sm90_shared_memory(sm90_usage):
    from powerlaw_fast.ops._triton_gemm import GEMM_CONFIGS

    kernels = {u["kernel"] for u in sm90_usage}
    assert kernels == {"projection/high", "backprojection/high", "covariance/high",
                       "grouped_projection/high", "grouped_backprojection/high",
                       "projection/highest", "backprojection/highest"}
    per_kernel = {k: sum(u["kernel"] == k for u in sm90_usage) for k in kernels}
    assert per_kernel["projection/high"] == len(GEMM_CONFIGS)
    too_big = [u for u in sm90_usage if u["shared"] > SM90_SHARED_MEMORY]
    assert not too_big, "configs over sm_90's shared memory:\n" + "\n".join(map(str, too_big))


@pytest.mark.slow
def test_tf32_configs_spill_little(sm90_usage):
    """Spills as ptxas reports them, printed for the record (``pytest -s``). Most configs still
    spill a few hundred bytes at 255 registers (the TF32 rounding and the masked loads add to
    the accumulator); the bound catches a config as bad as the ones replaced (6.5 KB). Exact
    float32 ("highest", an FMA dot) spills in every config: reported, not asserted; see the
    table in powerlaw_fast/ops/_triton_gemm.py."""
    for u in sm90_usage:
        print(u)
    if any(u["spill_bytes"] is None for u in sm90_usage):
        pytest.skip("ptxas -v gave no register report")
    spilling = [u for u in sm90_usage if u["kernel"].endswith("/high") and u["spill_bytes"] > 1024]
    assert not spilling, "\n".join(map(str, spilling))
