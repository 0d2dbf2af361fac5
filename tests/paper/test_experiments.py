"""The experiment runner: configs, models, one run's JSON, atomic writes, resumable sweeps."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from powerlaw_fast.paper import experiments as ex
from powerlaw_fast.paper.experiments import RunConfig
from powerlaw_fast.paper.whitening import Whiten

TINY = dict(
    epochs=1, width=16, lr=1e-3, limit_train=120, limit_test=40, fgsm_eps=(0.0, 0.1),
    pgd_eps=(0.0, 0.1), noise_sigma=(0.3,), pgd_steps=2, sensitivity_ranks=(1, 3, 50),
    eval_batch=64,
)


@pytest.fixture(scope="module")
def data():
    return ex.load_data("shipped", 120, 40)


@pytest.fixture(scope="module")
def shallow_result(data, tmp_path_factory):
    cfg = RunConfig("shallow", "shallow", "specreg", seed=0, beta=2.0, batch_size=40, **TINY)
    path = tmp_path_factory.mktemp("run") / f"{cfg.name}.json"
    result = ex.run_experiment(cfg, data, device="cpu", out_path=path, progress=False)
    return cfg, path, result


# ------------------------------------------------------------------------------------------------
# Configs


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(experiment="nope", arch="mlp", variant="vanilla"), "experiment"),
        (dict(experiment="shallow", arch="cnn", variant="vanilla"), "arch"),
        (dict(experiment="whitening", arch="shallow", variant="vanilla"), "arch"),
        (dict(experiment="whitening", arch="mlp", variant="jacobian"), "variant"),
        (dict(experiment="whitening", arch="tcn", variant="vanilla"), "arch"),
        (dict(experiment="shallow", arch="shallow", variant="specreg"), "beta"),
        (dict(experiment="shallow", arch="shallow", variant="specreg", beta=-1.0), "beta"),
        (dict(experiment="shallow", arch="shallow", variant="vanilla", epochs=0), "epochs"),
    ],
)
def test_run_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RunConfig(**kwargs)


def test_run_config_roundtrip_and_name():
    cfg = RunConfig("whitening", "cnn", "whiten+specreg-last", seed=2, beta=5.0, epochs=3)
    assert cfg.name == "whitening-cnn-whiten_specreg-last-beta5-seed2"
    again = RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    # beta is meaningless for an unregularised variant, so it cannot split its runs
    assert RunConfig("shallow", "shallow", "vanilla", beta=3.0).beta is None


@pytest.mark.parametrize(
    "experiment, arch, per_seed",
    [("shallow", None, 1 + 2), ("whitening", "mlp", 2 + 2 * 2), ("all-layers", "cnn", 2 + 2)],
)
def test_sweep_configs_cover_every_variant(experiment, arch, per_seed):
    configs = ex.sweep_configs(experiment, arch=arch, seeds=2, betas=[1, 5], epochs=1)
    assert len(configs) == 2 * per_seed
    assert len({c.name for c in configs}) == len(configs)
    assert [c.seed for c in configs] == sorted(c.seed for c in configs)  # seed-major
    assert {c.variant for c in configs} == set(ex.EXPERIMENTS[experiment])
    with pytest.raises(ValueError, match="seeds"):
        ex.sweep_configs(experiment, arch=arch, seeds=0)


@pytest.mark.parametrize(
    "experiment, arch, variant, layers, batch",
    [
        ("shallow", "shallow", "specreg", ["hidden1"], 3000),
        ("shallow", "shallow", "vanilla", [], 3000),
        ("whitening", "mlp", "specreg-last", ["hidden3"], 1500),
        ("whitening", "mlp", "whiten", [], 1500),
        ("all-layers", "mlp", "specreg-all", ["hidden1", "hidden2", "hidden3"], 1500),
        ("all-layers", "cnn", "specreg-all", ["conv1", "conv2", "fc"], math.ceil(1.5 * 2704)),
        ("whitening", "cnn", "whiten+specreg-last", ["fc"], math.ceil(1.5 * 2704)),
    ],
)
def test_build_model_layers_and_paper_batch_rule(experiment, arch, variant, layers, batch):
    cfg = RunConfig(experiment, arch, variant, beta=1.0)
    model, regularised = ex.build_model(cfg)
    assert regularised == layers
    assert ex.batch_size_for(cfg, model) == batch
    whitened = [m for m in model.modules() if isinstance(m, Whiten)]
    assert len(whitened) == (1 if variant.startswith("whiten") else 0)
    if whitened:
        assert whitened[0].eval_mode == "running"
        second = list(model.hidden_layers().values())[1]
        assert any(m is whitened[0] for m in second.modules())


# ------------------------------------------------------------------------------------------------
# One run


def test_run_experiment_writes_a_complete_json(shallow_result):
    cfg, path, result = shallow_result
    on_disk = json.loads(path.read_text())
    assert on_disk == json.loads(json.dumps(result))
    assert on_disk["status"] == "complete" and on_disk["config"] == cfg.to_dict()
    assert on_disk["model"]["regularised_layers"] == ["hidden1"]
    assert on_disk["model"]["batch_size"] == 40
    history = on_disk["history"]
    assert len(history) == 1 and history[0]["steps"] == 3  # 120 // 40
    assert history[0]["penalty"] > 0.0
    assert 0.0 <= on_disk["test_accuracy"] <= 1.0
    for attack, grid in (("fgsm", [0.0, 0.1]), ("pgd", [0.0, 0.1]), ("noise", [0.3])):
        curve = on_disk["robustness"][attack]
        assert curve["eps"] == grid and len(curve["accuracy"]) == len(grid)
        assert curve["n_samples"] == 40 and "success" not in curve
    # eps = 0 is the clean accuracy, whatever the attack
    assert on_disk["robustness"]["fgsm"]["accuracy"][0] == pytest.approx(on_disk["test_accuracy"])
    spec = on_disk["spectra"]["hidden1"]
    lam = spec["eigenvalues"]
    assert len(lam) == 16 and lam == sorted(lam, reverse=True)
    assert 1 <= spec["effective_dimension"] <= 16
    sens = on_disk["sensitivity"]
    assert sens["layer"] == "hidden1" and sens["ranks"] == [1, 3]  # rank 50 > width dropped
    assert [len(sens["maps"]), len(sens["maps"][0]), len(sens["maps"][0][0])] == [2, 28, 28]


def test_run_is_reproducible_for_a_seed(data, shallow_result):
    cfg, _, result = shallow_result
    again = ex.run_experiment(cfg, data, device="cpu", progress=False)
    assert again["history"][0]["loss"] == pytest.approx(result["history"][0]["loss"], rel=1e-5)
    assert again["spectra"]["hidden1"]["eigenvalues"] == pytest.approx(
        result["spectra"]["hidden1"]["eigenvalues"], rel=1e-4)


@pytest.mark.parametrize(
    "experiment, arch, variant",
    [("all-layers", "mlp", "jacobian"), ("all-layers", "mlp", "specreg-all"),
     ("whitening", "mlp", "whiten+specreg-last"), ("whitening", "cnn", "whiten")],
)
def test_each_variant_trains(data, experiment, arch, variant):
    cfg = RunConfig(experiment, arch, variant, beta=1.0, batch_size=60, refresh_every=1,
                    **{**TINY, "sensitivity_ranks": (1,), "fgsm_eps": (0.1,), "pgd_eps": (),
                       "noise_sigma": ()})
    result = ex.run_experiment(cfg, data, device="cpu", progress=False)
    assert sorted(result["robustness"]) == ["fgsm"]
    assert math.isfinite(result["history"][0]["loss"])
    penalised = variant != "whiten"
    assert (result["history"][0]["penalty"] > 0) == penalised
    assert set(result["spectra"]) == set(result["model"]["hidden_widths"])


def test_batch_larger_than_the_data_is_capped(data):
    cfg = RunConfig("shallow", "shallow", "vanilla", batch_size=500,
                    **{**TINY, "pgd_eps": (), "fgsm_eps": (), "noise_sigma": ()})
    with pytest.warns(UserWarning, match="exceeds"):
        result = ex.run_experiment(cfg, data, device="cpu", progress=False)
    assert result["model"]["batch_size"] == 120 and result["history"][0]["steps"] == 1


# ------------------------------------------------------------------------------------------------
# Files


def test_write_json_atomic_leaves_no_partial_file(tmp_path):
    target = tmp_path / "sub" / "run.json"
    ex.write_json_atomic(target, {"a": 1})
    with pytest.raises(TypeError):
        ex.write_json_atomic(target, {"a": object()})  # fails half-way through json.dump
    assert json.loads(target.read_text()) == {"a": 1}  # the old file is untouched
    assert [p.name for p in target.parent.iterdir()] == ["run.json"]
    with pytest.raises(ValueError):
        ex.write_json_atomic(tmp_path / "nan.json", {"a": float("nan")})
    assert not (tmp_path / "nan.json").exists()


def test_read_result_accepts_only_complete_runs(tmp_path, shallow_result):
    _, path, _ = shallow_result
    assert ex.read_result(path) is not None
    text = path.read_text()
    (tmp_path / "partial.json").write_text(text[: len(text) // 2])
    (tmp_path / "running.json").write_text(json.dumps({"status": "running", "config": {}}))
    assert ex.read_result(tmp_path / "partial.json") is None
    assert ex.read_result(tmp_path / "running.json") is None
    assert ex.read_result(tmp_path / "missing.json") is None
    with pytest.raises(FileNotFoundError):
        ex.load_results(tmp_path / "missing")


def _tiny_sweep(**kw):
    overrides = {**TINY, "pgd_eps": (0.1,), "noise_sigma": (), "batch_size": 60, **kw}
    return ex.sweep_configs("shallow", seeds=2, betas=[1.0], **overrides)


def test_sweep_resumes_only_missing_or_partial_runs(tmp_path, data):
    configs = _tiny_sweep()
    first = ex.run_sweep(configs, tmp_path, data, device="cpu", progress=False)
    assert [w for _, w in first] == ["ran"] * 4
    paths = [tmp_path / f"{c.name}.json" for c in configs]
    assert all(p.exists() for p in paths)
    stamps = {p: p.stat().st_mtime_ns for p in paths}

    # an interruption: one run never written, one written non-atomically and cut off,
    # and the temporary file of a killed writer left behind
    paths[1].unlink()
    paths[2].write_text(paths[2].read_text()[:100])
    (tmp_path / f".{paths[3].name}.999.tmp").write_text("{")
    again = ex.run_sweep(configs, tmp_path, data, device="cpu", progress=False)
    assert [w for _, w in again] == ["skipped", "ran", "ran", "skipped"]
    assert paths[0].stat().st_mtime_ns == stamps[paths[0]]
    assert paths[3].stat().st_mtime_ns == stamps[paths[3]]
    assert all(ex.read_result(p) is not None for p in paths)

    # a changed config under the same name is not "complete": it is run again
    changed = _tiny_sweep(lr=5e-4)
    third = ex.run_sweep(changed[:1], tmp_path, data, device="cpu", progress=False)
    assert third == [(changed[0].name, "ran")]
    assert json.loads(paths[0].read_text())["config"]["lr"] == 5e-4


def test_sweep_under_torchrun_runs_its_share(tmp_path, data, monkeypatch):
    configs = _tiny_sweep()
    calls = []

    def fake_run(cfg, data, *, device, out_path, progress, parallel):
        assert parallel is None  # "runs" mode: no process group
        calls.append((cfg.name, device))
        ex.write_json_atomic(out_path, {"format": ex.RESULT_FORMAT, "status": "complete",
                                        "config": cfg.to_dict()})

    # run_sweep looks run_experiment up in its own module
    monkeypatch.setattr(ex.sweep, "run_experiment", fake_run)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    outcome = ex.run_sweep(configs, tmp_path, data, device="cpu", progress=False)
    assert [n for n, _ in outcome] == [configs[1].name, configs[3].name]
    assert all(device == torch.device("cpu") for _, device in calls)
    if torch.cuda.is_available():
        assert ex.sweep_device("cuda") == torch.device("cuda", 1)
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="RANK"):
        ex.run_sweep(configs, tmp_path, data, device="cpu", progress=False)
    assert sorted(os.listdir(tmp_path)) == sorted(f"{configs[i].name}.json" for i in (1, 3))


# ------------------------------------------------------------------------------------------------
# Data-parallel runs (2 CPU processes joined by gloo)


def _data_parallel_body(rank, world, cfg_dict, out_path):
    cfg = RunConfig.from_dict(cfg_dict)
    data = ex.load_data("shipped", cfg.limit_train, cfg.limit_test)
    parallel = ex.DataParallel.initialise(torch.device("cpu"))
    assert (parallel.rank, parallel.world) == (rank, world)
    result = ex.run_experiment(cfg, data, device="cpu", out_path=out_path if rank == 0 else None,
                               progress=False, parallel=parallel)
    assert (result is None) == (rank != 0)


@pytest.mark.parametrize("variant", ["specreg-all", "jacobian"])
def test_data_parallel_run_matches_one_process(tmp_path, data, variant):
    from tests.distributed_utils import run_on_processes

    cfg = RunConfig("all-layers", "mlp", variant, seed=3, beta=2.0, batch_size=60,
                    refresh_every=1, **{**TINY, "epochs": 2, "pgd_eps": (), "noise_sigma": (),
                                        "sensitivity_ranks": ()})
    path = tmp_path / "ddp.json"
    run_on_processes(_data_parallel_body, 2, tmp_path, cfg.to_dict(), str(path))
    parallel = json.loads(path.read_text())
    single = ex.run_experiment(cfg, data, device="cpu", progress=False)
    assert parallel["parallel"] == {"mode": "data", "world_size": 2}
    for a, b in zip(parallel["history"], single["history"], strict=True):
        # the Jacobian estimator draws different random projections per rank
        rel = 1e-4 if variant == "specreg-all" else 0.2
        assert a["cross_entropy"] == pytest.approx(b["cross_entropy"], rel=rel)
        assert a["penalty"] == pytest.approx(b["penalty"], rel=rel)
    if variant == "specreg-all":
        for layer in ("hidden1", "hidden3"):
            assert parallel["spectra"][layer]["eigenvalues"] == pytest.approx(
                single["spectra"][layer]["eigenvalues"], rel=1e-3, abs=1e-7)


def test_data_parallel_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="whitening"):
        ex.check_data_parallel(RunConfig("whitening", "mlp", "whiten"), torch.device("cpu"))
    with pytest.raises(ValueError, match="SyncBatchNorm"):
        ex.check_data_parallel(RunConfig("shallow", "shallow", "vanilla"), torch.device("cpu"))
    ex.check_data_parallel(RunConfig("shallow", "shallow", "vanilla", batch_norm=False),
                           torch.device("cpu"))


def _data_parallel_sweep_body(rank, world, cfg_dicts, out_dir):
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank))
    configs = [RunConfig.from_dict(d) for d in cfg_dicts]
    data = ex.load_data("shipped", configs[0].limit_train, configs[0].limit_test)
    first = ex.run_sweep(configs, out_dir, data, device="cpu", progress=False, parallel="data")
    assert [w for _, w in first] == ["ran"] * len(configs)
    if rank == 0:
        os.remove(os.path.join(out_dir, f"{configs[0].name}.json"))
    ex.DataParallel.initialise(torch.device("cpu")).barrier()
    again = ex.run_sweep(configs, out_dir, data, device="cpu", progress=False, parallel="data")
    assert [w for _, w in again] == ["ran"] + ["skipped"] * (len(configs) - 1)


def test_data_parallel_sweep_resumes_on_every_rank(tmp_path):
    from tests.distributed_utils import run_on_processes

    configs = ex.sweep_configs("all-layers", arch="mlp", seeds=1, betas=[1.0], batch_size=60,
                               **{**TINY, "pgd_eps": (), "noise_sigma": (),
                                  "sensitivity_ranks": ()})
    run_on_processes(_data_parallel_sweep_body, 2, tmp_path,
                     [c.to_dict() for c in configs], str(tmp_path / "out"))
    results = ex.load_results(tmp_path / "out")
    assert sorted(r["name"] for r in results) == sorted(c.name for c in configs)
    assert all(r["parallel"]["world_size"] == 2 for r in results)


def test_robustness_curve_repr_is_a_summary():
    from powerlaw_fast.attacks import robustness_curve

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    x, y = torch.rand(300, 1, 28, 28), torch.randint(0, 10, (300,))
    curve = robustness_curve(model, (x, y), [0.0, 0.1], attack="fgsm", progress=False)
    text = repr(curve)
    assert text.startswith("RobustnessCurve(attack='fgsm', eps=[0, 0.1], accuracy=[")
    assert "n_samples=300" in text and "tensor" not in text and len(text) < 200


# ------------------------------------------------------------------------------------------------
# Presets, batch-norm placement, the running basis and the per-run summary (issue 15)


def test_presets_hold_the_documented_settings():
    paper, authors, fresh = (ex.preset_fields(n) for n in ("paper", "authors", "fresh-basis"))
    assert set(ex.PRESETS) == {"paper", "authors", "fresh-basis"}
    assert all(ex.PRESETS[n]["why"] for n in ex.PRESETS)
    assert (paper["activation"], paper["batch_norm_position"], paper["lr"], paper["batch_size"],
            paper["epochs"], paper["basis_update"]) == ("sigmoid", "pre", 1e-4, None, 50, "epoch")
    assert (authors["activation"], authors["batch_norm_position"], authors["lr"],
            authors["batch_size"], authors["basis_update"], authors["convention"]) == (
        "tanh", "post", 1e-3, 3500, "epoch", "authors")
    assert (fresh["activation"], fresh["batch_norm_position"], fresh["lr"], fresh["batch_size"],
            fresh["basis_update"], fresh["basis_every"], fresh["basis_momentum"]) == (
        "tanh", "pre", 1e-3, None, "tracked", 1, 0.1)
    assert fresh["epochs"] >= 10
    # the paper preset is what a RunConfig without it means (so old sweeps resume)
    default = RunConfig("shallow", "shallow", "specreg", beta=1.0)
    assert RunConfig("shallow", "shallow", "specreg", beta=1.0, **paper) == default
    with pytest.raises(ValueError, match="preset: expected one of"):
        ex.preset_fields("nope")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(activation="gelu"), "activation: expected one of"),
        (dict(batch_norm_position="middle"), "batch_norm_position: expected one of"),
        (dict(basis_update="step"), "basis_update: expected one of"),
        (dict(basis_update="running", refresh_every=3), "refresh_every"),
        (dict(basis_momentum=0.0), "basis_momentum"),
        (dict(basis_every=0), "basis_every"),
    ],
)
def test_new_config_fields_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RunConfig("shallow", "shallow", "specreg", beta=1.0, **kwargs)


def test_mlp_refuses_a_sigmoid_activation():
    with pytest.raises(ValueError, match="tanh network"):
        RunConfig("whitening", "mlp", "vanilla", activation="sigmoid")


def test_batch_norm_after_the_activation_is_the_regularised_output():
    cfg = RunConfig("shallow", "shallow", "specreg", beta=1.0, width=16, activation="tanh",
                    batch_norm_position="post")
    model, layers = ex.build_model(cfg)
    block = model.blocks["hidden1"]
    kinds = [type(m).__name__ for m in block]
    assert kinds == ["Linear", "Tanh", "BatchNorm1d"] and layers == ["hidden1"]
    model.train()
    out = block(torch.rand(64, 784))  # batch-norm output: zero mean, unit variance per unit
    torch.testing.assert_close(out.mean(0), torch.zeros(16), atol=1e-5, rtol=0)
    pre, _ = ex.build_model(RunConfig("shallow", "shallow", "vanilla", width=16))
    assert [type(m).__name__ for m in pre.blocks["hidden1"]] == [
        "Linear", "BatchNorm1d", "Sigmoid"]


def test_running_basis_run_records_the_summary(data, monkeypatch):
    import powerlaw_fast.paper.experiments.training as training

    calls = {"refresh": 0}
    original = training.SpectralRegularizer.refresh

    def counting(self, *args, **kwargs):
        calls["refresh"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(training.SpectralRegularizer, "refresh", counting)
    settings = {**TINY, "pgd_eps": (), "noise_sigma": (), "sensitivity_ranks": (1,),
                **ex.preset_fields("fresh-basis"), "epochs": 2, "batch_size": 40}
    cfg = RunConfig("shallow", "shallow", "specreg", beta=2.0, **settings)
    result = ex.run_experiment(cfg, data, device="cpu", progress=False)
    assert calls["refresh"] == 0  # the tracked basis needs no pass over the data
    s = result["summary"]
    assert s["basis_update"] == "tracked" and s["layer"] == "hidden1"
    spec = result["spectra"]["hidden1"]
    assert s["alpha_tau_to_n"] == spec["alpha_fit"] and s["alpha_tau_to_n_window"] == [10, 16]
    assert s["alpha_decade"] == spec["alpha_fit_decade"]
    assert s["effective_dimension"] == spec["effective_dimension"] >= 1
    assert len(s["penalty_per_epoch"]) == 2 and all(p > 0 for p in s["penalty_per_epoch"])
    assert s["penalty_per_epoch_per_beta"] == [p / 2.0 for p in s["penalty_per_epoch"]]
    assert s["penalty_first_step"] > 0
    assert result["history"][0]["penalty_first_step"] == s["penalty_first_step"]


def test_vanilla_summary_has_no_penalty(data):
    cfg = RunConfig("shallow", "shallow", "vanilla", batch_size=40,
                    **{**TINY, "pgd_eps": (), "noise_sigma": (), "sensitivity_ranks": (1,)})
    s = ex.run_experiment(cfg, data, device="cpu", progress=False)["summary"]
    assert s["penalty_per_epoch"] is None and s["penalty_first_step"] is None
    assert s["alpha_decade"] is not None and s["layer"] == "hidden1"


def test_sweep_resumes_a_result_written_before_the_new_fields(data, tmp_path):
    (cfg,) = [c for c in _tiny_sweep() if c.variant == "vanilla" and c.seed == 0][:1]
    ex.run_sweep([cfg], tmp_path, data, device="cpu", progress=False)
    path = tmp_path / f"{cfg.name}.json"
    result = json.loads(path.read_text())
    for key in ("activation", "batch_norm_position", "basis_update", "basis_every",
                "basis_momentum"):
        del result["config"][key]  # as an older version wrote it
    path.write_text(json.dumps(result))
    assert ex.run_sweep([cfg], tmp_path, data, device="cpu", progress=False) == [
        (cfg.name, "skipped")]
    # the basis settings of a run without the penalty mean nothing: the same run
    same = RunConfig.from_dict({**cfg.to_dict(), "basis_update": "running"})
    assert ex.run_sweep([same], tmp_path, data, device="cpu", progress=False) == [
        (cfg.name, "skipped")]
    changed = RunConfig.from_dict({**cfg.to_dict(), "activation": "tanh"})
    assert ex.run_sweep([changed], tmp_path, data, device="cpu", progress=False) == [
        (cfg.name, "ran")]


def _fake_run(seed: int, variant: str, beta=None):
    lam = [1.0 / n * (1 + 0.1 * seed) for n in range(1, 41)]
    return {
        "name": f"r{variant}{seed}", "config": {"experiment": "shallow", "arch": "shallow",
                                               "variant": variant, "beta": beta, "tau": 10,
                                               "alpha": 1.0},
        "model": {"hidden_widths": {"hidden1": 40},
                  "regularised_layers": ["hidden1"] if beta else []},
        "spectra": {"hidden1": {"eigenvalues": lam}},
        "history": [{"penalty": (beta or 0) * (1.0 + seed) / (e + 1)} for e in range(3)],
        "robustness": {}, "data": {"n_train": 100, "source": "test"},
    }


def test_spectra_and_penalty_plots_draw_one_std_bands_over_seeds():
    from matplotlib.collections import PolyCollection

    from powerlaw_fast.paper import plots

    plt = plots._pyplot()
    runs = [_fake_run(s, "vanilla") for s in range(2)] + [
        _fake_run(s, "specreg", 2.0) for s in range(3)]
    (groups,) = plots.group_runs(runs).values()
    fig, (ax, pax) = plt.subplots(1, 2)
    plots.plot_spectra(groups, ax)
    assert sum(isinstance(c, PolyCollection) for c in ax.collections) == 2  # one band per curve
    assert plots.plot_penalty(groups, pax)
    (band,) = [c for c in pax.collections if isinstance(c, PolyCollection)]
    (line,) = pax.get_lines()
    # per unit beta, mean over seeds: epoch 1 -> (1 + 2 + 3) / 3 = 2
    assert line.get_ydata()[0] == pytest.approx(2.0)
    ys = band.get_paths()[0].vertices[:, 1]
    std = float(torch.tensor([1.0, 2.0, 3.0]).std(unbiased=False))
    assert max(ys) == pytest.approx(2.0 + std)
    plt.close(fig)


def test_random_basis_is_a_fixed_haar_basis_never_refreshed(data, monkeypatch):
    import powerlaw_fast.paper.experiments.training as training

    def refuse(self, *args, **kwargs):
        raise AssertionError("the random basis must never be refreshed")

    monkeypatch.setattr(training.SpectralRegularizer, "refresh", refuse)
    settings = {**TINY, "pgd_eps": (), "noise_sigma": (), "sensitivity_ranks": (1,),
                "epochs": 2, "batch_size": 40, "basis_update": "random"}
    cfg = RunConfig("shallow", "shallow", "specreg", beta=2.0, seed=3, **settings)
    model, layers = ex.build_model(cfg)
    history, reg = training.train_model(model, cfg, data, layers, torch.device("cpu"),
                                        progress=False)
    V = reg.basis("hidden1")
    expected = training.random_bases(model, layers, 3)["layers"]["hidden1"]["basis"]
    assert torch.equal(V, expected)  # installed once, untouched by two epochs of training
    eye = torch.eye(V.shape[0])
    assert torch.allclose(V.double().T @ V.double(), eye.double(), atol=1e-6)
    other = training.random_bases(model, layers, 4)["layers"]["hidden1"]["basis"]
    assert not torch.allclose(V, other)
    assert all(h["penalty"] > 0 for h in history)
    reg.remove()


def test_variants_without_the_penalty_store_default_basis_settings():
    cfg = RunConfig("shallow", "shallow", "vanilla", basis_update="random", basis_every=3,
                    basis_momentum=0.5, scheme="random-basis")
    assert (cfg.basis_update, cfg.basis_every, cfg.basis_momentum, cfg.scheme) == (
        "epoch", 1, 0.1, None)
    assert cfg.name == "shallow-vanilla-seed0"
    with pytest.raises(ValueError, match="refresh_every: applies to basis_update='epoch'"):
        RunConfig("shallow", "shallow", "specreg", beta=1.0, basis_update="random",
                  refresh_every=2)


def test_sweep_resumes_when_only_the_notes_changed(data, tmp_path):
    (cfg,) = [c for c in _tiny_sweep() if c.variant == "vanilla" and c.seed == 0][:1]
    ex.run_sweep([cfg], tmp_path, data, device="cpu", progress=False)
    reworded = RunConfig.from_dict({**cfg.to_dict(), "notes": {"preset": "paper",
                                                               "why": "reworded"}})
    assert ex.run_sweep([reworded], tmp_path, data, device="cpu", progress=False) == [
        (cfg.name, "skipped")]


# --- Issue 25: file names without the repeated model name; reproduce's checks; progress bars --


def test_run_names_name_the_architecture_once():
    shallow = RunConfig("shallow", "shallow", "specreg", beta=2.0, scheme="fresh-basis")
    assert shallow.name == "shallow-specreg-fresh-basis-beta2-seed0"
    assert shallow.legacy_name == "shallow-shallow-specreg-fresh-basis-beta2-seed0"
    mlp = RunConfig("whitening", "mlp", "vanilla", seed=1)
    assert mlp.name == mlp.legacy_name == "whitening-mlp-vanilla-seed1"
    assert [c.name for c in ex.sweep_configs("shallow", seeds=1, betas=[5.0])] == [
        "shallow-vanilla-seed0", "shallow-specreg-beta5-seed0"]


def test_sweep_resumes_from_a_result_under_its_old_name(data, tmp_path):
    (cfg,) = [c for c in _tiny_sweep() if c.variant == "vanilla" and c.seed == 0][:1]
    ex.run_sweep([cfg], tmp_path, data, device="cpu", progress=False)
    new, old = tmp_path / f"{cfg.name}.json", tmp_path / f"{cfg.legacy_name}.json"
    new.rename(old)  # as an older version named it
    (tmp_path / f".{cfg.legacy_name}.json.4242.tmp").write_text("{")  # its killed writer's
    assert ex.run_sweep([cfg], tmp_path, data, device="cpu", progress=False) == [
        (cfg.name, "skipped")]
    assert sorted(p.name for p in tmp_path.iterdir()) == [old.name]  # read, not duplicated
    # another config of the same run: rerun under the new name, the old file replaced
    changed = RunConfig.from_dict({**cfg.to_dict(), "activation": "tanh"})
    assert ex.run_sweep([changed], tmp_path, data, device="cpu", progress=False) == [
        (cfg.name, "ran")]
    assert sorted(p.name for p in tmp_path.iterdir()) == [new.name]
    assert len(ex.load_results(tmp_path)) == 1


def test_pgd_reach_warning_names_the_unreachable_eps_and_the_fix():
    from powerlaw_fast.paper.experiments.checks import pgd_reach_warning

    assert pgd_reach_warning(ex.sweep_configs("shallow", seeds=1)) is None  # 40 x 0.01 >= 0.3
    short = pgd_reach_warning(ex.sweep_configs("shallow", seeds=1, pgd_steps=20))
    assert "20 steps of 0.01, so it moves at most 0.2" in short
    assert "at eps 0.25 0.3 it cannot reach" in short and "--pgd-steps 30 or more" in short
    # exactly at the edge counts as reached (0.1 x 3 is 0.30000000000000004 in floats)
    edge = ex.sweep_configs("shallow", seeds=1, pgd_steps=3, pgd_step_size=0.1)
    assert pgd_reach_warning(edge) is None


def _vanilla(accuracy, seed=0, experiment="shallow", arch="shallow", variant="vanilla"):
    return {"config": {"experiment": experiment, "arch": arch, "variant": variant,
                       "epochs": 5, "lr": 1e-4},
            "data": {"n_train": 10000}, "history": [{"steps": 13}] * 5,
            "test_accuracy": accuracy, "seed": seed}


def test_undertrained_warning_is_the_vanilla_accuracy_below_the_threshold():
    from powerlaw_fast.paper.experiments.checks import UNDERTRAINED_ACCURACY, undertrained_warning

    assert UNDERTRAINED_ACCURACY == 0.95
    trained = [_vanilla(0.97), _vanilla(0.96, seed=1), _vanilla(0.5, variant="specreg")]
    assert undertrained_warning(trained) is None  # the regularised runs' accuracy is not it
    assert undertrained_warning([_vanilla(0.95)]) is None  # at the threshold: trained
    text = undertrained_warning([_vanilla(0.79), _vanilla(0.77, seed=1)])
    assert text.startswith("shallow: the vanilla network reached 0.780 clean test accuracy "
                           "(mean over 2 seed(s)), below 0.95: it is undertrained (5 epoch(s), "
                           "10000 training images, 65 optimiser steps, lr 0.0001; the paper: "
                           "50 epochs of 60000 images)")
    assert "--epochs" in text and "--limit-train" in text and "--lr" in text
    mixed = undertrained_warning([_vanilla(0.97), _vanilla(0.9, experiment="all-layers",
                                                          arch="mlp")])
    assert mixed.startswith("all-layers (mlp): the vanilla network reached 0.900")
    assert "\n" not in mixed and undertrained_warning([]) is None


class _Terminal:
    """A stand-in for a terminal's stderr (tqdm draws only where isatty() is true)."""

    def __init__(self, tty: bool):
        self.tty, self.text = tty, ""

    def isatty(self):
        return self.tty

    def write(self, text):
        self.text += text

    def flush(self):
        pass


@pytest.mark.parametrize("tty, n, drawn", [(True, 64, True), (True, 16, False),
                                           (False, 64, False)])
def test_robustness_curve_draws_a_bar_only_on_a_terminal_over_several_batches(
        monkeypatch, tty, n, drawn):
    import sys

    from powerlaw_fast.attacks import robustness_curve

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    x, y = torch.rand(n, 4), torch.randint(0, 3, (n,))
    stream = _Terminal(tty)
    monkeypatch.setattr(sys, "stderr", stream)
    robustness_curve(model, (x, y), [0.0, 0.1], attack="fgsm", batch_size=16)  # progress=True
    assert ("fgsm x 2 eps" in stream.text) is drawn, stream.text
    stream.text = ""
    robustness_curve(model, (x, y), [0.0, 0.1], attack="fgsm", batch_size=16, progress=False)
    assert stream.text == ""


def test_the_cpu_estimate_ranks_the_basis_updates_by_their_work():
    """Per step on a CPU: the per-epoch basis does the least, the tracked one (float32 moments
    in the basis and a float32 eigh) less than the exact running one (float64 moments and a
    float64 eigh), and the difference grows with N^3."""
    from powerlaw_fast.paper.experiments.estimate import run_flops

    def flops(update, width):
        cfg = RunConfig("shallow", "shallow", "specreg", beta=5.0, width=width, epochs=2,
                        basis_update=update)  # fmt: skip
        return run_flops(cfg, n_train=6000, n_test=1000)

    for width in (500, 2000):
        epoch, running, tracked = (flops(u, width) for u in ("epoch", "running", "tracked"))
        assert epoch < tracked < running, (width, epoch, tracked, running)
    assert flops("running", 2000) - flops("tracked", 2000) > 8 * (
        flops("running", 500) - flops("tracked", 500))
