"""The paper's figures from run JSONs (see :mod:`powerlaw_fast.paper.experiments`).

- Eigenspectra on log-log axes (mean over seeds, a +-1 standard deviation band), the 1/n target
  anchored at rank tau, a star where the cumulative variance passes 90% and the ranks n < tau,
  which the penalty leaves free, shaded grey (Fig. 2A); the data set in the title. Beside it,
  when runs are regularised, the penalty per epoch per unit beta (mean +- 1 std over seeds):
  whether training drives it down.
- Test accuracy against the L-inf radius epsilon for FGSM and PGD (and the noise sigma for
  white noise), mean with a +-1 standard deviation band over seeds (Fig. 2B, C; 4; 5).
- Sensitivity maps d lambda_n / d x (eq. 9), one row per variant: the input digit, then one
  column per rank, on one shared colour scale with a colour bar (Fig. 2D, 3).

- With several betas per regularised variant, robustness with the best beta per seed (the
  paper shows "the results of the best one"), the chosen betas in the legend.

Files: ``<experiment>[-<arch>]-{spectra,robustness,best-beta,sensitivity}.png``
(``shallow-spectra.png``, ``whitening-mlp-robustness.png``); the command line writes
``summary.json`` (:mod:`~.experiments.summary`) beside them.

Runs are grouped into figures by (experiment, architecture) and into curves by variant and beta.
matplotlib is imported lazily, with the Agg backend, so the library works without it.

Example::

    python -m powerlaw_fast plot results/       # writes results/figures/*.png
"""

from __future__ import annotations

from collections import OrderedDict, defaultdict
from pathlib import Path

import numpy as np

from .experiments import load_results
from .experiments.summary import best_beta_per_seed, group_runs

ATTACK_TITLES = {"fgsm": "FGSM", "pgd": "PGD", "noise": "white noise"}


def _pyplot():
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError(
            "plotting needs matplotlib: pip install 'powerlaw-fast[plot]'"
        ) from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def curve_colour(index: int, count: int):
    """The colour of curve ``index`` of ``count``: matplotlib's default cycle up to 10 curves,
    then tab20's 20 colours (the default cycle would repeat a colour in one figure)."""
    if count <= 10:
        return f"C{index}"
    import matplotlib

    return matplotlib.colormaps["tab20"](index % 20)


def _spectrum_layer(runs: list[dict]) -> str:
    """The layer drawn: the last regularised layer, else the last hidden layer."""
    model = runs[0]["model"]
    if model["regularised_layers"]:
        return model["regularised_layers"][-1]
    return list(model["hidden_widths"])[-1]


def _spectra(runs: list[dict], layer: str) -> np.ndarray | None:
    """``[seeds, N]`` eigenvalues of ``layer`` (NaN where a value was not finite)."""
    spectra = []
    for r in runs:
        entry = r.get("spectra", {}).get(layer)
        if entry is None:
            continue
        lam = np.array([v if v is not None else np.nan for v in entry["eigenvalues"]], float)
        spectra.append(lam)
    if not spectra or len({s.size for s in spectra}) != 1:
        return None
    return np.stack(spectra)


def _mean_spectrum(runs: list[dict], layer: str) -> np.ndarray | None:
    spectra = _spectra(runs, layer)
    return None if spectra is None else np.nanmean(spectra, axis=0)


def _effective_dimension(lam: np.ndarray, threshold: float = 0.9) -> int:
    lam = np.clip(np.nan_to_num(lam), 0.0, None)
    total = lam.sum()
    if total <= 0:
        return 0
    return int(np.searchsorted(np.cumsum(lam) / total, threshold)) + 1


def _data_title(runs: list[dict]) -> str:
    data = runs[0].get("data") or {}
    n = data.get("n_train")
    source = str(data.get("source", ""))
    where = "shipped MNIST subset" if source.startswith("shipped") else "MNIST"
    return f"{where}, {n} training images" if n else where


def plot_spectra(groups: OrderedDict, ax, *, layer: str | None = None) -> None:
    """Eigenspectra (log-log) of each group's regularised / last hidden layer."""
    # The 1/n target is anchored at rank tau on the first regularised group's spectrum (the
    # first group's when none is regularised), as the penalty anchors gamma_tau = lambda_tau.
    anchor = None
    tau = None
    layers = []
    for index, (label, runs) in enumerate(groups.items()):
        name = layer or _spectrum_layer(runs)
        lam = _mean_spectrum(runs, name)
        if lam is None:
            continue
        layers.append(name)
        ranks = np.arange(1, lam.size + 1)
        positive = lam > 0
        seeds = f", {len(runs)} seeds" if len(runs) > 1 else ""
        all_seeds = _spectra(runs, name)
        band = ", mean +- 1 std" if all_seeds.shape[0] > 1 else ""
        (line,) = ax.loglog(ranks[positive], lam[positive],
                            label=f"{label} [{name}{seeds}{band}]",
                            color=curve_colour(index, len(groups)), lw=1.5)
        if all_seeds.shape[0] > 1:
            std = np.nanstd(all_seeds, axis=0)
            low = np.where(lam - std > 0, lam - std, lam[positive].min() * 0.5
                           if positive.any() else 1e-12)
            ax.fill_between(ranks[positive], low[positive], (lam + std)[positive],
                            color=curve_colour(index, len(groups)), alpha=0.2, lw=0)
        d = _effective_dimension(lam)
        if 1 <= d <= lam.size and lam[d - 1] > 0:
            ax.plot([d], [lam[d - 1]], marker="*", ms=14, color=line.get_color(),
                    markeredgecolor="k", zorder=5)
        cfg = runs[0]["config"]
        regularised = bool(runs[0]["model"]["regularised_layers"])
        t, alpha = int(cfg.get("tau", 10)), float(cfg.get("alpha", 1.0))
        if (anchor is None or (regularised and not anchor[3])) and lam.size >= t and lam[t - 1] > 0:
            anchor = (ranks, lam[t - 1] * t**alpha, alpha, regularised)
            tau = t
    if anchor is not None:
        ranks, kappa, alpha, _ = anchor
        target = r"$1/n$" if alpha == 1.0 else rf"$n^{{-{alpha:g}}}$"
        ax.loglog(ranks, kappa * ranks**-alpha, "k--", lw=1,
                  label=rf"{target} target, anchored at rank $\tau$ = {tau}")
        # the penalty's sum starts at n = tau: ranks before it are free (eq. 2)
        ax.axvspan(1, tau, color="0.88", zorder=0, label=r"ranks $n < \tau$: not penalised")
    ax.set_xlabel("rank n")
    ax.set_ylabel(r"eigenvalue $\lambda_n$")
    runs0 = next(iter(groups.values()))
    where = f"{layers[0]}, " if layers and len(set(layers)) == 1 else ""
    ax.set_title(f"eigenspectrum ({where}{_data_title(runs0)})\n"
                 "star: 90% of the variance", fontsize=9)
    ax.legend(fontsize=7)


def plot_penalty(groups: OrderedDict, ax) -> bool:
    """The training penalty per epoch per unit beta (mean over its steps), mean +- 1 std over
    seeds, for each regularised group; False when no run has a penalty history."""
    drawn = False
    for index, (label, runs) in enumerate(groups.items()):
        curves = []
        for r in runs:
            beta = r["config"].get("beta")
            history = r.get("history") or []
            if not beta or not r["model"]["regularised_layers"] or not history:
                continue
            curves.append([h["penalty"] / beta if h.get("penalty") is not None else np.nan
                           for h in history])
        if not curves or len({len(c) for c in curves}) != 1:
            continue
        values = np.array(curves, float)
        epochs = np.arange(1, values.shape[1] + 1)
        mean = np.nanmean(values, axis=0)
        colour = curve_colour(index, len(groups))
        ax.plot(epochs, mean, marker="o", ms=3, color=colour,
                label=f"{label}, {_seeds(len(values))}")
        if len(values) > 1:
            std = np.nanstd(values, axis=0)
            ax.fill_between(epochs, mean - std, mean + std, color=colour, alpha=0.2, lw=0)
        drawn = True
    if drawn:
        lines = [line.get_ydata() for line in ax.get_lines()]
        positive = np.concatenate([np.asarray(y, float) for y in lines])
        positive = positive[np.isfinite(positive) & (positive > 0)]
        if positive.size and positive.max() > 30 * positive.min():
            ax.set_yscale("log")  # penalties of very different sizes stay readable
        ax.set_xlabel("epoch")
        ax.set_ylabel(r"penalty / $\beta$ (mean over the epoch's steps)")
        ax.set_title("training penalty in the basis in use\n(mean +- 1 std over seeds)",
                     fontsize=9)
        ax.legend(fontsize=7)
    return drawn


def _seeds(k: int) -> str:
    return f"{k} seed" if k == 1 else f"{k} seeds"


def plot_robustness(groups: OrderedDict, ax, attack: str) -> bool:
    """Accuracy against eps, mean +- 1 std over seeds; False when no run has this attack."""
    drawn = False
    curves = []
    for index, (label, runs) in enumerate(groups.items()):
        curves = [r["robustness"][attack] for r in runs if attack in r.get("robustness", {})]
        if not curves:
            continue
        eps = np.array(curves[0]["eps"], float)
        acc = np.array([c["accuracy"] for c in curves], float)  # grids checked: one per label
        mean, std = acc.mean(axis=0), acc.std(axis=0)
        color = curve_colour(index, len(groups))
        band = ", mean +- 1 std" if len(acc) > 1 else ""
        ax.plot(eps, mean, marker="o", ms=3, color=color,
                label=f"{label}, {_seeds(len(acc))}{band}")
        if len(acc) > 1:
            ax.fill_between(eps, mean - std, mean + std, color=color, alpha=0.2, lw=0)
        drawn = True
    if drawn:
        if attack == "noise":
            ax.set_xlabel(r"noise standard deviation $\sigma$ (Gaussian, per pixel)")
        else:
            ax.set_xlabel(r"$\epsilon$ ($L_\infty$ radius, pixels in [0, 1])")
        ax.set_ylabel("test accuracy")
        ax.set_ylim(0.0, 1.0)
        title = ATTACK_TITLES.get(attack, attack)
        if attack == "pgd":
            kw = next((c.get("attack_kwargs", {}) for c in curves if c.get("attack_kwargs")), {})
            if kw.get("steps"):
                size = f" of {kw['step_size']:g}" if kw.get("step_size") else ""
                title += f" ({kw['steps']} steps{size})"
        ax.set_title(title)
        ax.legend(fontsize=7)
    return drawn


def plot_sensitivity(groups: OrderedDict, plt):
    """One row of maps per group (its first seed with maps); None when no run saved maps.

    All maps share one symmetric colour scale (so that ranks and variants compare), shown by
    one colour bar; the input digit the eigenvalues are differentiated by leads each row.
    """
    rows = []
    for label, runs in groups.items():
        for r in runs:
            if r.get("sensitivity"):
                rows.append((label, r["sensitivity"]))
                break
    if not rows:
        return None
    with_image = any(s.get("image") for _, s in rows)
    first = 1 if with_image else 0
    cols = max(len(s["ranks"]) for _, s in rows) + first
    maps = [[np.array([[v if v is not None else 0.0 for v in row] for row in m], float)
             for m in s["maps"]] for _, s in rows]
    scale = max((float(np.abs(m).max()) for ms in maps for m in ms), default=0.0) or 1.0
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.4 * cols + 1.6, 1.5 * len(rows) + 0.7),
                             squeeze=False)
    image = None
    for i, (label, sens) in enumerate(rows):
        for j in range(cols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if with_image and j == 0:
                if sens.get("image"):
                    digit = np.array([[v or 0.0 for v in row] for row in sens["image"]], float)
                    ax.imshow(digit, cmap="gray_r", vmin=0.0, vmax=1.0)
                    if i == 0:
                        ax.set_title(f"input x (image {sens.get('sample', 0)})", fontsize=8)
                else:
                    ax.axis("off")
                ax.set_ylabel(label, fontsize=7)
                continue
            k = j - first
            if k >= len(sens["ranks"]):
                ax.axis("off")
                continue
            image = ax.imshow(maps[i][k], cmap="seismic", vmin=-scale, vmax=scale)
            if i == 0:
                ax.set_title(f"n = {sens['ranks'][k]}", fontsize=8)
            if j == 0:
                ax.set_ylabel(label, fontsize=7)
    fig.suptitle(rf"sensitivity maps $\partial\lambda_n / \partial x$ (eq. 9) of "
                 f"{rows[0][1]['layer']}'s eigenvalues", fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.9, 1))
    cax = fig.add_axes((0.91, 0.15, 0.015, 0.7))
    bar = fig.colorbar(image, cax=cax)
    bar.ax.tick_params(labelsize=7)
    bar.set_label(r"$\partial\lambda_n / \partial x$ (one scale for all maps)", fontsize=7)
    return fig


def figure_stem(key: tuple[str, str]) -> str:
    """``shallow`` for the shallow experiment, ``whitening-mlp`` otherwise."""
    experiment, arch = key
    return experiment if experiment == arch else f"{experiment}-{arch}"


def plot_group(key: tuple[str, str], groups: OrderedDict, out_dir: Path) -> list[Path]:
    """The figures of one (experiment, arch): spectra, robustness, sensitivity maps."""
    plt = _pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = figure_stem(key)
    written = []

    has_penalty = any(r["model"]["regularised_layers"] and r.get("history")
                      for runs in groups.values() for r in runs)
    if has_penalty:
        fig, (ax, pax) = plt.subplots(1, 2, figsize=(10.4, 4.4),
                                      gridspec_kw={"width_ratios": (1.35, 1.0)})
        if not plot_penalty(groups, pax):
            pax.axis("off")
    else:
        fig, ax = plt.subplots(figsize=(5.8, 4.4))
    plot_spectra(groups, ax)
    fig.tight_layout()
    written.append(_save(fig, out_dir / f"{stem}-spectra.png", plt))

    attacks = [a for a in ATTACK_TITLES if any(
        a in r.get("robustness", {}) for runs in groups.values() for r in runs)]
    if attacks:
        fig, axes = plt.subplots(1, len(attacks), figsize=(4.8 * len(attacks), 4.0),
                                 squeeze=False)
        for ax, attack in zip(axes[0], attacks, strict=True):
            plot_robustness(groups, ax, attack)
        fig.tight_layout()
        written.append(_save(fig, out_dir / f"{stem}-robustness.png", plt))

    fig = plot_best_beta(groups, plt)
    if fig is not None:
        written.append(_save(fig, out_dir / f"{stem}-best-beta.png", plt))

    fig = plot_sensitivity(groups, plt)
    if fig is not None:
        written.append(_save(fig, out_dir / f"{stem}-sensitivity.png", plt))
    return written


def plot_best_beta(groups: OrderedDict, plt):
    """Robustness with the best beta per seed, as the paper's main text shows it (sec. 4: "the
    results of the best one"); None when no regularised variant was run with several betas.

    The curves without beta (vanilla, whitened, Jacobian) and, for each regularised variant,
    the run of each seed's best beta (:func:`~.experiments.summary.best_beta_per_seed`: the
    highest PGD accuracy averaged over eps > 0), mean +- 1 std over seeds; the chosen betas,
    seed by seed, are in the legend.
    """
    picks = best_beta_per_seed(groups)
    if not picks:
        return None
    curves = OrderedDict((label, runs) for label, runs in groups.items()
                         if runs[0]["config"].get("beta") is None)
    for pick in picks:
        betas = ", ".join(f"{b:g}" for _, b in sorted(pick["betas_by_seed"].items()))
        curves[f"{pick['variant']}, best beta per seed ({betas})"] = pick["runs"]
    attacks = [a for a in ATTACK_TITLES if any(
        a in r.get("robustness", {}) for runs in curves.values() for r in runs)]
    if not attacks:
        return None
    fig, axes = plt.subplots(1, len(attacks), figsize=(4.8 * len(attacks), 4.3), squeeze=False)
    for ax, attack in zip(axes[0], attacks, strict=True):
        plot_robustness(curves, ax, attack)
    fig.suptitle("best beta per seed: highest PGD accuracy averaged over eps > 0 "
                 "(chosen on the test set, as in the paper)", fontsize=9)
    fig.tight_layout()
    return fig


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
