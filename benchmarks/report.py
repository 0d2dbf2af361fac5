"""Speed tables, a speedup plot and target verdicts from the committed benchmark JSON.

Reads every ``benchmarks/results/<gpu-name>/*.json`` written by ``bench_penalty.py``,
``bench_training.py`` and ``bench_attacks.py`` (layout
``{"device", "torch", "triton", "date", "commit", "rows": [...]}``) and

1. prints one markdown speed table per benchmark (times in ms are medians; a ratio is
   ``baseline ms / ours ms``, so > 1 means this library is faster),
2. draws the penalty's speedup over each baseline against N into
   ``benchmarks/results/<gpu-name>/penalty_speedup.png``,
3. with ``--write-readme``, replaces the README text between the lines
   ``<!-- speed-table:start -->`` and ``<!-- speed-table:end -->`` with the same report, so the
   README's numbers always come from committed JSON (the README is left alone when the markers
   are absent),
4. lists each speed target with "met", "NOT met (measured gap)" or "not measured".

    python benchmarks/report.py                      # print the report, write the plots
    python benchmarks/report.py --write-readme       # ... and rewrite README.md's marked block
    python benchmarks/report.py --results DIR --readme PATH --no-plot

Only reads JSON (no torch import); matplotlib is needed for the plot only.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RESULTS = REPO_ROOT / "benchmarks" / "results"
DEFAULT_README = REPO_ROOT / "README.md"
START_MARKER = "<!-- speed-table:start -->"
END_MARKER = "<!-- speed-table:end -->"
BENCHMARKS = ("penalty", "training", "attacks")

PENALTY_OURS = ("triton", "cuda")
PENALTY_BASELINES = ("torch_projection", "torch_covariance", "authors_loop", "eigvalsh",
                     "gemm_floor")
ATTACK_OURS = ("ours_graph", "ours_eager", "ours", "ours_cuda")
ATTACK_BASELINES = ("plain_loop", "torchattacks")
ACCURACY_TOLERANCE_PP = 0.1


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


def plot_penalty_speedup(f: ResultFile, out_path: Path | None = None) -> Path | None:
    """Speedup of ours over each baseline against N, one line per (ours, baseline, dtype /
    precision), log-log; written next to the JSON as ``penalty_speedup.png``. None when the file
    has no pair of ours and a baseline to compare."""
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
    if "gemm_floor" in baselines:
        ax.axhline(1 / 1.25, color="grey", linestyle=":", linewidth=0.8,
                   label="gemm_floor target (ours within 1.25x)")
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
    """Largest |accuracy difference| over the epsilon grid, in percentage points."""
    acc_a, acc_b = (a or {}).get("accuracy"), (b or {}).get("accuracy")
    if not acc_a or not acc_b or len(acc_a) != len(acc_b):
        return None
    return 100 * max(abs(x - y) for x, y in zip(acc_a, acc_b, strict=True))


def attacks_table(files: list[ResultFile]) -> str:
    headers = ["GPU", "model", "attack", "shape", "dtype / precision", "ours", "ours ms"]
    headers += [f"{b} ms (ratio)" for b in ATTACK_BASELINES]
    headers += ["max acc. gap vs torchattacks (pp)"]
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


# ----------------------------------------------------------------------------- targets
@dataclass
class Check:
    """One measured setting of a target: e.g. float32/highest, 2.3x at N = 1024."""

    setting: str
    ok: bool
    text: str


@dataclass
class Verdict:
    benchmark: str
    scope: str  # "<GPU>, <our implementation>"
    target: str
    checks: list[Check]
    missing: str = ""  # why nothing was measured

    @property
    def status(self) -> str:
        if not self.checks:
            return "not measured"
        return "met" if all(c.ok for c in self.checks) else "NOT met"

    def line(self) -> str:
        if not self.checks:
            detail = self.missing
        elif self.status == "met":
            detail = "; ".join(f"{c.setting}: {c.text}" for c in self.checks)
        else:
            detail = "; ".join(f"{c.setting}: {c.text}" for c in self.checks if not c.ok)
        tail = f" ({detail})" if detail else ""
        return f"- {self.benchmark} [{self.scope}]: {self.target}: {self.status}{tail}"


@dataclass
class PenaltyTarget:
    text: str
    baseline: str
    applies: Callable[[int], bool]
    kind: str  # "speedup": baseline/ours >= bound; "within": ours/baseline <= bound
    bound: float


PENALTY_TARGETS = (  # issue 11, H100/H200, same run
    PenaltyTarget(">= 3x torch_projection at N <= 2048", "torch_projection",
                  lambda n: n <= 2048, "speedup", 3.0),
    PenaltyTarget(">= 1.5x compiled_projection at N <= 2048", "compiled_projection",
                  lambda n: n <= 2048, "speedup", 1.5),
    PenaltyTarget(">= 1.5x torch_projection at N = 4096", "torch_projection",
                  lambda n: n == 4096, "speedup", 1.5),
    PenaltyTarget("within 1.10x of gemm_floor at N >= 8192", "gemm_floor",
                  lambda n: n >= 8192, "within", 1.10),
    PenaltyTarget("never slower than torch_projection", "torch_projection",
                  lambda n: True, "speedup", 1.0),
)
TRAINING_TARGETS = (
    "paper's MLP: specreg step <= 1.3x vanilla eager, <= 1.25x graphed with the penalty in bf16",
    "eigenbasis refresh < 1 s",
)
ATTACK_TARGET = (f">= 3x torchattacks with robust accuracy within {ACCURACY_TOLERANCE_PP} pp")


def _penalty_check(index, target: PenaltyTarget, ours: str, dtype, precision) -> Check | None:
    """The worst N the target covers in this setting, or None when none was measured."""
    values = []
    for N, dt, prec, impl in index:
        if (dt, prec, impl) != (dtype, precision, target.baseline) or not target.applies(N):
            continue
        mine = index.get((N, dtype, precision, ours))
        if mine is None:
            continue
        theirs = index[(N, dt, prec, impl)]["median_ms"]
        if target.kind == "speedup":
            values.append((theirs / mine["median_ms"], N))
        else:
            values.append((mine["median_ms"] / theirs, N))
    if not values:
        return None
    if target.kind == "speedup":
        value, N = min(values)
        return Check(f"{dtype}/{precision}", value >= target.bound,
                     f"{fmt_ratio(value)} at N={N}, target >= {fmt_ratio(target.bound)}")
    value, N = max(values)
    return Check(f"{dtype}/{precision}", value <= target.bound,
                 f"{fmt_ratio(value)} the floor at N={N}, target <= {fmt_ratio(target.bound)}")


def penalty_verdicts(files: list[ResultFile]) -> list[Verdict]:
    verdicts = []
    for f in files:
        index = _penalty_index(f)
        ours = [o for o in PENALTY_OURS if any(k[3] == o for k in index)] or [PENALTY_OURS[0]]
        for o in ours:
            for target in PENALTY_TARGETS:
                checks = [_penalty_check(index, target, o, *s) for s in _settings(_timed(f.rows))]
                checks = [c for c in checks if c is not None]
                verdicts.append(Verdict("penalty", f"{f.device}, {o}", target.text, checks,
                                        missing=f"no {o} and {target.baseline} rows at those N"))
    return verdicts or [Verdict("penalty", "no GPU", t.text, [], "no penalty.json")
                        for t in PENALTY_TARGETS]


def training_verdicts(files: list[ResultFile]) -> list[Verdict]:
    verdicts = []
    for f in files:
        rows = _timed(f.rows)
        steps = {_step_key(r): r for r in rows if r.get("op") == "train_step"}
        step_checks = []
        for (model, execution, dtype, mode, penalty_dtype), r in steps.items():
            vanilla = steps.get((model, execution, dtype, "vanilla", "model"))
            if mode != "specreg" or model != "mlp" or vanilla is None:
                continue
            limit = 1.3 if execution == "eager" else 1.25
            if execution != "eager" and penalty_dtype != "bfloat16":
                continue  # graphed, full precision: reported in the table against ~1.7x
            overhead = r["median_ms"] / vanilla["median_ms"]
            step_checks.append(Check(f"{execution} {dtype}, penalty {penalty_dtype}",
                                     overhead <= limit,
                                     f"{fmt_ratio(overhead)} vanilla, target <= {limit:.2f}x"))
        refresh_checks = [
            Check(str(r.get("mode")), r["median_ms"] < 1000.0,
                  f"{r['median_ms'] / 1000:.2f} s, target < 1 s")
            for r in rows if r.get("op") == "refresh"
        ]
        scope = f"{f.device}, SpectralRegularizer"
        verdicts.append(Verdict("training", scope, TRAINING_TARGETS[0], step_checks,
                                "no specreg and vanilla train_step rows"))
        verdicts.append(Verdict("training", scope, TRAINING_TARGETS[1], refresh_checks,
                                "no refresh rows"))
    return verdicts or [Verdict("training", "no GPU", t, [], "no training.json")
                        for t in TRAINING_TARGETS]


def attack_verdicts(files: list[ResultFile]) -> list[Verdict]:
    verdicts = []
    for f in files:
        index = _attack_index(f)
        cases = list(dict.fromkeys(k[:2] for k in index))
        ours = _in_order([k[2] for k in index if k[2] in ATTACK_OURS], ATTACK_OURS)
        for o in ours:
            checks, notes = [], []
            for model, attack in cases:
                mine = index.get((model, attack, o))
                theirs = index.get((model, attack, "torchattacks"))
                if mine is None or "median_ms" not in mine:
                    continue
                if theirs is None or "median_ms" not in theirs:
                    notes.append(f"{model}/{attack}: "
                                 f"{(theirs or {}).get('note', 'no torchattacks row')}")
                    continue
                speedup = theirs["median_ms"] / mine["median_ms"]
                gap = max_accuracy_gap_pp(mine, theirs)
                ok = speedup >= 3.0 and gap is not None and gap <= ACCURACY_TOLERANCE_PP + 1e-9
                gap_text = "accuracy not recorded" if gap is None else f"{gap:.2f} pp"
                checks.append(Check(f"{model}/{attack}", ok, f"{fmt_ratio(speedup)}, {gap_text}"))
            verdicts.append(Verdict("attacks", f"{f.device}, {o}", ATTACK_TARGET, checks,
                                    "; ".join(notes) or "no torchattacks rows"))
    return verdicts or [Verdict("attacks", "no GPU", ATTACK_TARGET, [], "no attacks.json")]


def all_verdicts(files: list[ResultFile]) -> list[Verdict]:
    by_name = {name: [f for f in files if f.benchmark == name] for name in BENCHMARKS}
    return (penalty_verdicts(by_name["penalty"]) + training_verdicts(by_name["training"])
            + attack_verdicts(by_name["attacks"]))


# ----------------------------------------------------------------------------- report
def render_report(files: list[ResultFile], base: Path, plots: dict[Path, Path] | None = None
                  ) -> str:
    """The whole markdown report: one section per benchmark present, then the targets.
    ``base`` is the folder paths are written relative to (the README's); ``plots`` maps a
    penalty JSON to its plot."""
    plots = plots or {}
    by_name = {name: [f for f in files if f.benchmark == name] for name in BENCHMARKS}
    parts = [
        "_Generated by `python benchmarks/report.py --write-readme` from the committed "
        "`benchmarks/results/<gpu>/*.json`; do not edit by hand. Times are medians in ms; "
        "ratio = baseline ms / ours ms (> 1: this library is faster)._"
    ]
    if by_name["penalty"]:
        parts += ["### Spectral penalty, forward + backward (B = 1.5 N)",
                  penalty_table(by_name["penalty"]), sources(by_name["penalty"], base)]
        parts += [f"![penalty speedup, {f.device}]({display_path(plots[f.path], base)})"
                  for f in by_name["penalty"] if f.path in plots]
    if by_name["training"]:
        parts += ["### Training step and eigenbasis refresh",
                  training_tables(by_name["training"]), sources(by_name["training"], base)]
    if by_name["attacks"]:
        parts += ["### Robustness sweeps (attack + accuracy over the epsilon grid)",
                  attacks_table(by_name["attacks"]), sources(by_name["attacks"], base)]
    parts += ["### Targets", "\n".join(v.line() for v in all_verdicts(files))]
    return "\n\n".join(parts) + "\n"


def replace_marked_block(text: str, block: str) -> str | None:
    """``text`` with the lines between the start and end markers replaced by ``block``; None
    when the markers are absent. ValueError when only one is present, either is repeated or
    they are out of order (the README is then left alone)."""
    starts, ends = text.count(START_MARKER), text.count(END_MARKER)
    if starts == 0 and ends == 0:
        return None
    if starts != 1 or ends != 1:
        raise ValueError(f"README: expected one {START_MARKER!r} and one {END_MARKER!r}, found "
                         f"{starts} and {ends}")
    if text.index(END_MARKER) < text.index(START_MARKER):
        raise ValueError(f"README: {END_MARKER!r} comes before {START_MARKER!r}")
    head, rest = text.split(START_MARKER)
    tail = rest.split(END_MARKER)[1]
    return f"{head}{START_MARKER}\n{block.strip()}\n{END_MARKER}{tail}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS,
                        help="folder holding <gpu-name>/*.json (default benchmarks/results)")
    parser.add_argument("--readme", type=Path, default=DEFAULT_README,
                        help="README whose marked block --write-readme rewrites")
    parser.add_argument("--write-readme", action="store_true",
                        help=f"replace the README text between {START_MARKER} and {END_MARKER}")
    parser.add_argument("--no-plot", action="store_true", help="do not write the PNG plots")
    args = parser.parse_args(argv)

    files = load_results(args.results)
    if not files:
        print(f"no results JSON under {args.results}/<gpu-name>/: nothing to report, "
              "nothing written")
        return 0
    for f in files:
        if f.benchmark not in BENCHMARKS:
            print(f"skipped {f.path}: not one of {', '.join(BENCHMARKS)}")
    plots = {}
    if not args.no_plot:
        for f in files:
            if f.benchmark == "penalty":
                out = plot_penalty_speedup(f)
                if out is not None:
                    plots[f.path] = out
                    print(f"wrote {out}")
    report = render_report(files, args.readme.resolve().parent, plots)
    print(report)
    if args.write_readme:
        text = args.readme.read_text()
        new_text = replace_marked_block(text, report)
        if new_text is None:
            print(f"{args.readme}: no {START_MARKER} / {END_MARKER} lines; README not changed")
        elif new_text == text:
            print(f"{args.readme}: speed block already up to date")
        else:
            args.readme.write_text(new_text)
            print(f"{args.readme}: speed block rewritten")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
