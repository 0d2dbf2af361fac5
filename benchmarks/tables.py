"""The bottom of the benchmark report: results I/O, speed tables and a speedup plot from the
committed benchmark JSON (the targets and verdicts are in ``benchmarks/targets.py`` above it,
the whole report and the README's block in ``benchmarks/readme_block.py``, the command line in
``benchmarks/report.py``; each imports only what is below it).

Reads every ``benchmarks/results/<gpu-name>/*.json`` written by ``bench_penalty.py``,
``bench_training.py`` and ``bench_attacks.py`` (layout
``{"device", "torch", "triton", "date", "commit", "rows": [...]}``), makes one markdown speed
table per benchmark (times in ms are medians; a ratio is ``baseline ms / ours ms``, so > 1
means this library is faster) and draws the penalty's speedup over each baseline against N
into ``benchmarks/results/<gpu-name>/penalty_speedup.png``.

Only reads JSON (no torch import); matplotlib is needed for the plot only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RESULTS = REPO_ROOT / "benchmarks" / "results"
BENCHMARKS = ("penalty", "training", "attacks")

PENALTY_OURS = ("triton", "cuda")
PENALTY_BASELINES = ("torch_projection", "torch_covariance", "authors_loop", "eigvalsh",
                     "gemm_floor")
# ours by default (graphed, eager, CUDA backend), then the final-iterate and reduced-precision modes
ATTACK_OURS = ("ours_graph", "ours_eager", "ours", "ours_cuda", "ours_final", "ours_tf32",
               "ours_bf16")
ATTACK_BASELINES = ("plain_loop", "torchattacks")


# ----------------------------------------------------------------------------- loading
@dataclass
class ResultFile:
    """One results JSON: which benchmark (the file's stem), where it ran and its rows."""

    path: Path
    benchmark: str
    device: str
    torch: str | None
    triton: str | None
    date: str | None
    commit: str | None
    rows: list[dict]


def load_results(results_dir: str | os.PathLike) -> list[ResultFile]:
    """Every ``<results_dir>/<gpu-name>/*.json``, sorted by path. A file that is not a results
    JSON (bad JSON, no ``rows`` list) raises ValueError naming it: committed numbers must parse."""
    files = []
    for path in sorted(Path(results_dir).glob("*/*.json")):
        try:
            payload = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from err
        if not isinstance(payload, dict) or not isinstance(payload.get("rows"), list):
            raise ValueError(f"{path}: expected an object with a 'rows' list, got "
                             f"{type(payload).__name__} without one")
        files.append(ResultFile(
            path=path, benchmark=path.stem, device=str(payload.get("device") or path.parent.name),
            torch=payload.get("torch"), triton=payload.get("triton"), date=payload.get("date"),
            commit=payload.get("commit"), rows=[r for r in payload["rows"] if isinstance(r, dict)],
        ))
    return files


# ----------------------------------------------------------------------------- formatting
def fmt_ms(ms: float | None) -> str:
    if ms is None:
        return "–"
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:#.3g}"


def fmt_ratio(ratio: float) -> str:
    if ratio >= 100:
        return f"{ratio:.0f}x"
    if ratio >= 10:
        return f"{ratio:.1f}x"
    return f"{ratio:.2f}x"


def ms_and_ratio(baseline_ms: float | None, ours_ms: float | None) -> str:
    """A baseline cell: its time and the speedup ``baseline / ours``."""
    if baseline_ms is None:
        return "–"
    if not ours_ms:
        return fmt_ms(baseline_ms)
    return f"{fmt_ms(baseline_ms)} ({fmt_ratio(baseline_ms / ours_ms)})"


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def display_path(path: Path, base: Path) -> str:
    """``path`` relative to ``base`` (the README's folder) with forward slashes."""
    try:
        return Path(os.path.relpath(path.resolve(), base.resolve())).as_posix()
    except ValueError:  # another drive on Windows
        return path.as_posix()


def sources(files: list[ResultFile], base: Path) -> str:
    """Where each table's numbers come from: file, GPU, versions, date and commit."""
    return "\n".join(
        f"- `{display_path(f.path, base)}`: {f.device}, torch {f.torch}, triton {f.triton}, "
        f"{f.date}, commit `{(f.commit or 'unknown')[:10]}`"
        for f in files
    )


def _timed(rows: Iterable[dict]) -> list[dict]:
    """Rows that carry a time (a note row, e.g. a skipped baseline, has none)."""
    return [r for r in rows if isinstance(r.get("median_ms"), (int, float))]


def _in_order(values: Iterable, preferred: Iterable) -> list:
    """Distinct ``values``: those in ``preferred`` first, in its order, then the rest."""
    seen = list(dict.fromkeys(values))
    return [v for v in preferred if v in seen] + [v for v in seen if v not in preferred]


# ----------------------------------------------------------------------------- penalty
def _penalty_index(f: ResultFile) -> dict[tuple, dict]:
    """(N, dtype, precision, impl) -> row; a repeated key keeps the last row."""
    return {(r["N"], r["dtype"], r["precision"], r["impl"]): r for r in _timed(f.rows)}


def _settings(rows: Iterable[dict], keys=("dtype", "precision")) -> list[tuple]:
    return list(dict.fromkeys(tuple(r.get(k) for k in keys) for r in rows))


def penalty_table(files: list[ResultFile]) -> str:
    """One row per GPU, dtype / precision, N and implementation of ours; one column per
    baseline holding its time and our speedup over it."""
    impls = [r["impl"] for f in files for r in _timed(f.rows)]
    ours = _in_order([i for i in impls if i in PENALTY_OURS], PENALTY_OURS)
    baselines = _in_order([i for i in impls if i not in PENALTY_OURS], PENALTY_BASELINES)
    headers = ["GPU", "N", "B", "dtype / precision", "ours", "ours ms", "ours TFLOP/s"]
    headers += [f"{b} ms (ratio)" for b in baselines]
    table = []
    for f in files:
        index = _penalty_index(f)
        for dtype, precision in _settings(_timed(f.rows)):
            sizes = sorted({k[0] for k in index if k[1:3] == (dtype, precision)})
            for N in sizes:
                for impl in ours:
                    mine = index.get((N, dtype, precision, impl))
                    if mine is None:
                        continue
                    tflops = mine.get("tflops")
                    cells = [f.device, str(N), str(mine.get("B", "")), f"{dtype} / {precision}",
                             impl, fmt_ms(mine["median_ms"]),
                             f"{tflops:.1f}" if isinstance(tflops, (int, float)) else "–"]
                    for b in baselines:
                        other = index.get((N, dtype, precision, b))
                        cells.append(ms_and_ratio(other and other["median_ms"],
                                                  mine["median_ms"]))
                    table.append(cells)
    return markdown_table(headers, table)


def plot_penalty_speedup(
    f: ResultFile, out_path: Path | None = None, *, floor_bound: float | None = None
) -> Path | None:
    """Speedup of ours over each baseline against N, one line per (ours, baseline, dtype /
    precision), log-log; written next to the JSON as ``penalty_speedup.png``; ``floor_bound``
    (the targets' "within x of gemm_floor") drawn as a line. None when the file has no pair of
    ours and a baseline to compare."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    index = _penalty_index(f)
    impls = {k[3] for k in index}
    ours = [i for i in PENALTY_OURS if i in impls]
    baselines = _in_order([i for i in impls if i not in PENALTY_OURS], PENALTY_BASELINES)
    styles = ["-", "--", ":", "-."]
    fig, ax = plt.subplots(figsize=(8, 5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    lines = 0
    for o_i, o in enumerate(ours):
        for s_i, (dtype, precision) in enumerate(_settings(_timed(f.rows))):
            for b_i, b in enumerate(baselines):
                points = sorted(
                    (k[0], index[k]["median_ms"] / index[(k[0], dtype, precision, o)]["median_ms"])
                    for k in index
                    if k[1:] == (dtype, precision, b) and (k[0], dtype, precision, o) in index
                )
                if not points:
                    continue
                ax.plot([p[0] for p in points], [p[1] for p in points],
                        marker="os^v"[o_i % 4], color=colours[b_i % len(colours)],
                        linestyle=styles[s_i % len(styles)],
                        label=f"{o} vs {b}, {dtype}/{precision}")
                lines += 1
    if not lines:
        plt.close(fig)
        return None
    ax.axhline(1.0, color="black", linewidth=0.8)
    if "gemm_floor" in baselines and floor_bound is not None:
        ax.axhline(1 / floor_bound, color="grey", linestyle=":", linewidth=0.8,
                   label=f"gemm_floor target (ours within {floor_bound:.2f}x)")
    ax.set_xscale("log", base=2)
    sizes = sorted({k[0] for k in index})
    ax.set_xticks(sizes, [str(n) for n in sizes])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_yscale("log")
    ax.set_xlabel("layer width N (batch B = 1.5 N)")
    ax.set_ylabel("speedup: baseline ms / ours ms")
    ax.set_title(f"spec_penalty forward+backward, {f.device}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    out_path = Path(out_path) if out_path is not None else f.path.with_name("penalty_speedup.png")
    fig.savefig(out_path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return out_path


# ----------------------------------------------------------------------------- training
def _step_key(r: dict) -> tuple:
    """(model, execution, dtype, mode, penalty dtype); older files lack the first two and the
    last (they held the eager MLP with the penalty in the model's dtype)."""
    return (r.get("model", "mlp"), r.get("execution", "eager"), r.get("dtype"), r.get("mode"),
            r.get("penalty_dtype", "model"))


def training_tables(files: list[ResultFile]) -> str:
    """Train-step time of the regulariser against no penalty and the authors' loop, per model,
    execution, dtype and penalty dtype, and the eigenbasis refresh time."""
    steps, refresh = [], []
    for f in files:
        rows = _timed(f.rows)
        step_rows = {_step_key(r): r for r in rows if r.get("op") == "train_step"}
        for (model, execution, dtype, mode, penalty_dtype), r in step_rows.items():
            vanilla = step_rows.get((model, execution, dtype, "vanilla", "model"))
            steps.append([f.device, model, f"B={r.get('B')}, N={r.get('N')}", execution,
                          f"{dtype} / {r.get('precision')}", mode, penalty_dtype,
                          ms_and_ratio(r["median_ms"], vanilla and vanilla["median_ms"])])
        for r in rows:
            if r.get("op") == "refresh":
                widths = r.get("widths") or [r.get("N")]
                peak = r.get("peak_mem_mb")
                refresh.append([f.device, str(r.get("mode")), str(r.get("B")),
                                ", ".join(str(w) for w in widths), fmt_ms(r["median_ms"]),
                                fmt_ms(peak) if isinstance(peak, (int, float)) else "–"])
    out = [markdown_table(["GPU", "model", "shape", "execution", "dtype / precision", "mode",
                           "penalty dtype", "ms (x vanilla)"], steps)]
    if refresh:
        out.append(markdown_table(["GPU", "model", "samples", "layer widths", "refresh ms",
                                   "peak MB"], refresh))
    return "\n\n".join(out)


# ----------------------------------------------------------------------------- attacks
def _attack_index(f: ResultFile) -> dict[tuple, dict]:
    """(model, attack, impl) -> row, note rows included."""
    return {(r.get("model"), r.get("attack"), r.get("impl")): r for r in f.rows}


def max_accuracy_gap_pp(a: dict | None, b: dict | None) -> float | None:
    """Largest ``accuracy(a) - accuracy(b)`` over the epsilon grid, in percentage points: how
    much weaker attack a is than b at its worst epsilon (negative: stronger everywhere)."""
    acc_a, acc_b = (a or {}).get("accuracy"), (b or {}).get("accuracy")
    if not acc_a or not acc_b or len(acc_a) != len(acc_b):
        return None
    return 100 * max(x - y for x, y in zip(acc_a, acc_b, strict=True))


def attacks_table(files: list[ResultFile]) -> str:
    headers = ["GPU", "model", "attack", "shape", "dtype / precision", "ours", "ours ms"]
    headers += [f"{b} ms (ratio)" for b in ATTACK_BASELINES]
    headers += ["robust acc. above torchattacks, worst eps (pp)"]
    table = []
    for f in files:
        index = _attack_index(f)
        for model, attack in dict.fromkeys(k[:2] for k in index):
            ours = _in_order([k[2] for k in index if k[:2] == (model, attack)
                              and k[2] in ATTACK_OURS and "median_ms" in index[k]], ATTACK_OURS)
            for impl in ours:
                mine = index[(model, attack, impl)]
                eps = mine.get("eps") or []
                steps = mine.get("steps")
                plural = "" if steps == 1 else "s"
                shape = f"n={mine.get('n')} x {len(eps)} eps, {steps} step{plural}"
                cells = [f.device, str(model), str(attack), shape,
                         f"{mine.get('dtype')} / {mine.get('matmul_precision')}", impl,
                         fmt_ms(mine["median_ms"])]
                for b in ATTACK_BASELINES:
                    other = index.get((model, attack, b))
                    if other is not None and "median_ms" not in other:
                        cells.append("skipped")
                    else:
                        cells.append(ms_and_ratio(other and other["median_ms"],
                                                  mine["median_ms"]))
                gap = max_accuracy_gap_pp(mine, index.get((model, attack, "torchattacks")))
                cells.append("–" if gap is None else f"{gap:.2f}")
                table.append(cells)
    return markdown_table(headers, table)

