"""Run JSONs on disk: atomic writes, and reading back only complete results.

A results file is written to a temporary file in the same folder, then ``os.replace``-d, so it
is either complete or absent; :func:`read_result` also rejects files of another format.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

RESULT_FORMAT = 1


def write_json_atomic(path, obj, *, indent: int | None = None) -> None:
    """Write ``obj`` as JSON to ``path`` via a temporary file in the same folder + os.replace
    (``indent``: as :func:`json.dump`'s, for files meant to be read)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as fh:
            json.dump(obj, fh, allow_nan=False, indent=indent)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


class ResultWarning(UserWarning):
    """A results file that was skipped (unreadable JSON) or a stale temporary file."""


# What the figures and tables read from a complete result: key -> required sub-keys.
REQUIRED_KEYS = {
    "name": (),
    "config": ("experiment", "arch", "variant"),
    "model": ("hidden_widths", "regularised_layers"),
    "test_accuracy": (),
    "robustness": (),
    "spectra": (),
}


def check_result(result: dict, path) -> None:
    """Raise ``ValueError`` naming ``path`` and the key when a complete result lacks one."""
    for key, sub in REQUIRED_KEYS.items():
        if key not in result:
            raise ValueError(f"{path}: marked complete but has no key {key!r}")
        for k in sub:
            if not isinstance(result[key], dict) or k not in result[key]:
                raise ValueError(f"{path}: marked complete but has no key {key!r} -> {k!r}")
    if not isinstance(result["robustness"], dict):
        raise ValueError(f"{path}: 'robustness' is not a mapping")
    for attack, curve in result["robustness"].items():
        for k in ("eps", "accuracy"):
            if not isinstance(curve, dict) or not isinstance(curve.get(k), list):
                raise ValueError(f"{path}: marked complete but has no list "
                                 f"'robustness' -> {attack!r} -> {k!r}")
        if len(curve["eps"]) != len(curve["accuracy"]):
            raise ValueError(f"{path}: 'robustness' -> {attack!r} has {len(curve['eps'])} eps "
                             f"but {len(curve['accuracy'])} accuracies")


def read_result(path, *, strict: bool = False) -> dict | None:
    """The result in ``path`` if it is a complete run's JSON, else None (missing, partial).

    With ``strict``, a file that is marked complete but lacks a key the figures need raises a
    ``ValueError`` naming the file and the key (without, it counts as incomplete).
    """
    try:
        with open(path) as fh:
            result = json.load(fh)
    except (OSError, ValueError):
        return None
    if not isinstance(result, dict) or result.get("status") != "complete":
        return None
    if result.get("format") != RESULT_FORMAT or "config" not in result:
        return None
    try:
        check_result(result, path)
    except ValueError:
        if strict:
            raise
        return None
    return result


def temporary_files(folder, name: str = "*") -> list[Path]:
    """Temporary files of :func:`write_json_atomic` (``.NAME.json.PID.tmp``) in ``folder``."""
    return sorted(Path(folder).glob(f".{name}.json.*.tmp"))


def load_results(results_dir) -> list[dict]:
    """Every complete run JSON under ``results_dir`` (recursively), sorted by name.

    A file that is not valid JSON (e.g. cut short by a full disk) is skipped with a
    :class:`ResultWarning`, and so are the temporary files a killed writer left behind (they
    are never read; remove them when no sweep is running). A complete result that lacks a key
    raises ``ValueError`` naming the file and the key.
    """
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise FileNotFoundError(f"results_dir: {results_dir} is not a folder")
    found = []
    for path in sorted(results_dir.rglob("*.json")):
        try:
            with open(path) as fh:
                json.load(fh)
        except ValueError as err:
            warnings.warn(f"{path}: not valid JSON, skipped ({err})", ResultWarning,
                          stacklevel=2)
            continue
        except OSError as err:
            warnings.warn(f"{path}: unreadable, skipped ({err})", ResultWarning, stacklevel=2)
            continue
        result = read_result(path, strict=True)
        if result is not None:
            found.append(result)
    stale = sorted(results_dir.rglob(".*.json.*.tmp"))
    if stale:
        warnings.warn(
            f"{len(stale)} temporary file(s) of an interrupted writer ignored, e.g. {stale[0]} "
            "(a rerun of the sweep removes its own; delete the rest when no sweep is running)",
            ResultWarning, stacklevel=2,
        )
    return found
