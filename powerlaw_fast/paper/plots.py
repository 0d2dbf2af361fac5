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
from .experiments.summary import best_beta_per_seed, curve_label, group_runs

ATTACK_TITLES = {"fgsm": "FGSM", "pgd": "PGD", "noise": "white noise"}
# Line styles of the betas within one family of curves (see curve_styles).
LINESTYLES = ("-", "--", ":", "-.")
# The opacity of the +-1 std bands.
BAND_ALPHA = 0.25


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


def curve_styles(groups: OrderedDict) -> dict[str, dict]:
    """Label -> ``{"color", "linestyle"}``: one colour per family of curves (a variant and its
    scheme: vanilla, specreg, specreg refresh-5, ...) and, within a family, one line style per
    beta (solid, dashed, dotted, dash-dot), so that 13 curves read as 5 families x 3 betas.
    ``groups``: label -> runs, or label -> a curve of ``summary.json``."""
    families: OrderedDict = OrderedDict()
    for label, value in groups.items():
        # a list of runs, or one curve of a summary.json (which has the same two keys)
        cfg = value if isinstance(value, dict) else value[0]["config"]
        families.setdefault((cfg["variant"], cfg.get("scheme")), []).append(label)
    styles = {}
    for index, labels in enumerate(families.values()):
        colour = curve_colour(index, len(families))
        for j, label in enumerate(labels):
            styles[label] = {"color": colour, "linestyle": LINESTYLES[j % len(LINESTYLES)]}
    return styles


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


def _power_law_fit(runs: list[dict], layer: str, fit: str = "fit"
                   ) -> tuple[float | None, tuple[int, int] | None]:
    """The fitted exponent of ``layer`` over ranks tau..N (``fit="fit"``; over the first decade
    tau..10 tau: ``"fit_decade"``), mean over the seeds that have it (as the tables print it),
    and the fit's rank window when the seeds share one."""
    entries = [r.get("spectra", {}).get(layer) or {} for r in runs]
    alphas = [e[f"alpha_{fit}"] for e in entries if e.get(f"alpha_{fit}") is not None]
    windows = {tuple(e[f"window_{fit}"]) for e in entries if e.get(f"window_{fit}")}
    return (float(np.mean(alphas)) if alphas else None,
            windows.pop() if len(windows) == 1 else None)


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


def _seeds(k: int) -> str:
    return f"{k} seed" if k == 1 else f"{k} seeds"


def _seed_count(groups: OrderedDict) -> str:
    """``"3 seeds"``, or ``"2-3 seeds"`` when the curves differ."""
    counts = sorted({len(runs) for runs in groups.values()})
    if len(counts) == 1:
        return _seeds(counts[0])
    return f"{counts[0]}-{counts[-1]} seeds"


def _spread(groups: OrderedDict, what: str = "band") -> str:
    """``"mean over 3 seeds, band: +-1 std"``, or ``"one seed"``."""
    if max(len(runs) for runs in groups.values()) == 1:
        return "one seed"
    return f"mean over {_seed_count(groups)}, {what}: +-1 std"


def _legend(ax, legend: bool) -> None:
    """The axes' own legend, outside the data (to the right), when asked for."""
    if legend:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)


def plot_spectra(groups: OrderedDict, ax, *, layer: str | None = None,
                 styles: dict | None = None, legend: bool = True) -> None:
    """Eigenspectra (log-log) of each group's regularised / last hidden layer.

    Each curve is the mean over seeds with a +-1 std band; its legend entry gives the fitted
    exponent alpha (mean over seeds, as the tables; and over the first decade of ranks, tau to
    10 tau, when that is a different window) and the 90%-variance rank (the star). The
    ranks the power-law fit uses are marked by a bar along the bottom of the axes, the ranks
    below tau (which the penalty leaves free) are shaded grey, and the 1/n target is drawn
    anchored at rank tau. ``legend=False`` leaves the legend to the caller (``plot_group``
    draws one below the figure)."""
    styles = styles or curve_styles(groups)
    # The 1/n target is anchored at rank tau on the first regularised group's spectrum (the
    # first group's when none is regularised), as the penalty anchors gamma_tau = lambda_tau.
    anchor = None
    tau = None
    window = None
    layers = []
    for label, runs in groups.items():
        name = layer or _spectrum_layer(runs)
        all_seeds = _spectra(runs, name)
        if all_seeds is None:
            continue
        lam = np.nanmean(all_seeds, axis=0)
        layers.append(name)
        ranks = np.arange(1, lam.size + 1)
        positive = lam > 0
        alpha_fit, fit_window = _power_law_fit(runs, name)
        alpha_decade, decade = _power_law_fit(runs, name, "fit_decade")
        window = window or fit_window
        d = _effective_dimension(lam)
        details = [rf"$\alpha$ = {alpha_fit:.2f}"] if alpha_fit is not None else []
        if alpha_decade is not None and decade is not None and decade != fit_window:
            details.append(f"{alpha_decade:.2f} over ranks {decade[0]}-{decade[1]}")
        details.append(f"90% at rank {d}")
        style = styles[label]
        (line,) = ax.loglog(ranks[positive], lam[positive], lw=1.5,
                            label=f"{label}: {', '.join(details)}", **style)
        if all_seeds.shape[0] > 1:
            std = np.nanstd(all_seeds, axis=0)
            low = np.where(lam - std > 0, lam - std, lam[positive].min() * 0.5
                           if positive.any() else 1e-12)
            ax.fill_between(ranks[positive], low[positive], (lam + std)[positive],
                            color=style["color"], alpha=BAND_ALPHA, lw=0)
        if 1 <= d <= lam.size and lam[d - 1] > 0:
            ax.plot([d], [lam[d - 1]], marker="*", ms=13, color=line.get_color(),
                    markeredgecolor="k", ls="none", zorder=5)
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
        ax.axvspan(1, tau, color="0.9", zorder=0, label=r"ranks $n < \tau$: not penalised")
    if window is not None:
        # the fit's ranks, as a bar along the bottom (axes fraction), so that a spectrum that
        # follows 1/n over part of them only reads as what the fitted alpha summarises
        ax.axvspan(window[0], window[1], ymin=0.0, ymax=0.025, color="0.25", lw=0, zorder=4,
                   label=rf"ranks of the power-law fit ($\alpha$, as the tables): "
                   f"{window[0]}-{window[1]}")
    ax.plot([], [], marker="*", ms=10, color="0.6", markeredgecolor="k", ls="none",
            label="star: the rank where 90% of the variance is reached")
    ax.set_xlabel("rank n (largest eigenvalue first)")
    ax.set_ylabel(r"eigenvalue $\lambda_n$ (variance along direction n)")
    runs0 = next(iter(groups.values()))
    where = f" of {layers[0]}" if layers and len(set(layers)) == 1 else ""
    ax.set_title(f"Eigenvalue spectrum{where} ({_data_title(runs0)})\n{_spread(groups)}",
                 fontsize=9)
    _legend(ax, legend)


def plot_penalty(groups: OrderedDict, ax, *, styles: dict | None = None,
                 legend: bool = True) -> bool:
    """The training penalty per epoch per unit beta (mean over its steps), mean +- 1 std over
    seeds, for each regularised group; False when no run has a penalty history."""
    styles = styles or curve_styles(groups)
    drawn = False
    for label, runs in groups.items():
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
        style = styles[label]
        ax.plot(epochs, mean, marker="o", ms=3, lw=1.5, label=label if legend else None,
                **style)
        if len(values) > 1:
            std = np.nanstd(values, axis=0)
            ax.fill_between(epochs, mean - std, mean + std, color=style["color"],
                            alpha=BAND_ALPHA, lw=0)
        drawn = True
    if drawn:
        lines = [line.get_ydata() for line in ax.get_lines()]
        positive = np.concatenate([np.asarray(y, float) for y in lines])
        positive = positive[np.isfinite(positive) & (positive > 0)]
        if positive.size and positive.max() > 30 * positive.min():
            ax.set_yscale("log")  # penalties of very different sizes stay readable
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole
        ax.set_xlabel("epoch")
        ax.set_ylabel(r"penalty / $\beta$ (0: the spectrum is on 1/n)")
        ax.set_title("Spectral penalty during training, divided by " r"$\beta$" "\n"
                     "mean over each epoch's steps, band: +-1 std over seeds", fontsize=9)
        _legend(ax, legend)
    return drawn


def robustness_stats(runs: list[dict], attack: str) -> dict | None:
    """``{"eps", "mean", "std", "n", "attack_kwargs"}`` of ``attack`` over the runs (the seeds;
    their grids are checked to be one), as ``summary.json`` keeps a curve's robustness; None
    when no run has this attack."""
    curves = [r["robustness"][attack] for r in runs if attack in r.get("robustness", {})]
    if not curves:
        return None
    acc = np.array([c["accuracy"] for c in curves], float)
    return {"eps": list(curves[0]["eps"]), "mean": acc.mean(axis=0), "std": acc.std(axis=0),
            "n": len(curves), "attack_kwargs": curves[0].get("attack_kwargs", {})}


def plot_robustness(groups: OrderedDict, ax, attack: str, *, styles: dict | None = None,
                    legend: bool = True, notes: dict | None = None) -> bool:
    """Accuracy against eps, mean +- 1 std over seeds (a band and error bars, so that a
    small spread stays visible); False when no run has this attack. ``notes``: label -> text
    appended to that curve's legend entry."""
    stats = OrderedDict((label, robustness_stats(runs, attack)) for label, runs in groups.items())
    return draw_robustness(stats, ax, attack, styles=styles or curve_styles(groups),
                           legend=legend, notes=notes)


def _values(values) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], float)


def draw_robustness(stats: OrderedDict, ax, attack: str, *, styles: dict, legend: bool = True,
                    notes: dict | None = None) -> bool:
    """:func:`plot_robustness` from statistics: label -> :func:`robustness_stats` (or a
    ``summary.json`` curve's ``robustness[attack]``; None: no curve)."""
    notes = notes or {}
    drawn = False
    kwargs = {}
    for label, st in stats.items():
        if st is None:
            continue
        eps, mean, std = _values(st["eps"]), _values(st["mean"]), _values(st["std"])
        style = styles[label]
        ax.plot(eps, mean, marker="o", ms=3.5, lw=1.5, label=label + notes.get(label, ""),
                **style)
        if st["n"] > 1:
            ax.fill_between(eps, mean - std, mean + std, color=style["color"],
                            alpha=BAND_ALPHA, lw=0)
            ax.errorbar(eps, mean, yerr=std, fmt="none", ecolor=style["color"], elinewidth=1,
                        capsize=3)
        kwargs = kwargs or st.get("attack_kwargs") or {}
        drawn = True
    if drawn:
        if attack == "noise":
            ax.set_xlabel(r"noise standard deviation $\sigma$ (Gaussian, per pixel)")
        else:
            ax.set_xlabel(r"attack radius $\epsilon$ ($L_\infty$, pixels in [0, 1])")
        ax.set_ylabel("test accuracy")
        ax.set_ylim(0.0, 1.0)
        title = ATTACK_TITLES.get(attack, attack)
        if attack == "pgd" and kwargs.get("steps"):
            size = f" of {kwargs['step_size']:g}" if kwargs.get("step_size") else ""
            title += f" ({kwargs['steps']} steps{size})"
        ax.set_title(title, fontsize=9)
        _legend(ax, legend)
    return drawn


def plot_sensitivity(groups: OrderedDict, plt):
    """One row of maps per group (its first seed with maps); None when no run saved maps.

    Each map has its own symmetric colour scale, from minus to plus its largest magnitude,
    which is printed under it; one colour bar shows the scale as that fraction. Why not one
    scale for all maps: along a row the magnitudes fall with the rank as the eigenvalues do
    (by four to five decades from n = 1 to n = 500), so on any shared or per-row linear scale
    most maps are blank, zero and small alike; a logarithmic scale keeps them visible but
    saturates the large maps into their sign pattern. The magnitudes compare through the
    printed numbers. The input digit the eigenvalues are differentiated by leads each row,
    the variant's name beside it.
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
    label_width = 0.075 * max(len(label) for label, _ in rows) + 0.3
    fig, axes = plt.subplots(len(rows), cols, squeeze=False, layout="constrained",
                             figsize=(1.25 * cols + label_width + 1.2, 1.45 * len(rows) + 1.0))
    image = None
    for i, (label, sens) in enumerate(rows):
        for j in range(cols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
            if with_image and j == 0:
                if sens.get("image"):
                    digit = np.array([[v or 0.0 for v in row] for row in sens["image"]], float)
                    ax.imshow(digit, cmap="gray_r", vmin=0.0, vmax=1.0)
                    if i == 0:
                        ax.set_title(f"input: test image {sens.get('sample', 0)}", fontsize=8)
                else:
                    for spine in ax.spines.values():
                        spine.set_visible(False)
                continue
            k = j - first
            if k >= len(sens["ranks"]):
                ax.axis("off")
                continue
            largest = float(np.abs(maps[i][k]).max())
            image = ax.imshow(maps[i][k] / (largest or 1.0), cmap="seismic", vmin=-1.0,
                              vmax=1.0)
            if i == 0:
                ax.set_title(f"n = {sens['ranks'][k]}", fontsize=8)
            ax.set_xlabel(f"largest {largest:.1e}", fontsize=6, labelpad=1)
    fig.suptitle(rf"Sensitivity of {rows[0][1]['layer']}'s eigenvalues $\lambda_n$ to each "
                 r"input pixel, $\partial\lambda_n / \partial x$ (eq. 9), for one test digit"
                 "\nred: the eigenvalue grows with the pixel, blue: it shrinks; each map on "
                 "its own scale, its largest magnitude printed under it", fontsize=9)
    if image is not None:
        bar = fig.colorbar(image, ax=axes, shrink=min(0.6, 6.0 / len(rows)), aspect=30,
                           pad=0.01)
        bar.ax.tick_params(labelsize=7)
        bar.set_label(r"$\partial\lambda_n / \partial x$ / the map's largest magnitude",
                      fontsize=7)
    return fig


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
