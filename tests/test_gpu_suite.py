"""benchmarks/gpu_suite.sh --dry-run: the one-shot GPU script rehearsed end to end on the CPU.

A GPU is lent for minutes, so the script must work the first time there: here every part runs
(the GPU test selection collected, each benchmark at tiny sizes on the Triton interpreter, the
report), writes the files a GPU run writes and exits 0. About 2 minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                    reason="needs bash and coreutils' timeout")
def test_gpu_suite_dry_run_writes_every_file_and_exits_0(tmp_path):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OUT=str(out), POWERLAW_FAST_COMMIT="0123456789abcdef-test")
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), "--dry-run"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    tail = (result.stdout + result.stderr)[-6000:]
    assert result.returncode == 0, tail

    for name in ("environment.txt", "suite.log", "summary.txt", "report.txt"):
        assert (out / name).is_file(), f"{name} missing\n{tail}"
    environment = (out / "environment.txt").read_text()
    assert "commit: 0123456789abcdef-test" in environment
    assert "nvidia-smi" in environment  # its output, or why it is absent

    # the summary comes last, names every part with its exit code and every results file
    summary = (out / "summary.txt").read_text()
    assert result.stdout.rstrip().endswith(summary.rstrip().splitlines()[-1])
    for part in ("gpu_tests", "bench_penalty", "bench_training", "bench_attacks", "bench_basis",
                 "report"):
        assert f"{part:<15} exit   0" in summary, summary
    assert "status: ok" in summary and "missing" not in summary

    # at most 8 files, 2 folders deep: what the device tool brings back
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8, files
    assert all(len(p.relative_to(out).parts) <= 3 for p in files)

    for name in ("penalty", "training", "attacks", "basis"):
        (path,) = out.glob(f"*/{name}.json")
        payload = json.loads(path.read_text())
        assert payload["commit"] == "0123456789abcdef-test"
        assert payload["complete"] is True and payload["dry_run"] is True
        timed = [r for r in payload["rows"] if "median_ms" in r]
        assert timed, f"{name}: no timed rows"
    penalty = json.loads(next(out.glob("*/penalty.json")).read_text())
    impls = {r["impl"] for r in penalty["rows"]}
    # every implementation a GPU run times, except the CUDA C++ backend (needs a GPU)
    assert {"triton", "triton_fused_gemm", "triton_cublas_gemm", "triton_bf16_compute",
            "torch_projection", "compiled_projection", "gemm_floor"} <= impls
    training = json.loads(next(out.glob("*/training.json")).read_text())
    assert {(r["op"], r["mode"]) for r in training["rows"]} >= {
        ("train_step", "vanilla"), ("train_step", "specreg"), ("train_step", "authors"),
        ("refresh", "mlp")}
    basis = json.loads(next(out.glob("*/basis.json")).read_text())
    assert {(r["kind"], r["mode"]) for r in basis["rows"]} == {
        ("step", "vanilla"), ("step", "epoch"), ("step", "running"), ("step", "tracked"),
        ("step", "tracked_sweeps"), ("quality", "tracked_sweeps"), ("quality", "tracked_eigh"),
        ("quality", "stale")}  # a CPU dry run: tracked_sweeps timed too
    assert "Targets" in (out / "report.txt").read_text()


def test_results_writer_rewrites_the_file_after_every_row(tmp_path, monkeypatch):
    """A part cut off by its budget keeps the rows it measured: the file is complete JSON
    after each row and says whether the run finished."""
    from benchmarks._common import ResultsWriter

    monkeypatch.setenv("POWERLAW_FAST_COMMIT", "abc")
    writer = ResultsWriter("penalty", tmp_path, extra={"dry_run": True},
                           finalize=lambda rows: [dict(r, twice=2 * r["x"]) for r in rows])
    writer.add({"x": 1})
    payload = json.loads(writer.path.read_text())
    assert payload["complete"] is False and payload["commit"] == "abc"
    assert payload["rows"] == [{"x": 1, "twice": 2}]
    assert set(payload["triton_compiles"]) == {"autotune_keys", "binaries"}
    writer.add({"x": 2})
    writer.finish()
    payload = json.loads(writer.path.read_text())
    assert payload["complete"] is True and [r["x"] for r in payload["rows"]] == [1, 2]
    assert not list(tmp_path.rglob("*.tmp"))
