"""The README's measured numbers, made by running the current code: the demo's claims table
and the quickstart's output, each with the machine, the versions, the threads, the wall and
CPU time, and a digest of the code that printed them.

    python benchmarks/readme_numbers.py                # run both (minutes), record, rewrite README
    python benchmarks/readme_numbers.py demo           # only the demo (or: quickstart)
    python benchmarks/readme_numbers.py --check        # no run: exit 1 when the README is stale
    python benchmarks/readme_numbers.py --render       # no run: rewrite the README from the record

Run it as a newcomer runs the README's command, with torch's default threads, so that the same
machine prints the same digits (one and two threads differ in the third digit, see below); the
record names the CPU, the cores the process may use and torch's threads, and the README says
them.

What it writes:

- ``benchmarks/results/cpu/readme/record.json``: per block (``demo``, ``quickstart``) what ran,
  where, how long, the code digest (:func:`code_digest`), everything it printed, and the README
  text made from it;
- ``benchmarks/results/cpu/readme/demo-summary.json`` (the demo's ``summary.json``: every curve
  seed by seed) and the demo's figures;
- the README text between ``<!-- readme-numbers:NAME:start -->`` and ``:end -->``, and the
  demo's time on the first screen between ``<!-- readme-numbers:demo-time -->`` and
  ``<!-- /readme-numbers:demo-time -->``.

Why a record and a digest rather than a rerun in the tests: the demo takes minutes, and its
floats depend on the CPU and the thread count (libm, the BLAS's reduction order; 96 Adam steps
carry an ulp into the third digit: one and two threads on the same machine print PGD accuracy
0.275 and 0.298), so a rerun elsewhere could only be compared within the seeds' spread, which
would also let a stale number through. ``tests/test_readme_numbers.py`` instead re-renders
every block from the record (the claims table from the per-seed numbers) and compares the code
digest with the current code's: a change to any code the numbers come from fails it until this
script is rerun.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import hashlib
import io
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import tokenize
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
README = REPO_ROOT / "README.md"
PACKAGE = REPO_ROOT / "powerlaw_fast"
RECORD_DIR = REPO_ROOT / "benchmarks" / "results" / "cpu" / "readme"
RECORD = RECORD_DIR / "record.json"
DEMO_SUMMARY = RECORD_DIR / "demo-summary.json"
BLOCKS = ("demo", "quickstart")
QUICKSTART_HEADING = "## Quickstart: a training loop"
DEMO_TIME = ("<!-- readme-numbers:demo-time -->", "<!-- /readme-numbers:demo-time -->")


def markers(name: str) -> tuple[str, str]:
    return f"<!-- readme-numbers:{name}:start -->", f"<!-- readme-numbers:{name}:end -->"


# --- the code the numbers come from ---------------------------------------------------------


def _char_column(line: str, byte_offset: int) -> int:
    """ast's UTF-8 byte column as a character column."""
    return len(line.encode()[:byte_offset].decode(errors="ignore"))


def normalised_code(text: str) -> str:
    """Python source without its comments, docstrings, blank lines and trailing spaces: what
    runs, so that editing documentation does not count as changing the code (any other
    change, reformatting included, does)."""
    lines = text.splitlines()
    spans = []  # (first line, first column, last line, end column), 1-indexed lines
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            first = node.body[0] if node.body else None
            if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                    and isinstance(first.value.value, str)):
                spans.append((first.lineno, _char_column(lines[first.lineno - 1],
                                                         first.col_offset),
                              first.end_lineno, _char_column(lines[first.end_lineno - 1],
                                                             first.end_col_offset)))
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.COMMENT:
            spans.append((*tok.start, *tok.end))
    chars = [list(line) for line in lines]
    for first, start, last, end in spans:
        for number in range(first, last + 1):
            row = chars[number - 1]
            for i in range(start if number == first else 0, end if number == last else len(row)):
                row[i] = " "
    kept = ("".join(row).rstrip() for row in chars)
    return "\n".join(line for line in kept if line.strip()) + "\n"


def code_files() -> list[Path]:
    """Every file of the package the numbers can come from: its Python modules and its data."""
    return sorted(p for p in PACKAGE.rglob("*")
                  if p.is_file() and p.suffix in (".py", ".npz") and "__pycache__" not in p.parts)


_DIGESTS: dict = {}  # (normaliser, suffix, sha256 of the bytes) -> sha256 of what it keeps


def code_digest(extra: dict[str, str] | None = None) -> dict:
    """``{"sha256": digest of all, "files": {path: sha256}}`` over :func:`code_files` (Python
    normalised by :func:`normalised_code`, data as bytes) and ``extra`` (name -> text, e.g. the
    quickstart's code as the README shows it)."""
    files = {}
    for path in code_files():
        data = path.read_bytes()
        key = (normalised_code, path.suffix, hashlib.sha256(data).hexdigest())
        if key not in _DIGESTS:  # parsing every module takes seconds: once per content
            if path.suffix == ".py":
                data = normalised_code(data.decode()).encode()
            _DIGESTS[key] = hashlib.sha256(data).hexdigest()
        files[path.relative_to(REPO_ROOT).as_posix()] = _DIGESTS[key]
    for name, text in (extra or {}).items():
        files[name] = hashlib.sha256(text.encode()).hexdigest()
    total = hashlib.sha256("".join(f"{k} {v}\n" for k, v in sorted(files.items())).encode())
    return {"sha256": total.hexdigest(), "files": files}


def changed_files(recorded: dict, current: dict) -> list[str]:
    """The files whose digest differs between two :func:`code_digest` results (added and
    removed ones included)."""
    a, b = recorded["files"], current["files"]
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


def quickstart_code(readme_text: str) -> str:
    section = readme_text.split(QUICKSTART_HEADING, 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def block_digest(name: str, readme_text: str) -> dict:
    """The code digest a block depends on: the package, and for the quickstart its code."""
    extra = {"README.md#quickstart": quickstart_code(readme_text)} if name == "quickstart" else {}
    return code_digest(extra)


# --- where and how it ran -------------------------------------------------------------------


def machine() -> dict:
    """The CPU model, its logical CPUs, the CPUs this process may run on and torch's threads."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {"cpu": model, "logical_cpus": os.cpu_count(), "allowed_cpus": allowed,
            "torch_threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "load_average_before": round(os.getloadavg()[0], 2),
            "python": platform.python_version(), "torch": torch.__version__}


def _commit() -> dict:
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True,
                              text=True).stdout.strip()

    return {"commit": git("rev-parse", "--short=10", "HEAD") or None,
            "uncommitted_changes": bool(git("status", "--porcelain", "--", "powerlaw_fast"))}


def run_timed(command: list[str], cwd: Path, env: dict) -> dict:
    """Run ``command``, echo and capture its output; wall seconds and the child's CPU seconds
    (user + system), both including the interpreter's start and the imports."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    sys.stdout.write(proc.stdout)
    sys.stderr.write(proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} exited with {proc.returncode}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"stdout": proc.stdout, "stderr": proc.stderr, "wall_seconds": round(wall, 1),
            "cpu_seconds": round(cpu, 1)}


def _child_env() -> dict:
    env = dict(os.environ)
    env.pop("POWERLAW_FAST_DATA", None)  # the shipped subset, as the README says
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    return env


def run_block(name: str) -> dict:
    """Run one block's command and return its record entry (without the README text)."""
    text = README.read_text()
    entry = {"date": datetime.datetime.now(datetime.timezone.utc).date().isoformat(),
             **_commit(), "machine": machine(), "code": block_digest(name, text)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if name == "demo":
            out = tmp / "demo"
            entry["command"] = "python -m powerlaw_fast demo --no-progress"
            entry.update(run_timed([sys.executable, "-m", "powerlaw_fast", "demo",
                                    "--no-progress", "--out", str(out)], tmp, _child_env()))
            RECORD_DIR.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(out / "summary.json", DEMO_SUMMARY)
            demo = json.loads((out / "demo.json").read_text())
            entry["settings"] = demo["settings"]
            entry["figures"] = demo["figures"]
            for figure in demo["figures"]:
                shutil.copyfile(out / figure, RECORD_DIR / f"demo-{figure}")
        else:
            script = tmp / "quickstart.py"
            script.write_text(quickstart_code(text))
            entry["command"] = "python quickstart.py (the README's code)"
            entry.update(run_timed([sys.executable, str(script)], tmp, _child_env()))
    return entry


# --- the README text made from a record -----------------------------------------------------


def where(entry: dict) -> str:
    """``one core of a 2-core AMD EPYC (taskset ..., OMP_NUM_THREADS=1; torch 2.13.0+cpu,
    2026-12-03)``."""
    m = entry["machine"]
    allowed = m.get("allowed_cpus") or []
    cores = m["logical_cpus"]
    if allowed and len(allowed) < cores:
        part = ("one core" if len(allowed) == 1 else f"{len(allowed)} cores") + " of a"
        pinned = f"`taskset -c {','.join(map(str, allowed))}`, "
    else:
        part, pinned = "a", ""
    threads = f"{m['torch_threads']} thread" + ("s" if m["torch_threads"] != 1 else "")
    return (f"{part} {cores}-core {m['cpu']} ({pinned}{threads}; torch {m['torch']}, "
            f"{entry['date']})")


def timing(entry: dict) -> str:
    """``25 s of CPU time (41 s of wall time: the core was shared with other work)``."""
    cpu, wall = entry["cpu_seconds"], entry["wall_seconds"]
    text = f"{cpu:.0f} s of CPU time, imports included"
    if wall > 1.2 * cpu:
        return f"{text} ({wall:.0f} s of wall time: the core was shared with other work)"
    return f"{text} ({wall:.0f} s of wall time)"


def _mean_std(stat: dict, digits: int) -> str:
    return f"{stat['mean']:.{digits}f} +- {stat['std']:.{digits}f}"


def render_demo(entry: dict, summary: dict) -> str:
    """The README's demo block from the record and the demo's summary: where and how long, the
    claims table exactly as the demo prints it, the clean accuracies, and what they add up to."""
    from powerlaw_fast.paper.experiments.demo import ALPHA_TOLERANCE, claims_table_from_summary

    (figure,) = summary["figures"]
    curves = figure["curves"]
    by_scheme = {(c["variant"], c["scheme"]): c for c in curves}
    vanilla = by_scheme[("vanilla", None)]
    paper = by_scheme[("specreg", None)]
    fresh = by_scheme[("specreg", "fresh-basis")]
    settings = entry["settings"]
    steps = -(-settings["train_images"] // settings["batch_size"]) * settings["epochs"]
    pgd = vanilla["robustness"]["pgd"]
    at = max(i for i, e in enumerate(pgd["eps"]) if 0 < e <= 0.1 + 1e-9)
    eps = pgd["eps"][at]

    def gain(curve):
        return curve["robustness"]["pgd"]["mean"][at] - pgd["mean"][at]

    def dims(curve):
        return curve["effective_dimension"]["mean"] / vanilla["effective_dimension"]["mean"]

    near = [abs(c["alpha_tau_to_n"]["mean"] - 1.0) <= ALPHA_TOLERANCE for c in (paper, fresh)]
    spectra = {(False, False): "neither regularised spectrum is",
               (True, True): "both regularised spectra are",
               (True, False): "only the paper scheme's spectrum is",
               (False, True): "only the fresh basis's spectrum is"}[tuple(near)]
    table = claims_table_from_summary(figure)
    return (
        f"On {where(entry)} it took {timing(entry)}, and printed:\n\n"
        f"```\n{table}\n```\n\n"
        f"with clean accuracy {_mean_std(vanilla['test_accuracy'], 3)} (vanilla), "
        f"{_mean_std(paper['test_accuracy'], 3)} (the paper's basis) and "
        f"{_mean_std(fresh['test_accuracy'], 3)} (the fresh basis). At this scale ({steps} "
        f"steps) {spectra} within {ALPHA_TOLERANCE:g} of 1/n; PGD accuracy at eps {eps:g} "
        f"rises by {gain(paper):.3f} over vanilla with the paper's basis and by "
        f"{gain(fresh):.3f} with the fresh one, and the 90%-variance dimension is "
        f"{dims(paper):.1f}x and {dims(fresh):.1f}x vanilla's. The run's summary (every curve "
        f"seed by seed) and figures: `benchmarks/results/cpu/readme/`; other CPUs and thread "
        f"counts print slightly different digits."
    )


def render_quickstart(entry: dict) -> str:
    return (f"On {where(entry)} it took {timing(entry)}, and printed:\n\n"
            f"```text\n{entry['stdout'].rstrip()}\n```")


def render_demo_time(entry: dict) -> str:
    """``142 s of CPU time on one core of a 2-core AMD EPYC``: the first screen's time."""
    m = entry["machine"]
    part = "one core of a" if len(m.get("allowed_cpus") or []) == 1 < m["logical_cpus"] else "a"
    return f"{entry['cpu_seconds']:.0f} s of CPU time on {part} {m['logical_cpus']}-core {m['cpu']}"


def _wrap(text: str) -> str:
    """Prose paragraphs wrapped at 96 columns, as the README's text is; fenced code kept."""
    def fill(paragraph: str) -> str:  # "0.888 +- 0.001" stays on one line
        return textwrap.fill(paragraph.replace(" +- ", "\0+-\0"), 96, break_long_words=False,
                             break_on_hyphens=False).replace("\0", " ")

    parts = re.split(r"(```.*?```)", text, flags=re.S)
    return "".join(part if part.startswith("```") or not part.strip() else
                   "\n\n".join(fill(p) if p.strip() else p for p in part.split("\n\n"))
                   for part in parts)


def rendered(record: dict, summary: dict | None) -> dict[str, str]:
    """Marker name -> README text, from a record (and the demo's summary)."""
    out = {}
    if "demo" in record["blocks"]:
        entry = record["blocks"]["demo"]
        out["demo"] = _wrap(render_demo(entry, summary))
        out["demo-time"] = render_demo_time(entry)
    if "quickstart" in record["blocks"]:
        out["quickstart"] = _wrap(render_quickstart(record["blocks"]["quickstart"]))
    return out


def readme_blocks(text: str) -> dict[str, str]:
    """Marker name -> the README's text between that name's markers (None where absent)."""
    out = {}
    for name in BLOCKS:
        start, end = markers(name)
        found = re.search(re.escape(start) + r"\n(.*?)\n" + re.escape(end), text, re.S)
        out[name] = found.group(1) if found else None
    found = re.search(re.escape(DEMO_TIME[0]) + "(.*?)" + re.escape(DEMO_TIME[1]), text, re.S)
    out["demo-time"] = found.group(1) if found else None
    return out


def write_readme(text: str, blocks: dict[str, str]) -> str:
    for name, body in blocks.items():
        if name == "demo-time":
            start, end = DEMO_TIME
            pattern = re.escape(start) + ".*?" + re.escape(end)
            new = f"{start}{body}{end}"
        else:
            start, end = markers(name)
            pattern = re.escape(start) + r"\n.*?" + re.escape(end)
            new = f"{start}\n{body}\n{end}"
        found = list(re.finditer(pattern, text, re.S))
        if len(found) != 1:
            raise SystemExit(f"README: expected one {start} ... {end}")
        text = text[:found[0].start()] + new + text[found[0].end():]
    return text


def load_record() -> tuple[dict, dict | None]:
    record = json.loads(RECORD.read_text())
    summary = json.loads(DEMO_SUMMARY.read_text()) if DEMO_SUMMARY.is_file() else None
    return record, summary


def stale(record: dict, summary: dict | None, text: str) -> list[str]:
    """What no longer holds between the README, the record and the code (empty: all good)."""
    problems = []
    current = readme_blocks(text)
    for name, body in rendered(record, summary).items():
        if current.get(name) != body:
            problems.append(f"README block {name!r} differs from what the record renders")
    for name, entry in record["blocks"].items():
        changed = changed_files(entry["code"], block_digest(name, text))
        if changed:
            problems.append(f"{name}: the code changed since the recorded run: "
                            f"{', '.join(changed)}")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("blocks", nargs="*", metavar="BLOCK",
                        help=f"which to run, of {', '.join(BLOCKS)} (default: both)")
    parser.add_argument("--check", action="store_true",
                        help="run nothing; exit 1 when the README, the record or the code differ")
    parser.add_argument("--render", action="store_true",
                        help="run nothing; rewrite the README's blocks from the record")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.blocks) - set(BLOCKS))
    if unknown:
        parser.error(f"unknown block(s) {', '.join(unknown)}: expected {', '.join(BLOCKS)}")
    if args.check:
        problems = stale(*load_record(), README.read_text())
        for p in problems:
            print(p)
        print("README numbers: " + ("stale; rerun python benchmarks/readme_numbers.py"
                                    if problems else "up to date"))
        return 1 if problems else 0
    record = json.loads(RECORD.read_text()) if RECORD.is_file() else {"format": 1, "blocks": {}}
    for name in [] if args.render else args.blocks or BLOCKS:
        print(f"== {name}", flush=True)
        record["blocks"][name] = run_block(name)
    summary = json.loads(DEMO_SUMMARY.read_text()) if DEMO_SUMMARY.is_file() else None
    blocks = rendered(record, summary)
    for name, entry in record["blocks"].items():
        entry["readme"] = blocks[name]
    RECORD_DIR.mkdir(parents=True, exist_ok=True)
    RECORD.write_text(json.dumps(record, indent=1) + "\n")
    README.write_text(write_readme(README.read_text(), blocks))
    print(f"wrote {RECORD.relative_to(REPO_ROOT)} and the README's blocks: {', '.join(blocks)}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO_ROOT))
    raise SystemExit(main())
