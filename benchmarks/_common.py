"""Shared plumbing for the benchmark scripts: environment facts, timing, results files.

Every results file has the layout
``{"device", "torch", "triton", "date", "commit", "rows": [...]}`` and lives in
``benchmarks/results/<gpu-name>/<name>.json``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import subprocess
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return "cpu"


def environment() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except Exception:
        commit = os.environ.get("POWERLAW_FAST_COMMIT")
    return {
        "device": device_name(),
        "torch": torch.__version__,
        "triton": triton_version,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
    }


def results_path(name: str, out_dir: str | os.PathLike | None = None) -> Path:
    folder = re.sub(r"[^A-Za-z0-9._-]+", "_", device_name()).strip("_")
    base = Path(out_dir) if out_dir is not None else RESULTS_DIR
    return base / folder / f"{name}.json"


def write_results(name: str, rows: list[dict], out_dir=None, extra: dict | None = None) -> Path:
    path = results_path(name, out_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {**environment(), **(extra or {}), "rows": rows}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(path)
    return path


def median_ms(fn, *, warmup: int = 25, rep: int = 100) -> float:
    """Median wall time of ``fn()`` in milliseconds: triton.testing.do_bench on a GPU, a plain
    timer loop on the CPU (smoke runs only)."""
    if torch.cuda.is_available():
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    import statistics
    import time

    fn()
    times = []
    for _ in range(max(3, rep // 20)):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def peak_memory_mb(fn) -> float | None:
    """Extra device memory ``fn()`` needs beyond what is allocated before the call, in MB."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def cuda_backend_available() -> bool:
    """True when powerlaw_fast's CUDA C++ backend can run here (CuPy and a GPU)."""
    try:
        from powerlaw_fast.cuda import require_cuda_backend

        require_cuda_backend(torch.device("cuda"), torch.float32)
        return True
    except Exception as err:  # reported, not hidden
        print(f"cuda backend skipped: {err}")
        return False


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)
