"""Run JSONs on disk: atomic writes, and reading back only complete results.

A results file is written to a temporary file in the same folder, then ``os.replace``-d, so it
is either complete or absent; :func:`read_result` also rejects files of another format.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

RESULT_FORMAT = 1


def write_json_atomic(path, obj) -> None:
    """Write ``obj`` as JSON to ``path`` via a temporary file in the same folder + os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as fh:
            json.dump(obj, fh, allow_nan=False)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def read_result(path) -> dict | None:
    """The result in ``path`` if it is a complete run's JSON, else None (missing, partial)."""
    try:
        with open(path) as fh:
            result = json.load(fh)
    except (OSError, ValueError):
        return None
    if not isinstance(result, dict) or result.get("status") != "complete":
        return None
    if result.get("format") != RESULT_FORMAT or "config" not in result:
        return None
    return result



def load_results(results_dir) -> list[dict]:
    """Every complete run JSON under ``results_dir`` (recursively), sorted by name."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise FileNotFoundError(f"results_dir: {results_dir} is not a folder")
    found = []
    for path in sorted(results_dir.rglob("*.json")):
        result = read_result(path)
        if result is not None:
            found.append(result)
    return found
