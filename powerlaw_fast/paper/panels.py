"""The panels of the paper's figures, one matplotlib axes each (the figures and their files:
:mod:`powerlaw_fast.paper.plots`).

- :func:`plot_spectra`: eigenspectra on log-log axes, mean over seeds with a +-1 standard
  deviation band, the 1/n target anchored at rank tau, a star where the cumulative variance
  passes 90%, the unpenalised ranks n < tau shaded, the power-law fit's ranks marked.
- :func:`plot_penalty`: the penalty per epoch per unit beta.
- :func:`plot_robustness` / :func:`draw_robustness`: test accuracy against the attack radius.
- :func:`plot_sensitivity`: the maps d lambda_n / d x (eq. 9), one row per variant.
- :func:`curve_styles`: one colour per family of curves, one line style per beta.

matplotlib is imported lazily (:func:`_pyplot`, the Agg backend).

Example::

    >>> from powerlaw_fast.paper.panels import curve_colour
    >>> curve_colour(0, 3)
    'C0'
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

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
