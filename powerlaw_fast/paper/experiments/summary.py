"""What a sweep measured, per seed and over seeds (:func:`sweep_summary`), and the best beta.

Runs are grouped into figures by (experiment, architecture) and into curves by variant and beta
(:func:`group_runs`). For every curve the summary holds each seed's numbers and their mean and
standard deviation over seeds (numpy's ``std``, ddof 0, as the figures' bands): clean accuracy,
the accuracy curve of each attack, the fitted power-law exponent over ranks tau..N and over the
decade tau..10 tau, the 90%-variance dimension and the penalty per epoch per unit beta.

The paper tried beta in {1, 2, 5} and shows "the results of the best one" (sec. 4).
:func:`best_beta_per_seed` makes that choice seed by seed: for each spectrally regularised
variant and seed, the beta whose PGD accuracy, averaged over the eps > 0 grid (the area under
the robustness curve), is highest (ties: the smaller beta). The choice is made on the test set,
as in the paper, so the "best beta" curve is an optimistic one; the per-beta curves sit beside it.

Example::

    >>> from powerlaw_fast.paper.experiments.summary import sweep_summary
    >>> run = {"name": "r", "seed": 0, "test_accuracy": 0.9,
    ...        "config": {"experiment": "shallow", "arch": "shallow", "variant": "vanilla",
    ...                   "beta": None, "seed": 0},
    ...        "model": {"hidden_widths": {"hidden1": 4}, "regularised_layers": []},
    ...        "robustness": {"pgd": {"eps": [0.0, 0.1], "accuracy": [0.9, 0.2]}},
    ...        "spectra": {}, "summary": {"effective_dimension": 3}}
    >>> curve = sweep_summary([run])["figures"][0]["curves"][0]
    >>> curve["label"], curve["test_accuracy"]["mean"], curve["robustness"]["pgd"]["mean"]
    ('vanilla', 0.9, [0.9, 0.2])
"""

from __future__ import annotations

import warnings
from collections import OrderedDict, defaultdict
from pathlib import Path

import numpy as np

from .config import EXPERIMENTS, SPECREG_VARIANTS
from .results import write_json_atomic

SUMMARY_FORMAT = 1
# What "best" means for best_beta_per_seed: this attack's accuracy averaged over eps > 0.
BEST_BETA_ATTACK = "pgd"
# The per-run numbers (RunConfig summary keys) averaged over seeds.
SUMMARY_KEYS = ("alpha_tau_to_n", "alpha_decade", "effective_dimension")


def curve_label(result: dict) -> str:
    """``"specreg (beta=2)"``, ``"specreg fresh-basis (beta=5)"`` or the bare variant name."""
    cfg = result["config"]
    label = cfg["variant"]
    if cfg.get("scheme"):
        label += f" {cfg['scheme']}"
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
        return pos, cfg.get("scheme") or "", cfg.get("beta") or 0.0

    ordered = OrderedDict()
    for key in sorted(figures):
        runs_by_label = OrderedDict(
            (label, sorted(runs, key=lambda r: r["config"].get("seed", 0)))
            for label, runs in sorted(figures[key].items(), key=variant_order)
        )
        ordered[key] = runs_by_label
    return ordered


def _finite(values) -> list[float | None]:
    """Plain floats, None where a value is not finite (JSON has no NaN)."""
    return [float(v) if np.isfinite(v) else None for v in values]


def mean_std(values) -> dict | None:
    """``{"mean", "std", "n"}`` of the values that are not None (std: ddof 0); None if none."""
    kept = [float(v) for v in values if v is not None]
    if not kept:
        return None
    return {"mean": float(np.mean(kept)), "std": float(np.std(kept)), "n": len(kept)}


def robustness_score(result: dict, attack: str = BEST_BETA_ATTACK) -> float | None:
    """Mean accuracy of ``attack`` over its eps > 0 points (None when the run lacks them)."""
    curve = result.get("robustness", {}).get(attack)
    if not curve:
        return None
    accs = [a for e, a in zip(curve["eps"], curve["accuracy"], strict=True) if e > 0]
    return float(np.mean(accs)) if accs else None


def best_beta_per_seed(groups: OrderedDict, attack: str = BEST_BETA_ATTACK) -> list[dict]:
    """For each spectrally regularised variant of one figure (``label -> runs``, as
    :func:`group_runs` gives), the run of the best beta per seed.

    Returns one dict per variant (with its scheme, if any) tried with at least two betas:
    ``variant``, ``attack``,
    ``betas_by_seed`` (seed -> chosen beta), ``scores`` (seed -> {beta: score}) and ``runs``
    (the chosen runs, one per seed). A seed counts only when every beta of the variant has a
    score for it, so that each seed chooses among the same betas.
    """
    by_variant: dict = defaultdict(lambda: defaultdict(dict))  # variant -> seed -> beta -> run
    for runs in groups.values():
        for r in runs:
            cfg = r["config"]
            if cfg["variant"] in SPECREG_VARIANTS and cfg.get("beta") is not None:
                variant = cfg["variant"] + (f" {cfg['scheme']}" if cfg.get("scheme") else "")
                by_variant[variant][cfg.get("seed", 0)][float(cfg["beta"])] = r
    chosen = []
    for variant, seeds in by_variant.items():
        betas = sorted({b for per_beta in seeds.values() for b in per_beta})
        if len(betas) < 2:
            continue
        picks, scores = {}, {}
        for seed in sorted(seeds):
            per_beta = seeds[seed]
            score = {b: robustness_score(per_beta[b], attack) for b in betas if b in per_beta}
            if len(score) != len(betas) or any(v is None for v in score.values()):
                continue
            best = max(betas, key=lambda b: (score[b], -b))
            picks[seed] = per_beta[best]
            scores[seed] = score
        if picks:
            chosen.append({
                "variant": variant, "attack": attack,
                "betas_by_seed": {s: float(r["config"]["beta"]) for s, r in picks.items()},
                "scores": scores, "runs": list(picks.values()),
            })
    return chosen


def write_summary(results: list[dict], path) -> Path:
    """Write :func:`sweep_summary` of ``results`` to ``path`` (atomically); returns the path."""
    path = Path(path)
    write_json_atomic(path, sweep_summary(results), indent=1)
    return path


def curve_summary(runs: list[dict]) -> dict:
    """One curve's numbers: per seed, and their mean +- std over seeds."""
    cfg = runs[0]["config"]
    summaries = [r.get("summary") or {} for r in runs]
    out = {
        "variant": cfg["variant"], "scheme": cfg.get("scheme"), "beta": cfg.get("beta"),
        "seeds": [r["config"].get("seed", r.get("seed")) for r in runs],
        "runs": [r["name"] for r in runs],
        "test_accuracy": mean_std(r["test_accuracy"] for r in runs),
        "per_seed": {
            "test_accuracy": [r["test_accuracy"] for r in runs],
            **{key: [s.get(key) for s in summaries] for key in SUMMARY_KEYS},
        },
    }
    for key in SUMMARY_KEYS:
        out[key] = mean_std(s.get(key) for s in summaries)
        windows = {tuple(s[f"{key}_window"]) for s in summaries if s.get(f"{key}_window")}
        if out[key] is not None and len(windows) == 1:
            out[key]["ranks"] = list(windows.pop())  # the fit's rank window
    penalties = [s.get("penalty_per_epoch_per_beta") for s in summaries]
    penalties = [p for p in penalties if p]
    if penalties and len({len(p) for p in penalties}) == 1:
        values = np.array([[np.nan if v is None else v for v in p] for p in penalties], float)
        with warnings.catch_warnings():  # an epoch without any finite penalty is None
            warnings.simplefilter("ignore", RuntimeWarning)
            mean, std = np.nanmean(values, axis=0), np.nanstd(values, axis=0)
        out["penalty_per_epoch_per_beta"] = {"mean": _finite(mean), "std": _finite(std),
                                             "n": len(penalties)}
    robustness = {}
    for attack in ("fgsm", "pgd", "noise"):
        curves = [r["robustness"][attack] for r in runs if attack in r.get("robustness", {})]
        if not curves or len({tuple(c["eps"]) for c in curves}) != 1:
            continue
        acc = np.array([c["accuracy"] for c in curves], float)
        robustness[attack] = {"eps": list(curves[0]["eps"]),
                              "mean": _finite(acc.mean(axis=0)),
                              "std": _finite(acc.std(axis=0)), "n": len(curves),
                              "attack_kwargs": curves[0].get("attack_kwargs", {})}
    out["robustness"] = robustness
    return out


def _shared_config(runs: list[dict]) -> dict:
    """The config fields every run of a figure shares (not seed, variant or beta)."""
    configs = [r["config"] for r in runs]
    shared = {}
    for key, value in configs[0].items():
        if key in ("seed", "variant", "beta") or key == "notes":
            continue
        if all(c.get(key) == value for c in configs[1:]):
            shared[key] = value
    preset = {(c.get("notes") or {}).get("preset") for c in configs}
    shared["preset"] = preset.pop() if len(preset) == 1 else None
    return shared


def sweep_summary(results: list[dict]) -> dict:
    """The summary of a folder of runs (see the module docstring); JSON-able."""
    figures = []
    for (experiment, arch), groups in group_runs(results).items():
        runs = [r for rs in groups.values() for r in rs]
        environments = {tuple(sorted((r.get("environment") or {}).items())) for r in runs}
        best = []
        for pick in best_beta_per_seed(groups):
            entry = curve_summary(pick["runs"])
            entry.update(label=f"{pick['variant']} (best beta per seed)",
                         beta=None, selection={
                             "attack": pick["attack"],
                             "criterion": "mean accuracy over eps > 0 (test set, as the paper)",
                             "betas_by_seed": {str(s): b
                                               for s, b in pick["betas_by_seed"].items()},
                             "scores": {str(s): {f"{b:g}": v for b, v in sc.items()}
                                        for s, sc in pick["scores"].items()},
                         })
            best.append(entry)
        figures.append({
            "experiment": experiment, "arch": arch,
            "config": _shared_config(runs),
            "data": runs[0].get("data"),
            "environments": [dict(e) for e in sorted(environments) if e],
            "curves": [dict(label=label, **curve_summary(rs)) for label, rs in groups.items()],
            "best_beta": best,
        })
    return {"format": SUMMARY_FORMAT, "runs": len(results), "figures": figures}
