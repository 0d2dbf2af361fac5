"""Shared plumbing for the benchmark scripts: environment facts, timing, results files.

Every results file has the layout
``{"device", "torch", "triton", "date", "commit", "rows": [...]}`` and lives in
``benchmarks/results/<gpu-name>/<name>.json``. The commit is ``$POWERLAW_FAST_COMMIT`` when set
(``benchmarks/gpu_suite.sh`` sets it: the device machine's copy of the checkout is not a git
repository), else ``git rev-parse HEAD``. A benchmark writes its file after every row through
:class:`ResultsWriter` (``"complete": false`` until the end), so a run cut off by its time
budget keeps what it measured.
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
    return {
        "device": device_name(),
        "torch": torch.__version__,
        "triton": triton_version,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit(),
    }


def commit() -> str | None:
    """``$POWERLAW_FAST_COMMIT`` when set, else ``git rev-parse HEAD`` (None outside git)."""
    if os.environ.get("POWERLAW_FAST_COMMIT"):
        return os.environ["POWERLAW_FAST_COMMIT"]
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip() or None
    except Exception:
        return None


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


class ResultsWriter:
    """Rewrite ``<out>/<device>/<name>.json`` atomically after every row.

    ``add(row)`` appends and writes with ``"complete": false``; ``finish()`` writes
    ``"complete": true``. ``finalize(rows)`` (optional) derives fields (ratios) on a copy of the
    rows before each write. Each write also records how many Triton autotune keys and binaries
    the process holds (``triton_compiles``), the numbers that size a part's time budget.
    """

    def __init__(self, name: str, out_dir=None, extra: dict | None = None, finalize=None):
        self.name, self.out_dir, self.extra = name, out_dir, dict(extra or {})
        self.finalize = finalize
        self.rows: list[dict] = []
        self.path = results_path(name, out_dir)

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.write(complete=False)

    def write(self, complete: bool) -> Path:
        rows = [dict(r) for r in self.rows]
        if self.finalize is not None:
            rows = self.finalize(rows)
        extra = {**self.extra, "complete": complete, "triton_compiles": triton_compile_counts()}
        return write_results(self.name, rows, self.out_dir, extra=extra)

    def finish(self) -> Path:
        return self.write(complete=True)


def triton_compile_counts() -> dict:
    """Autotune keys tuned and kernel binaries compiled so far by powerlaw_fast's Triton
    kernels in this process (zeros when triton is absent or nothing ran)."""
    import sys

    keys = binaries = 0
    try:
        from triton.runtime.autotuner import Autotuner
        from triton.runtime.jit import JITFunction
    except Exception:
        return {"autotune_keys": 0, "binaries": 0}
    seen = set()
    for name, module in list(sys.modules.items()):
        if not name.startswith("powerlaw_fast.") or module is None:
            continue
        for obj in list(vars(module).values()):
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            if isinstance(obj, Autotuner):
                keys += len(getattr(obj, "cache", {}) or {})
                obj = obj.fn
                while not isinstance(obj, JITFunction) and hasattr(obj, "fn"):
                    obj = obj.fn
            if isinstance(obj, JITFunction):
                for caches in getattr(obj, "device_caches", {}).values():
                    try:
                        binaries += len(caches[0])
                    except Exception:
                        pass
    return {"autotune_keys": keys, "binaries": binaries}


def interpreter_for_dry_run(argv: list[str]) -> None:
    """``--dry-run`` on a machine without a GPU runs the Triton kernels under the interpreter,
    which must be switched on before triton is first imported: call this before importing
    powerlaw_fast."""
    if "--dry-run" in argv and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


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
