"""The sweep summary (summary.json) and the best beta per seed (paper/experiments/summary.py)."""

import json

import numpy as np
import pytest

from powerlaw_fast.cli import main
from powerlaw_fast.paper.experiments import RunConfig
from powerlaw_fast.paper.experiments.results import RESULT_FORMAT
from powerlaw_fast.paper.experiments.summary import (
    best_beta_per_seed,
    group_runs,
    robustness_score,
    sweep_summary,
)

EPS = [0.0, 0.05, 0.1]


def _run(seed, variant="specreg", beta=None, pgd=(0.9, 0.5, 0.1), *, scheme=None,
         alpha=1.5, dim=20, penalty=(0.3, 0.2)):
    cfg = RunConfig("shallow", "shallow", variant, seed=seed, beta=beta, epochs=len(penalty),
                    width=40, pgd_eps=EPS, fgsm_eps=EPS, noise_sigma=(), scheme=scheme)
    regularised = cfg.regularised
    return {
        "format": RESULT_FORMAT, "status": "complete", "name": cfg.name, "seed": seed,
        "config": cfg.to_dict(), "test_accuracy": pgd[0],
        "model": {"hidden_widths": {"hidden1": 40},
                  "regularised_layers": ["hidden1"] if regularised else []},
        "robustness": {"pgd": {"eps": EPS, "accuracy": list(pgd)}},
        "spectra": {"hidden1": {"eigenvalues": [1.0 / n for n in range(1, 41)]}},
        "history": [{"penalty": p} for p in penalty] if regularised else [],
        "summary": {"alpha_tau_to_n": alpha, "alpha_tau_to_n_window": [10, 40],
                    "alpha_decade": alpha - 0.5, "alpha_decade_window": [10, 40],
                    "effective_dimension": dim,
                    "penalty_per_epoch_per_beta": (
                        [None if p is None else p / beta for p in penalty]
                        if regularised else None)},
        "data": {"n_train": 100, "n_test": 10, "source": "test"},
    }


def _sweep():
    """Seed 0 is most robust at beta 2, seed 1 at beta 5, seed 2 ties beta 1 and 5."""
    runs = [_run(s, "vanilla", pgd=(0.95, 0.3, 0.05), alpha=1.8, dim=10) for s in range(3)]
    pgd = {(0, 1): (0.9, 0.5, 0.2), (0, 2): (0.9, 0.6, 0.3), (0, 5): (0.8, 0.6, 0.2),
           (1, 1): (0.9, 0.4, 0.1), (1, 2): (0.9, 0.5, 0.1), (1, 5): (0.8, 0.7, 0.3),
           (2, 1): (0.9, 0.5, 0.3), (2, 2): (0.9, 0.4, 0.1), (2, 5): (0.8, 0.6, 0.2)}
    runs += [_run(s, beta=float(b), pgd=acc, alpha=1.0 + s / 10, dim=30 + s)
             for (s, b), acc in pgd.items()]
    return runs


def test_robustness_score_averages_over_positive_eps():
    assert robustness_score(_run(0, "vanilla", pgd=(0.9, 0.5, 0.1))) == pytest.approx(0.3)
    assert robustness_score({"robustness": {}}) is None


def test_best_beta_is_chosen_seed_by_seed_ties_to_the_smaller_beta():
    (groups,) = group_runs(_sweep()).values()
    (pick,) = best_beta_per_seed(groups)
    assert pick["variant"] == "specreg" and pick["attack"] == "pgd"
    assert pick["betas_by_seed"] == {0: 2.0, 1: 5.0, 2: 1.0}
    assert [r["config"]["beta"] for r in pick["runs"]] == [2.0, 5.0, 1.0]
    assert pick["scores"][1] == {1.0: pytest.approx(0.25), 2.0: pytest.approx(0.3),
                                 5.0: pytest.approx(0.5)}


def test_best_beta_needs_every_beta_of_a_seed_and_two_betas():
    runs = [r for r in _sweep() if not (r["seed"] == 1 and r["config"]["beta"] == 2.0)]
    (groups,) = group_runs(runs).values()
    (pick,) = best_beta_per_seed(groups)
    assert sorted(pick["betas_by_seed"]) == [0, 2]  # seed 1 lacks beta 2: not compared
    one_beta = [r for r in _sweep() if r["config"]["beta"] in (None, 5.0)]
    (groups,) = group_runs(one_beta).values()
    assert best_beta_per_seed(groups) == []


def test_summary_means_and_stds_are_over_seeds():
    summary = sweep_summary(_sweep())
    json.dumps(summary, allow_nan=False)
    (figure,) = summary["figures"]
    assert figure["config"]["width"] == 40 and figure["config"]["preset"] is None
    curves = {c["label"]: c for c in figure["curves"]}
    assert list(curves) == ["vanilla", "specreg (beta=1)", "specreg (beta=2)",
                            "specreg (beta=5)"]
    five = curves["specreg (beta=5)"]
    assert five["seeds"] == [0, 1, 2]
    acc = np.array([[0.8, 0.6, 0.2], [0.8, 0.7, 0.3], [0.8, 0.6, 0.2]])
    assert five["robustness"]["pgd"]["mean"] == pytest.approx(acc.mean(0).tolist())
    assert five["robustness"]["pgd"]["std"] == pytest.approx(acc.std(0).tolist())
    assert five["alpha_tau_to_n"]["mean"] == pytest.approx(1.1)
    assert five["alpha_tau_to_n"]["std"] == pytest.approx(np.std([1.0, 1.1, 1.2]))
    assert five["alpha_tau_to_n"]["ranks"] == [10, 40]
    assert five["effective_dimension"] == {"mean": 31.0, "std": pytest.approx(np.std([30, 31, 32])),
                                           "n": 3}
    assert five["penalty_per_epoch_per_beta"]["mean"] == pytest.approx([0.06, 0.04])
    assert "penalty_per_epoch_per_beta" not in curves["vanilla"]
    (best,) = figure["best_beta"]
    assert best["label"] == "specreg (best beta per seed)"
    assert best["selection"]["betas_by_seed"] == {"0": 2.0, "1": 5.0, "2": 1.0}
    assert best["robustness"]["pgd"]["mean"][1] == pytest.approx((0.6 + 0.7 + 0.5) / 3)


def test_summary_keeps_json_free_of_nan():
    runs = [_run(s, beta=2.0, penalty=(None, 0.2)) for s in range(2)]
    (figure,) = sweep_summary(runs)["figures"]
    penalty = figure["curves"][0]["penalty_per_epoch_per_beta"]
    assert penalty["mean"] == [None, pytest.approx(0.1)]
    json.dumps(figure, allow_nan=False)


def test_a_scheme_names_its_runs_and_curves_apart():
    cfg = RunConfig("shallow", "shallow", "specreg", beta=5.0, scheme="fresh-basis")
    assert cfg.name == "shallow-specreg-fresh-basis-beta5-seed0"
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    for bad in ("Fresh", "a b", "-x", "", 3):
        with pytest.raises(ValueError, match="scheme: expected lower-case"):
            RunConfig("shallow", "shallow", "specreg", beta=5.0, scheme=bad)
    runs = [_run(0, beta=5.0), _run(0, beta=5.0, scheme="fresh-basis"),
            _run(0, beta=2.0, scheme="fresh-basis")]
    (groups,) = group_runs(runs).values()
    assert list(groups) == ["specreg (beta=5)", "specreg fresh-basis (beta=2)",
                            "specreg fresh-basis (beta=5)"]
    (pick,) = best_beta_per_seed(groups)  # only the scheme with two betas
    assert pick["variant"] == "specreg fresh-basis"


def test_plot_command_writes_the_best_beta_figure_and_the_summary(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    results = tmp_path / "results"
    results.mkdir()
    for r in _sweep():
        (results / f"{r['name']}.json").write_text(json.dumps(r))
    assert main(["plot", str(results)]) == 0
    printed = capsys.readouterr().out
    figures = results / "figures"
    assert (figures / "shallow-best-beta.png").is_file()
    assert str(figures / "summary.json") in printed
    summary = json.loads((figures / "summary.json").read_text())
    assert summary["runs"] == 12 and summary["figures"][0]["best_beta"]


def test_best_beta_figure_names_the_chosen_betas():
    pytest.importorskip("matplotlib")
    from powerlaw_fast.paper import plots

    (groups,) = group_runs(_sweep()).values()
    fig = plots.plot_best_beta(groups, plots._pyplot())
    (ax,) = fig.axes
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[0].startswith("vanilla, 3 seeds")
    assert labels[1].startswith("specreg, best beta per seed (2, 5, 1), 3 seeds")
    plots._pyplot().close(fig)
    one_beta = [r for r in _sweep() if r["config"]["beta"] in (None, 5.0)]
    (groups,) = group_runs(one_beta).values()
    assert plots.plot_best_beta(groups, plots._pyplot()) is None


def test_more_than_ten_curves_get_distinct_colours():
    pytest.importorskip("matplotlib")
    from powerlaw_fast.paper import plots

    assert [plots.curve_colour(i, 10) for i in range(10)] == [f"C{i}" for i in range(10)]
    assert len({plots.curve_colour(i, 13) for i in range(13)}) == 13
