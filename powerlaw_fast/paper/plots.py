"""The paper's figures from run JSONs (see :mod:`powerlaw_fast.paper.experiments`).

- Eigenspectra on log-log axes (mean over seeds, a +-1 standard deviation band), the 1/n target
  anchored at rank tau, a star where the cumulative variance passes 90%, the ranks n < tau,
  which the penalty leaves free, shaded grey, and the ranks the power-law fit uses marked by a
  bar along the bottom; each curve's legend entry gives its fitted exponent and 90% rank (Fig.
  2A); the data set in the title. Beside it, when runs are regularised, the penalty per epoch
  per unit beta (mean +- 1 std over seeds): whether training drives it down.
- Test accuracy against the L-inf radius epsilon for FGSM and PGD (and the noise sigma for
  white noise), mean with a +-1 standard deviation band and error bars over seeds (Fig. 2B, C;
  4; 5).
- Sensitivity maps d lambda_n / d x (eq. 9), one row per variant: the input digit, then one
  column per rank, each map on its own symmetric colour scale (a colour bar shows it as a
  fraction of the map's largest magnitude, printed under the map) (Fig. 2D, 3).
- With several betas per regularised variant and seeds that chose different ones, robustness
  with each seed's best beta (the paper shows "the results of the best one"), the chosen
  betas in the legend. When every seed chose the same beta, the robustness figure marks that
  curve instead.

Readability: one colour per family of curves (a variant and its scheme) and one line style
per beta, and every legend outside the panels, below or beside them.

Files: ``<experiment>[-<arch>]-{spectra,robustness,best-beta,sensitivity}.png``
(``shallow-spectra.png``, ``whitening-mlp-robustness.png``); the command line writes
``summary.json`` (:mod:`~.experiments.summary`) beside them.

Runs are grouped into figures by (experiment, architecture) and into curves by variant and beta;
each panel is drawn by :mod:`powerlaw_fast.paper.panels`, this module lays them out into
figures and files, and prints the text tables.
matplotlib is imported lazily, with the Agg backend, so the library works without it.

Example::

    python -m powerlaw_fast plot results/       # writes results/figures/*.png
"""

from __future__ import annotations

from collections import OrderedDict, defaultdict
from pathlib import Path

import numpy as np

from .experiments import load_results
from .experiments.summary import best_beta_per_seed, curve_label, group_runs
from .panels import (
    ATTACK_TITLES,
    _pyplot,
    curve_colour,
    curve_styles,
    draw_robustness,
    plot_penalty,
    plot_sensitivity,
    plot_spectra,
    robustness_stats,
)


def figure_stem(key: tuple[str, str]) -> str:
    """``shallow`` for the shallow experiment, ``whitening-mlp`` otherwise."""
    experiment, arch = key
    return experiment if experiment == arch else f"{experiment}-{arch}"


def _figure_legend(fig, axes, ncol: int, where: str = "lower center") -> None:
    """One legend outside the panels (below them, or ``where="right center"`` beside them) for
    every labelled artist of ``axes``, each label once, in the order drawn."""
    entries: OrderedDict = OrderedDict()
    for ax in axes:
        handles, labels = ax.get_legend_handles_labels()
        for handle, label in zip(handles, labels, strict=True):
            entries.setdefault(label, handle)
    if entries:
        fig.legend(list(entries.values()), list(entries), loc=f"outside {where}",
                   ncol=max(1, min(ncol, len(entries))), fontsize=7, frameon=False)


def _uniform_best_betas(groups: OrderedDict) -> dict[str, str]:
    """Label -> legend note for each per-beta curve that is every seed's best beta (then the
    best-beta curve would repeat it: :func:`plot_best_beta` leaves such a variant out)."""
    notes = {}
    for pick in best_beta_per_seed(groups):
        if len(set(pick["betas_by_seed"].values())) == 1:
            label = curve_label(pick["runs"][0])
            notes[label] = " (the best beta of every seed)"
    return notes


def _legend_width(labels: list[str]) -> float:
    """Inches a one-column legend of ``labels`` at font size 7 takes beside the panels."""
    return 0.05 * max(len(label) for label in labels) + 0.6


def plot_group(key: tuple[str, str], groups: OrderedDict, out_dir: Path) -> list[Path]:
    """The figures of one (experiment, arch): spectra, robustness, best beta, sensitivity maps.

    The legends sit outside the panels (below the spectra, beside the robustness curves), one
    entry per curve (colour: the variant and its scheme; line style: the beta). A
    ``<stem>-best-beta.png`` left from an older version is removed when this version draws no
    best-beta figure (every seed chose the same beta)."""
    plt = _pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = figure_stem(key)
    styles = curve_styles(groups)
    written = []
    ncol = 2

    has_penalty = any(r["model"]["regularised_layers"] and r.get("history")
                      for runs in groups.values() for r in runs)
    height = 4.4 + 0.16 * (len(groups) + 4) / ncol
    if has_penalty:
        fig, (ax, pax) = plt.subplots(1, 2, figsize=(11.0, height), layout="constrained",
                                      gridspec_kw={"width_ratios": (1.35, 1.0)})
        if not plot_penalty(groups, pax, styles=styles, legend=False):
            pax.axis("off")
        axes = [ax, pax]
    else:
        fig, ax = plt.subplots(figsize=(6.4, height), layout="constrained")
        axes = [ax]
    plot_spectra(groups, ax, styles=styles, legend=False)
    _figure_legend(fig, axes, ncol)
    written.append(_save(fig, out_dir / f"{stem}-spectra.png", plt))

    stats = {attack: OrderedDict((label, robustness_stats(runs, attack))
                                 for label, runs in groups.items()) for attack in ATTACK_TITLES}
    fig = robustness_figure(stats, styles, plt, "Test accuracy under attack",
                            notes=_uniform_best_betas(groups))
    if fig is not None:
        written.append(_save(fig, out_dir / f"{stem}-robustness.png", plt))

    fig = plot_best_beta(groups, plt)
    if fig is not None:
        written.append(_save(fig, out_dir / f"{stem}-best-beta.png", plt))
    else:
        (out_dir / f"{stem}-best-beta.png").unlink(missing_ok=True)

    fig = plot_sensitivity(groups, plt)
    if fig is not None:
        written.append(_save(fig, out_dir / f"{stem}-sensitivity.png", plt))
    return written


def robustness_figure(stats: dict, styles: dict, plt, title: str, *,
                      notes: dict | None = None):
    """One panel per attack that has a curve (``stats``: attack -> label -> statistics, see
    :func:`draw_robustness`), the legend beside the panels, ``title`` with the seeds and what
    the bands mean; None when no curve has an attack."""
    notes = notes or {}
    attacks = [a for a in ATTACK_TITLES if any(st for st in stats.get(a, {}).values())]
    if not attacks:
        return None
    labels = [label + notes.get(label, "") for label in stats[attacks[0]]]
    fig, axes = plt.subplots(1, len(attacks), squeeze=False, layout="constrained",
                             figsize=(4.4 * len(attacks) + _legend_width(labels),
                                      4.2 + 0.2 * title.count("\n")))
    for ax, attack in zip(axes[0], attacks, strict=True):
        draw_robustness(stats[attack], ax, attack, styles=styles, legend=False, notes=notes)
    seeds = sorted({st["n"] for a in attacks for st in stats[a].values() if st})
    spread = ("one seed" if seeds == [1] else
              f"mean over {seeds[0] if len(seeds) == 1 else f'{seeds[0]}-{seeds[-1]}'} seeds, "
              "band and bars: +-1 std")
    fig.suptitle(f"{title}; {spread}", fontsize=9)
    _figure_legend(fig, axes[0], 1, "right center")
    return fig


BEST_BETA_TITLE = ("Test accuracy with each seed's best beta: the beta whose PGD accuracy, "
                   "averaged over eps > 0, is highest\n(picked on the test set, as in the paper: "
                   "an optimistic curve; every beta's own curve is in the robustness figure)")


def _best_beta_label(variant: str, betas_by_seed: dict) -> str:
    chosen = ", ".join(f"seed {s}: {b:g}" for s, b in sorted(betas_by_seed.items(),
                                                              key=lambda kv: int(kv[0])))
    return f"{variant}, each seed's best beta ({chosen})"


def plot_best_beta(groups: OrderedDict, plt):
    """Robustness with each seed's best beta, as the paper's main text shows it (sec. 4: "the
    results of the best one"); None when no regularised variant was run with several betas
    or every seed of every variant chose the same beta (that curve is then one of the
    robustness figure's, marked there).

    The curves without beta (vanilla, whitened, Jacobian) and, for each regularised variant,
    the run of each seed's best beta (:func:`~.experiments.summary.best_beta_per_seed`: the
    highest PGD accuracy averaged over eps > 0), mean +- 1 std over seeds; the legend names
    the beta each seed chose.
    """
    picks = best_beta_per_seed(groups)
    if not any(len(set(p["betas_by_seed"].values())) > 1 for p in picks):
        return None
    curves = OrderedDict((label, runs) for label, runs in groups.items()
                         if runs[0]["config"].get("beta") is None)
    for pick in picks:
        curves[_best_beta_label(pick["variant"], pick["betas_by_seed"])] = pick["runs"]
    stats = {attack: OrderedDict((label, robustness_stats(runs, attack))
                                 for label, runs in curves.items()) for attack in ATTACK_TITLES}
    return robustness_figure(stats, _one_colour_each(curves), plt, BEST_BETA_TITLE)


def _one_colour_each(curves) -> dict:
    return {label: {"color": curve_colour(i, len(curves)), "linestyle": "-"}
            for i, label in enumerate(curves)}


def plot_summary(summary: dict, out_dir) -> list[Path]:
    """Redraw what a ``summary.json`` alone holds (:mod:`~.experiments.summary`), for a folder
    kept without its run JSONs: per figure, the robustness figure and, when seeds chose
    different betas, the best-beta figure, as :func:`plot_group` draws them. The spectra and
    the sensitivity maps need the run JSONs (the summary keeps neither the eigenvalues nor
    the maps). Returns the written paths."""
    plt = _pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for figure in summary["figures"]:
        stem = figure_stem((figure["experiment"], figure["arch"]))
        curves = OrderedDict((c["label"], c) for c in figure["curves"])
        notes, best = {}, OrderedDict()
        for entry in figure.get("best_beta") or []:
            variant = entry["variant"] + (f" {entry['scheme']}" if entry.get("scheme") else "")
            betas = entry["selection"]["betas_by_seed"]
            if len(set(betas.values())) == 1:
                notes[f"{variant} (beta={next(iter(betas.values())):g})"] = (
                    " (the best beta of every seed)")
            best[_best_beta_label(variant, betas)] = entry
        stats = {attack: OrderedDict((label, c["robustness"].get(attack))
                                     for label, c in curves.items()) for attack in ATTACK_TITLES}
        fig = robustness_figure(stats, curve_styles(curves), plt, "Test accuracy under attack",
                                notes=notes)
        if fig is not None:
            written.append(_save(fig, out_dir / f"{stem}-robustness.png", plt))
        if best and len(notes) < len(best):
            chosen = OrderedDict((label, c) for label, c in curves.items()
                                 if c.get("beta") is None)
            chosen.update(best)
            stats = {attack: OrderedDict((label, c["robustness"].get(attack))
                                         for label, c in chosen.items())
                     for attack in ATTACK_TITLES}
            fig = robustness_figure(stats, _one_colour_each(chosen), plt, BEST_BETA_TITLE)
            if fig is not None:
                written.append(_save(fig, out_dir / f"{stem}-best-beta.png", plt))
        else:
            (out_dir / f"{stem}-best-beta.png").unlink(missing_ok=True)
    return written


def _save(fig, path: Path, plt) -> Path:
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def check_grids(groups_by_figure: OrderedDict) -> None:
    """Raise ``ValueError`` when the seeds of one curve were attacked on different grids.

    A curve averages its seeds point by point, so they must share the grid; different curves
    may have different grids (each is drawn on its own, the tables use the union).
    """
    for groups in groups_by_figure.values():
        for label, runs in groups.items():
            for attack in ATTACK_TITLES:
                have = [r for r in runs if attack in r.get("robustness", {})]
                for r in have[1:]:
                    a, b = have[0]["robustness"][attack]["eps"], r["robustness"][attack]["eps"]
                    if [round(e, 9) for e in a] != [round(e, 9) for e in b]:
                        raise ValueError(
                            f"{attack} grids differ between runs {have[0]['name']} ({a}) and "
                            f"{r['name']} ({b}) of the curve {label!r}: its seeds must share one "
                            "grid (rerun one of them, or plot them from separate folders)"
                        )


def plot_results(results_dir, out_dir=None, *, results: list[dict] | None = None) -> list[Path]:
    """Redraw every figure from the complete run JSONs under ``results_dir``.

    Figures go to ``out_dir`` (default ``results_dir/figures``). Returns the written paths.
    ``results``: the already loaded runs (default: :func:`load_results` of ``results_dir``).
    Raises ``FileNotFoundError`` when the folder is missing and ``ValueError`` when it holds no
    complete run, a complete run lacks a key, or the seeds of a curve have different grids
    (all checked before any figure is written).
    """
    if results is None:
        results = load_results(results_dir)
    if not results:
        raise ValueError(f"results_dir: no complete run JSON files in {results_dir}")
    out_dir = Path(out_dir) if out_dir is not None else Path(results_dir) / "figures"
    by_figure = group_runs(results)
    check_grids(by_figure)
    written = []
    for key, groups in by_figure.items():
        written.extend(plot_group(key, groups, out_dir))
    return written


def summary_table(results: list[dict], attack: str) -> str:
    """A text table: eps (sigma for noise) down the rows, each curve's mean accuracy across.

    With several seeds a cell is ``mean +- std``; a curve without a point at some eps shows
    ``-`` there (the rows are the union of the grids).
    """
    groups = OrderedDict()
    for runs in group_runs(results).values():
        groups.update(runs)
    labels = [lab for lab, runs in groups.items()
              if any(attack in r.get("robustness", {}) for r in runs)]
    if not labels:
        return ""
    cells: dict = {}
    grid: set = set()
    many = False
    for lab in labels:
        runs = [r for r in groups[lab] if attack in r["robustness"]]
        many = many or len(runs) > 1
        per_eps = defaultdict(list)
        for r in runs:
            curve = r["robustness"][attack]
            for e, a in zip(curve["eps"], curve["accuracy"], strict=True):
                per_eps[round(float(e), 9)].append(a)
        for e, accs in per_eps.items():
            grid.add(e)
            cells[lab, e] = (float(np.mean(accs)), float(np.std(accs)), len(accs))
    width = max(16 if many else 12, *(len(lab) + 2 for lab in labels))
    head = "sigma" if attack == "noise" else "eps"
    lines = [f"{ATTACK_TITLES.get(attack, attack)}: test accuracy",
             f"{head:>6}" + "".join(f"{lab:>{width}}" for lab in labels)]
    for e in sorted(grid):
        row = f"{e:>6.3f}"
        for lab in labels:
            if (lab, e) not in cells:
                row += f"{'-':>{width}}"
                continue
            mean, std, k = cells[lab, e]
            text = f"{mean:.3f} +- {std:.3f}" if k > 1 else f"{mean:.3f}"
            row += f"{text:>{width}}"
        lines.append(row)
    return "\n".join(lines)


def print_tables(results: list[dict], note: str = "") -> None:
    """Print :func:`summary_table` for each attack that has results, each followed by ``note``."""
    for attack in ("fgsm", "pgd", "noise"):
        table = summary_table(results, attack)
        if table:
            print(table + note)
            print()
