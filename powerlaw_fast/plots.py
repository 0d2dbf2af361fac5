"""The paper's figures from run JSONs (see :mod:`powerlaw_fast.experiments`).

- Eigenspectra on log-log axes (mean over seeds), the 1/n target anchored at rank tau, a star
  where the cumulative variance passes 90% and the unregularised ranks n < tau shaded grey
  (Fig. 2A).
- Test accuracy against epsilon for FGSM and PGD (and sigma for white noise), mean with a
  +-1 standard deviation band over seeds (Fig. 2B, C; 4; 5).
- Sensitivity maps d lambda_n / d x (eq. 9), one row per variant, one column per rank (Fig. 2D, 3).

Runs are grouped into figures by (experiment, architecture) and into curves by variant and beta.
matplotlib is imported lazily, with the Agg backend, so the library works without it.

Example::

    python -m powerlaw_fast plot results/       # writes results/figures/*.png
"""

from __future__ import annotations

from collections import OrderedDict, defaultdict
from pathlib import Path

import numpy as np

from .experiments import EXPERIMENTS, load_results

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


def curve_label(result: dict) -> str:
    """``"specreg (beta=2)"`` or the bare variant name."""
    cfg = result["config"]
    label = cfg["variant"]
    if cfg.get("beta") is not None:
        label += f" (beta={cfg['beta']:g})"
    return label


def group_runs(results: list[dict]) -> OrderedDict:
    """(experiment, arch) -> label -> list of results (one per seed), in the paper's order."""
    figures: dict = defaultdict(lambda: defaultdict(list))
    for r in results:
        cfg = r["config"]
        figures[(cfg["experiment"], cfg["arch"])][curve_label(r)].append(r)

    def variant_order(item):
        runs = item[1]
        cfg = runs[0]["config"]
        variants = EXPERIMENTS.get(cfg["experiment"], ())
        pos = variants.index(cfg["variant"]) if cfg["variant"] in variants else len(variants)
        return pos, cfg.get("beta") or 0.0

    ordered = OrderedDict()
    for key in sorted(figures):
        ordered[key] = OrderedDict(sorted(figures[key].items(), key=variant_order))
    return ordered


def _spectrum_layer(runs: list[dict]) -> str:
    """The layer drawn: the last regularised layer, else the last hidden layer."""
    model = runs[0]["model"]
    if model["regularised_layers"]:
        return model["regularised_layers"][-1]
    return list(model["hidden_widths"])[-1]


def _mean_spectrum(runs: list[dict], layer: str) -> np.ndarray | None:
    spectra = []
    for r in runs:
        entry = r.get("spectra", {}).get(layer)
        if entry is None:
            continue
        lam = np.array([v if v is not None else np.nan for v in entry["eigenvalues"]], float)
        spectra.append(lam)
    if not spectra:
        return None
    return np.nanmean(np.stack(spectra), axis=0)


def _effective_dimension(lam: np.ndarray, threshold: float = 0.9) -> int:
    lam = np.clip(np.nan_to_num(lam), 0.0, None)
    total = lam.sum()
    if total <= 0:
        return 0
    return int(np.searchsorted(np.cumsum(lam) / total, threshold)) + 1


def plot_spectra(groups: OrderedDict, ax, *, layer: str | None = None) -> None:
    """Eigenspectra (log-log) of each group's regularised / last hidden layer."""
    # The 1/n target is anchored at rank tau on the first regularised group's spectrum (the
    # first group's when none is regularised), as the penalty anchors gamma_tau = lambda_tau.
    anchor = None
    tau = None
    for index, (label, runs) in enumerate(groups.items()):
        name = layer or _spectrum_layer(runs)
        lam = _mean_spectrum(runs, name)
        if lam is None:
            continue
        ranks = np.arange(1, lam.size + 1)
        positive = lam > 0
        (line,) = ax.loglog(ranks[positive], lam[positive], label=f"{label} [{name}]",
                            color=f"C{index}", lw=1.5)
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
        ax.loglog(ranks, kappa * ranks**-alpha, "k--", lw=1,
                  label="1/n" if alpha == 1.0 else f"n^-{alpha:g}")
        ax.axvspan(1, tau, color="0.85", zorder=0)
    ax.set_xlabel("rank n")
    ax.set_ylabel("eigenvalue")
    ax.set_title("eigenspectrum (star: 90% of the variance)")
    ax.legend(fontsize=7)


def plot_robustness(groups: OrderedDict, ax, attack: str) -> bool:
    """Accuracy against eps, mean +- 1 std over seeds; False when no run has this attack."""
    drawn = False
    for index, (label, runs) in enumerate(groups.items()):
        curves = [r["robustness"][attack] for r in runs if attack in r.get("robustness", {})]
        if not curves:
            continue
        eps = np.array(curves[0]["eps"], float)
        acc = np.array([c["accuracy"] for c in curves if len(c["accuracy"]) == eps.size], float)
        mean, std = acc.mean(axis=0), acc.std(axis=0)
        color = f"C{index}"
        ax.plot(eps, mean, marker="o", ms=3, color=color, label=f"{label} (n={len(acc)})")
        if len(acc) > 1:
            ax.fill_between(eps, mean - std, mean + std, color=color, alpha=0.2, lw=0)
        drawn = True
    if drawn:
        ax.set_xlabel("sigma" if attack == "noise" else "epsilon")
        ax.set_ylabel("test accuracy")
        ax.set_ylim(0.0, 1.0)
        title = ATTACK_TITLES.get(attack, attack)
        if attack == "pgd":
            steps = curves[0].get("attack_kwargs", {}).get("steps")
            title += f" ({steps} steps)" if steps else ""
        ax.set_title(title)
        ax.legend(fontsize=7)
    return drawn


def plot_sensitivity(groups: OrderedDict, plt):
    """One row of maps per group (its first seed with maps); None when no run saved maps."""
    rows = []
    for label, runs in groups.items():
        for r in runs:
            if r.get("sensitivity"):
                rows.append((label, r["sensitivity"]))
                break
    if not rows:
        return None
    cols = max(len(s["ranks"]) for _, s in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.4 * cols + 1.0, 1.5 * len(rows) + 0.4),
                             squeeze=False)
    for i, (label, sens) in enumerate(rows):
        for j in range(cols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j >= len(sens["ranks"]):
                ax.axis("off")
                continue
            m = np.array([[v if v is not None else 0.0 for v in row] for row in sens["maps"][j]])
            scale = float(np.abs(m).max()) or 1.0
            ax.imshow(m, cmap="seismic", vmin=-scale, vmax=scale)
            if i == 0:
                ax.set_title(f"n = {sens['ranks'][j]}", fontsize=8)
            if j == 0:
                ax.set_ylabel(label, fontsize=7)
    fig.suptitle(f"sensitivity maps d lambda_n / d x ({rows[0][1]['layer']})", fontsize=9)
    fig.tight_layout()
    return fig


def plot_group(key: tuple[str, str], groups: OrderedDict, out_dir: Path) -> list[Path]:
    """The figures of one (experiment, arch): spectra, robustness, sensitivity maps."""
    plt = _pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{key[0]}-{key[1]}"
    written = []

    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    plot_spectra(groups, ax)
    fig.tight_layout()
    written.append(_save(fig, out_dir / f"{stem}-spectra.png", plt))

    attacks = [a for a in ATTACK_TITLES if any(
        a in r.get("robustness", {}) for runs in groups.values() for r in runs)]
    if attacks:
        fig, axes = plt.subplots(1, len(attacks), figsize=(4.6 * len(attacks), 3.8),
                                 squeeze=False)
        for ax, attack in zip(axes[0], attacks, strict=True):
            plot_robustness(groups, ax, attack)
        fig.tight_layout()
        written.append(_save(fig, out_dir / f"{stem}-robustness.png", plt))

    fig = plot_sensitivity(groups, plt)
    if fig is not None:
        written.append(_save(fig, out_dir / f"{stem}-sensitivity.png", plt))
    return written


def _save(fig, path: Path, plt) -> Path:
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_results(results_dir, out_dir=None) -> list[Path]:
    """Redraw every figure from the complete run JSONs under ``results_dir``.

    Figures go to ``out_dir`` (default ``results_dir/figures``). Returns the written paths.
    Raises ``FileNotFoundError`` when the folder is missing and ``ValueError`` when it holds no
    complete run.
    """
    results = load_results(results_dir)
    if not results:
        raise ValueError(f"results_dir: no complete run JSON files in {results_dir}")
    out_dir = Path(out_dir) if out_dir is not None else Path(results_dir) / "figures"
    written = []
    for key, groups in group_runs(results).items():
        written.extend(plot_group(key, groups, out_dir))
    return written


def summary_table(results: list[dict], attack: str) -> str:
    """A text table: eps down the rows, mean accuracy of each curve label across."""
    groups = OrderedDict()
    for runs in group_runs(results).values():
        groups.update(runs)
    labels = [lab for lab, runs in groups.items() if attack in runs[0].get("robustness", {})]
    if not labels:
        return ""
    eps = groups[labels[0]][0]["robustness"][attack]["eps"]
    width = max(12, *(len(lab) + 2 for lab in labels))
    lines = [f"{ATTACK_TITLES.get(attack, attack)}: test accuracy",
             f"{'eps':>6}" + "".join(f"{lab:>{width}}" for lab in labels)]
    for i, e in enumerate(eps):
        row = f"{e:>6.3f}"
        for lab in labels:
            accs = [r["robustness"][attack]["accuracy"][i] for r in groups[lab]]
            row += f"{sum(accs) / len(accs):>{width}.3f}"
        lines.append(row)
    return "\n".join(lines)

