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
    (legend,) = fig.legends  # one legend, below the panels
    labels = [t.get_text() for t in legend.get_texts()]
    assert labels == ["vanilla",
                      "specreg, each seed's best beta (seed 0: 2, seed 1: 5, seed 2: 1)"]
    title = fig.get_suptitle()
    assert "best beta per seed (" not in title  # says what "best" means instead
    assert "averaged over eps > 0" in title and "mean over 3 seeds" in title
    plots._pyplot().close(fig)
    one_beta = [r for r in _sweep() if r["config"]["beta"] in (None, 5.0)]
    (groups,) = group_runs(one_beta).values()
    assert plots.plot_best_beta(groups, plots._pyplot()) is None


def test_a_best_beta_every_seed_chose_is_marked_in_the_robustness_figure_not_repeated():
    pytest.importorskip("matplotlib")
    from powerlaw_fast.paper import plots

    # every seed is most robust at beta 2: the best-beta curve would be the beta 2 curve
    runs = [_run(s, "vanilla", pgd=(0.95, 0.3, 0.05)) for s in range(2)]
    runs += [_run(s, beta=b, pgd=(0.9, 0.6, 0.3) if b == 2.0 else (0.9, 0.5, 0.1))
             for s in range(2) for b in (1.0, 2.0)]
    (groups,) = group_runs(runs).values()
    assert plots.plot_best_beta(groups, plots._pyplot()) is None
    assert plots._uniform_best_betas(groups) == {
        "specreg (beta=2)": " (the best beta of every seed)"}


def test_more_than_ten_curves_get_distinct_colours():
    pytest.importorskip("matplotlib")
    from powerlaw_fast.paper import plots

    assert [plots.curve_colour(i, 10) for i in range(10)] == [f"C{i}" for i in range(10)]
    assert len({plots.curve_colour(i, 13) for i in range(13)}) == 13


def _thirteen_curves():
    """vanilla and four schemes x three betas, as benchmarks/results/cpu/reproduce/shallow-basis/"""
    runs = [_run(0, "vanilla")]
    for scheme in (None, "random-basis", "refresh-5", "running-basis"):
        runs += [_run(0, beta=b, scheme=scheme) for b in (1.0, 2.0, 5.0)]
    (groups,) = group_runs(runs).values()
    return groups


def test_thirteen_curves_read_as_families_one_colour_each_one_line_style_per_beta():
    pytest.importorskip("matplotlib")
    from powerlaw_fast.paper import plots

    groups = _thirteen_curves()
    styles = plots.curve_styles(groups)
    assert len(styles) == 13
    assert len({(s["color"], s["linestyle"]) for s in styles.values()}) == 13
    assert len({s["color"] for s in styles.values()}) == 5  # vanilla + four schemes
    family = [styles[f"specreg refresh-5 (beta={b})"] for b in (1, 2, 5)]
    assert len({s["color"] for s in family}) == 1
    assert [s["linestyle"] for s in family] == ["-", "--", ":"]


def _overlap(a, b) -> bool:
    return not (a.x1 <= b.x0 or b.x1 <= a.x0 or a.y1 <= b.y0 or b.y1 <= a.y0)


def test_legends_lie_outside_the_data_with_thirteen_curves(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from powerlaw_fast.paper import plots

    drawn = {}

    def keep(fig, path, plt):  # the figures as written, kept open to inspect
        fig.savefig(path)
        drawn[path.name] = fig
        return path

    monkeypatch.setattr(plots, "_save", keep)
    plots.plot_group(("shallow", "shallow"), _thirteen_curves(), tmp_path)
    assert {"shallow-spectra.png", "shallow-robustness.png"} <= set(drawn)
    for name in ("shallow-spectra.png", "shallow-robustness.png"):
        fig = drawn[name]
        renderer = fig.canvas.get_renderer()
        (legend,) = fig.legends
        labels = [t.get_text() for t in legend.get_texts()]
        assert sum(label.startswith(("vanilla", "specreg")) for label in labels) == 13, name
        assert len(labels) == len(set(labels)), name  # each curve once
        box = legend.get_window_extent(renderer)
        for ax in fig.axes:
            assert not ax.get_legend(), name
            assert not _overlap(box, ax.get_window_extent(renderer)), name
    plots._pyplot().close("all")


def test_spectrum_marks_the_ranks_of_the_power_law_fit_and_gives_each_alpha():
    pytest.importorskip("matplotlib")
    from powerlaw_fast.paper import plots

    runs = [_run(s, "vanilla") for s in range(2)] + [_run(s, beta=5.0) for s in range(2)]
    for i, r in enumerate(runs):
        r["spectra"]["hidden1"].update(alpha_fit=1.25 + 0.5 * (i % 2), window_fit=[10, 40],
                                       alpha_fit_decade=1.0, window_fit_decade=[10, 30])
    (groups,) = group_runs(runs).values()
    plt = plots._pyplot()
    fig, ax = plt.subplots()
    plots.plot_spectra(groups, ax, legend=False)
    _, labels = ax.get_legend_handles_labels()
    # mean over the seeds, and the first decade's exponent when its window differs
    assert r"vanilla: $\alpha$ = 1.50, 1.00 over ranks 10-30, 90% at rank" in labels[0]
    assert r"ranks of the power-law fit ($\alpha$, as the tables): 10-40" in labels
    (bar,) = [p for p in ax.patches if p.get_label().startswith("ranks of the power-law fit")]
    x0, x1 = bar.get_x(), bar.get_x() + bar.get_width()
    assert (x0, x1) == (10, 40)
    assert "basis in use" not in ax.get_title()
    plt.close(fig)


def test_sensitivity_maps_each_on_its_own_scale_with_a_colour_bar():
    pytest.importorskip("matplotlib")
    from powerlaw_fast.paper import plots

    big = [[1e-4 * (i - j) for j in range(4)] for i in range(4)]
    small = [[1e-9 * (i + j - 3) for j in range(4)] for i in range(4)]
    runs = [_run(0, "vanilla"), _run(0, beta=5.0)]
    for r, maps in zip(runs, ([big, small], [small, [[0.0] * 4] * 4]), strict=True):
        r["sensitivity"] = {"layer": "hidden1", "sample": 0, "ranks": [1, 40], "maps": maps,
                            "image": [[0.5] * 4] * 4}
    (groups,) = group_runs(runs).values()
    fig = plots.plot_sensitivity(groups, plots._pyplot())
    images = [im for ax in fig.axes for im in ax.get_images() if im.get_cmap().name == "seismic"]
    assert len(images) == 4
    for im in images[:3]:  # a map 1e5 times smaller than another still spans the scale
        assert np.abs(im.get_array()).max() == pytest.approx(1.0)
        assert im.get_clim() == (-1.0, 1.0)
    assert np.abs(images[3].get_array()).max() == 0.0  # an all-zero map stays white
    labels = [ax.get_xlabel() for ax in fig.axes]
    assert "largest 3.0e-04" in labels and "largest 3.0e-09" in labels
    (bar,) = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert "largest magnitude" in bar.get_ylabel()
    plots._pyplot().close(fig)


def test_a_summary_alone_redraws_the_robustness_figures_as_the_runs_do(tmp_path, monkeypatch,
                                                                        capsys):
    pytest.importorskip("matplotlib")
    from powerlaw_fast.paper import plots

    drawn = {}

    def keep(fig, path, plt):
        fig.savefig(path)
        drawn[path.parent.name, path.name] = fig
        return path

    monkeypatch.setattr(plots, "_save", keep)
    runs = _sweep()
    (groups,) = group_runs(runs).values()
    plots.plot_group(("shallow", "shallow"), groups, tmp_path / "runs")
    # a folder kept with only its summary.json, as benchmarks/results/cpu/reproduce/*/
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "summary.json").write_text(json.dumps(sweep_summary(runs)))
    stale = kept / "shallow-spectra.png"
    stale.write_bytes(b"old")
    assert main(["plot", str(kept), "--out", str(kept)]) == 0
    printed = capsys.readouterr().out
    assert "no run JSONs" in printed and "the spectra and sensitivity maps need" in printed
    assert json.loads((kept / "summary.json").read_text())["runs"] == 12  # left as it was
    assert stale.read_bytes() == b"old"  # what it cannot redraw stays
    for name in ("shallow-robustness.png", "shallow-best-beta.png"):
        from_runs, from_summary = drawn["runs", name], drawn["kept", name]
        assert from_runs.get_suptitle() == from_summary.get_suptitle(), name
        (a,), (b,) = from_runs.legends, from_summary.legends
        assert [t.get_text() for t in a.get_texts()] == [t.get_text() for t in b.get_texts()]
        for ax_a, ax_b in zip(from_runs.axes, from_summary.axes, strict=True):
            for line_a, line_b in zip(ax_a.get_lines(), ax_b.get_lines(), strict=True):
                assert np.allclose(line_a.get_xydata(), line_b.get_xydata(), equal_nan=True)
    plots._pyplot().close("all")
