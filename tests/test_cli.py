"""The command line: demo, reproduce (resumable), plot, and its error handling."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from powerlaw_fast.cli import main

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY_REPRODUCE = [
    "--limit-train", "300", "--limit-test", "40", "--epochs", "1", "--seeds", "2",
    "--beta", "1", "--width", "24", "--batch-size", "100", "--eps", "0", "0.1",
    "--noise", "0.3", "--pgd-steps", "2", "--no-progress",
]


FIGURES = ["shallow-robustness.png", "shallow-sensitivity.png", "shallow-spectra.png"]


def _is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG_MAGIC


def _pngs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.png"))


def test_demo_quick_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "784-64-10" in printed and "(paper: 784-2000-10)" in printed
    assert "FGSM: test accuracy" in printed and "PGD" in printed
    runs = sorted(p.name for p in out.glob("shallow-*.json"))
    # vanilla, SpecReg with the paper's per-epoch basis and SpecReg with a fresh basis
    assert runs == ["shallow-specreg-beta5-seed0.json",
                    "shallow-specreg-fresh-basis-beta5-seed0.json",
                    "shallow-vanilla-seed0.json"]
    summary = json.loads((out / "demo.json").read_text())
    assert summary["settings"]["quick"] is True
    assert summary["runs"] == [runs[2], runs[0], runs[1]]
    assert _pngs(out) == sorted(summary["figures"]) == FIGURES
    configs = {n: json.loads((out / n).read_text())["config"] for n in runs}
    assert configs[runs[0]]["basis_update"] == "epoch" and configs[runs[0]]["scheme"] is None
    assert configs[runs[1]]["basis_update"] == "running" and configs[runs[1]]["basis_every"] == 1
    # the closing table: one verdict line per regularised variant, from the summary's numbers
    sweep = json.loads((out / summary["summary"]).read_text())
    curves = {c["label"]: c for c in sweep["figures"][0]["curves"]}
    assert list(curves) == ["vanilla", "specreg (beta=5)", "specreg fresh-basis (beta=5)"]
    assert "The paper's claims for this net" in printed
    for label in list(curves)[1:]:
        assert f"  {label}: more robust than vanilla: " in printed
    for c in curves.values():
        assert f"{c['robustness']['pgd']['mean'][-1]:.3f}" in printed
        assert f"{c['alpha_tau_to_n']['mean']:.2f}" in printed
    assert all(_is_png(out / name) for name in summary["figures"])
    assert "smoke test" in printed and "mean nothing" in printed
    for name in runs:
        result = json.loads((out / name).read_text())
        assert result["status"] == "complete" and result["config"]["width"] == 64
        # the printed table holds exactly the accuracies in the JSON
        for acc in result["robustness"]["pgd"]["accuracy"]:
            assert f"{acc:.3f}" in printed
        # PGD can reach the largest eps (steps x step size >= eps), so it is at least FGSM
        cfg = result["config"]
        assert cfg["pgd_steps"] * cfg["pgd_step_size"] >= max(cfg["pgd_eps"])
        fgsm, pgd = (result["robustness"][a]["accuracy"] for a in ("fgsm", "pgd"))
        assert all(p <= f for p, f in zip(pgd, fgsm, strict=True))
        sens = result["sensitivity"]
        assert len(sens["image"]) == 28 and len(sens["image"][0]) == 28


def test_reproduce_writes_one_json_per_run_and_resumes(tmp_path, capsys):
    out = tmp_path / "results"
    args = ["reproduce", "shallow", "--out", str(out), *TINY_REPRODUCE]
    assert main(args) == 0
    assert "4 run(s) done, 0 already complete" in capsys.readouterr().out
    runs = sorted(out.glob("*.json"))
    assert [p.name for p in runs] == [
        "shallow-specreg-beta1-seed0.json", "shallow-specreg-beta1-seed1.json",
        "shallow-vanilla-seed0.json", "shallow-vanilla-seed1.json"]
    assert _pngs(out / "figures") == FIGURES
    config = json.loads(runs[0].read_text())["config"]
    assert (config["lr"], config["tau"], config["alpha"], config["pgd_steps"]) == (1e-4, 10, 1, 2)
    stamps = {p.name: p.stat().st_mtime_ns for p in runs}

    # interrupted sweep: one JSON lost, a killed writer's temporary file left behind
    runs[1].unlink()
    (out / f".{runs[2].name}.4242.tmp").write_text('{"status": "comp')
    assert main(args) == 0
    assert "1 run(s) done, 3 already complete" in capsys.readouterr().out
    assert not (out / f".{runs[2].name}.4242.tmp").exists()  # the killed writer's, removed
    for p in runs:
        if p is runs[1]:
            assert json.loads(p.read_text())["status"] == "complete"
        else:
            assert p.stat().st_mtime_ns == stamps[p.name], f"{p.name} was run again"


def test_reproduce_whitening_mlp_tiny(tmp_path, capsys):
    out = tmp_path / "mlp"
    args = ["reproduce", "whitening", "--arch", "mlp", "--out", str(out), "--seeds", "1",
            "--limit-train", "120", "--limit-test", "20", "--epochs", "1", "--beta", "2",
            "--width", "16", "--batch-size", "60", "--eps", "0.1", "--noise", "--pgd-steps", "1",
            "--no-progress", "--no-plot"]
    assert main(args) == 0
    names = sorted(p.stem for p in out.glob("*.json"))
    assert names == ["whitening-mlp-specreg-last-beta2-seed0", "whitening-mlp-vanilla-seed0",
                     "whitening-mlp-whiten-seed0", "whitening-mlp-whiten_specreg-last-beta2-seed0"]
    result = json.loads((out / "whitening-mlp-whiten_specreg-last-beta2-seed0.json").read_text())
    assert result["model"]["regularised_layers"] == ["hidden3"]
    assert result["model"]["hidden_widths"] == {"hidden1": 16, "hidden2": 16, "hidden3": 16}
    assert sorted(result["robustness"]) == ["fgsm", "pgd"]
    assert not (out / "figures").exists()


def test_plot_redraws_from_results(tmp_path, capsys):
    out = tmp_path / "results"
    assert main(["reproduce", "shallow", "--out", str(out), "--no-plot", *TINY_REPRODUCE]) == 0
    capsys.readouterr()
    figures = tmp_path / "figs"
    assert main(["plot", str(out), "--out", str(figures)]) == 0
    printed = capsys.readouterr().out
    assert _pngs(figures) == FIGURES
    assert all(_is_png(p) for p in figures.glob("*.png"))
    assert "vanilla" in printed and "specreg (beta=1)" in printed
    assert main(["plot", str(out)]) == 0  # default: RESULTS_DIR/figures
    assert len(_pngs(out / "figures")) == 3


def test_plot_errors(tmp_path, capsys):
    assert main(["plot", str(tmp_path / "missing")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    (tmp_path / "junk.json").write_text("{not json")
    assert main(["plot", str(tmp_path)]) == 2
    assert "no complete run" in capsys.readouterr().err


def _corrupt_mnist(root: Path) -> Path:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (raw / f"{name}.gz").write_bytes(b"this is not gzip")
    return root


def _truncated_mnist(root: Path) -> Path:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    header = (0x00000803).to_bytes(4, "big") + (100).to_bytes(4, "big") + (28).to_bytes(4, "big")
    with gzip.open(raw / "train-images-idx3-ubyte.gz", "wb") as fh:
        fh.write(header + (28).to_bytes(4, "big") + bytes(50))  # 100 images promised, 50 bytes
    return root


@pytest.mark.parametrize(
    "command", [["demo", "--quick"], ["reproduce", "shallow", "--epochs", "1"]]
)
@pytest.mark.parametrize("make", ["missing", "corrupt", "truncated", "empty"])
def test_bad_data_folder_exits_2_with_one_line(tmp_path, capsys, command, make):
    root = tmp_path / "data"
    if make == "corrupt":
        _corrupt_mnist(root)
    elif make == "truncated":
        _truncated_mnist(root)
    elif make == "empty":
        root.mkdir()
    code = main([*command, "--data", str(root), "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("powerlaw-fast: error: cannot read MNIST from") and str(root) in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_bad_data_from_the_environment_variable(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("POWERLAW_FAST_DATA", str(_corrupt_mnist(tmp_path / "env")))
    assert main(["demo", "--quick", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "POWERLAW_FAST_DATA" in err and "corrupt gzip" in err


def test_module_entry_point_exit_code(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "powerlaw_fast", "demo", "--data", str(tmp_path / "nowhere")],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "cannot read MNIST" in proc.stderr
    assert proc.stdout == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda(tmp_path, capsys):
    assert main(["demo", "--quick", "--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_demo_refuses_torchrun(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["demo", "--quick", "--out", str(tmp_path / "o")]) == 2
    assert "not supported" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv", [[], ["reproduce", "nope"], ["reproduce", "shallow", "--seeds", "0"],
             ["reproduce", "shallow", "--beta", "-1"], ["demo", "--epochs", "x"]],
)
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" in err and "--help" in err



# --- Issue 16: the command line fails early, with one line and exit 2 -----------------------


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if a run starts: the errors below must come before any work."""
    import powerlaw_fast.cli as cli
    import powerlaw_fast.paper.experiments.demo as demo

    def refuse(*args, **kwargs):
        raise AssertionError("training started before the usage error")

    monkeypatch.setattr(demo, "run_experiment", refuse)
    monkeypatch.setattr(cli, "run_sweep", refuse)


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.mark.parametrize("command", [["demo", "--quick"], ["reproduce", "shallow"]])
def test_out_under_a_file_fails_before_any_work(tmp_path, capsys, no_training, command):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main([*command, "--out", str(afile / "sub"), "--no-progress"]) == 2
    _one_line_error(capsys, "--out", "which is a file")
    assert main([*command, "--out", str(afile), "--no-progress"]) == 2
    _one_line_error(capsys, "--out", "is not a folder")


@pytest.mark.parametrize("command", [["demo", "--quick"], ["reproduce", "shallow"]])
def test_unwritable_out_fails_before_any_work(tmp_path, capsys, no_training, command):
    if os.geteuid() == 0:  # root writes anywhere chmod allows nothing: use a kernel folder
        if not Path("/proc/self").exists():
            pytest.skip("needs /proc when run as root")
        target = Path("/proc")
    else:
        target = tmp_path / "readonly"
        target.mkdir()
        target.chmod(0o500)
    try:
        assert main([*command, "--out", str(target / "results"), "--no-progress"]) == 2
        _one_line_error(capsys, "--out: cannot write to")
        assert not (target / "results").exists()
    finally:
        if target != Path("/proc"):
            target.chmod(0o700)


def test_missing_matplotlib_is_found_before_training(tmp_path, capsys, no_training,
                                                     monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert main(["demo", "--quick", "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    _one_line_error(capsys, "matplotlib", "powerlaw-fast[plot]")
    assert main(["reproduce", "shallow", "--out", str(tmp_path / "r")]) == 2
    _one_line_error(capsys, "matplotlib", "--no-plot")
    assert main(["plot", str(tmp_path)]) == 2
    _one_line_error(capsys, "matplotlib")
    assert not (tmp_path / "o").exists() and not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "extra, needle",
    [(["--lr", "nan"], "--lr"), (["--lr", "-1"], "--lr"), (["--lr", "inf"], "--lr"),
     (["--batch-size", "1"], "--batch-size"), (["--eps", "inf"], "--eps"),
     (["--noise", "nan"], "--noise"), (["--seeds", "x"], "--seeds"),
     (["--data", ""], "--data")],
)
def test_bad_numbers_are_usage_errors(capsys, no_training, extra, needle):
    with pytest.raises(SystemExit) as info:
        main(["reproduce", "shallow", *extra])
    assert info.value.code == 2
    _one_line_error(capsys, f"argument {needle}")


@pytest.mark.parametrize(
    "extra, needle",
    [(["--width", "5"], "fewer than tau = 10"),
     (["--limit-train", "1"], "batches of 1 image"),
     (["--epochs", "1", "--pgd-steps", "1", "--seeds", "1"], None)],
)
def test_runs_that_would_fail_part_way_are_refused_first(tmp_path, capsys, no_training,
                                                         monkeypatch, extra, needle):
    if needle is None:  # control: valid arguments reach the sweep
        import powerlaw_fast.cli as cli

        monkeypatch.setattr(cli, "run_sweep", lambda *a, **k: [])
        assert main(["reproduce", "shallow", "--out", str(tmp_path), "--no-plot",
                     "--limit-train", "100", "--limit-test", "10", "--width", "16",
                     "--batch-size", "50", *extra]) == 0
        return
    assert main(["reproduce", "shallow", "--out", str(tmp_path), *extra]) == 2
    _one_line_error(capsys, needle)


def test_device_gpu_is_a_one_line_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["demo", "--device", "gpu"])
    assert info.value.code == 2
    err = _one_line_error(capsys, "--device", "expected cpu, cuda or cuda:N, got 'gpu'")
    assert "xla" not in err and "mps" not in err  # not torch's list of device types


# --- Issue 17: a tidy command line ----------------------------------------------------------


def test_version(capsys):
    from powerlaw_fast import __version__

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"powerlaw-fast {__version__}"


def _help(capsys, *argv) -> str:
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines


def test_help_texts(capsys):
    top = _help(capsys)
    # the demo's time as measured (the README gives the CPU time of a run), not "a minute"
    assert "demo' (a few minutes on a CPU)" in top and "(minutes on a CPU)" in top
    assert "minute on 2 CPU cores" not in top and "1 CPU min" not in top
    demo = _help(capsys, "demo")
    assert "6000 training images shipped" in demo and "default: ./powerlaw_fast_demo" in demo
    assert "smoke test" in demo
    rep = _help(capsys, "reproduce")
    for text in ("shallow: sec. 4.1", "default: ./powerlaw_fast_results",
                 "first N training images", "first N test images", "PGD steps of 0.01",
                 "(default: 3)", "L-inf epsilon grid"):
        assert text in rep, text
    plot = _help(capsys, "plot")
    assert "folder holding the run JSONs" in plot and "default: RESULTS_DIR/figures" in plot


@pytest.mark.skipif(torch.cuda.is_available(), reason="the estimate is printed on a CPU")
def test_reproduce_warns_with_an_estimate_on_the_cpu(tmp_path, capsys, monkeypatch):
    import powerlaw_fast.cli as cli
    from powerlaw_fast.paper.experiments import estimate

    monkeypatch.setattr(cli, "run_sweep", lambda *a, **k: [])
    # the GEMM speed is injected, so the verdict does not depend on this CPU's speed
    speed = {"flops": 1e11}
    monkeypatch.setattr(estimate, "gemm_flops_per_second", lambda *a, **k: speed["flops"])
    estimates = []
    real_estimate = estimate.estimate_seconds

    def spy(*args, **kwargs):
        estimates.append(real_estimate(*args, **kwargs))
        return estimates[-1]

    monkeypatch.setattr(estimate, "estimate_seconds", spy)
    shallow = ["reproduce", "shallow", "--out", str(tmp_path), "--no-plot"]
    assert main(shallow) == 0
    err = capsys.readouterr().err
    seconds, measured = estimates[-1]
    assert measured == 1e11
    # 12 runs of 50 epochs of the 2000-wide net: about 3e14 flops, so 50 min at 100 GFLOP/s
    assert 1e14 < seconds * 1e11 < 1e15
    assert (f"powerlaw-fast: warning: on this CPU this sweep should take about "
            f"{estimate.format_duration(seconds)} (a rough estimate: float32 GEMMs measured at "
            f"100 GFLOP/s here)") in err  # fmt: skip
    # the same sweep on a machine 100x faster: under SLOW_SWEEP_SECONDS, so no warning, but
    # the estimate all the same (issue 25: on a CPU always)
    speed["flops"] = 1e13
    assert main(shallow) == 0
    assert estimates[-1][0] < cli.SLOW_SWEEP_SECONDS < seconds
    printed = capsys.readouterr()
    assert "warning" not in printed.err
    assert f"  estimate: about {estimate.format_duration(estimates[-1][0])} on this CPU" in (
        printed.out)
    # a small sweep gets no warning, at the slow speed too, but still its estimate (issue 25)
    speed["flops"] = 1e11
    assert main([*shallow, *TINY_REPRODUCE]) == 0
    printed = capsys.readouterr()
    assert "should take about" not in printed.err
    assert (f"  estimate: about {estimate.format_duration(estimates[-1][0])} on this CPU (a "
            "rough estimate: float32 GEMMs measured at 100 GFLOP/s here)") in printed.out


def test_progress_bars_stay_out_of_piped_logs(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = [a for a in TINY_REPRODUCE if a != "--no-progress"]  # bars requested
    proc = subprocess.run(
        [sys.executable, "-m", "powerlaw_fast", "reproduce", "shallow", "--out",
         str(tmp_path / "r"), "--no-plot", *args, "--seeds", "1"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    for log in (proc.stdout, proc.stderr):
        assert "\r" not in log and "\x1b[" not in log and "it/s" not in log


# --- Issue 16: plot on damaged results folders -----------------------------------------------


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "results"
    assert main(["reproduce", "shallow", "--out", str(out), "--no-plot", *TINY_REPRODUCE]) == 0
    return out


def _copy(tiny_results, tmp_path) -> Path:
    import shutil

    return Path(shutil.copytree(tiny_results, tmp_path / "results"))


def test_plot_complete_json_missing_a_key(tiny_results, tmp_path, capsys):
    out = _copy(tiny_results, tmp_path)
    path = out / "shallow-vanilla-seed1.json"
    result = json.loads(path.read_text())
    del result["robustness"]
    path.write_text(json.dumps(result))
    assert main(["plot", str(out)]) == 2
    _one_line_error(capsys, str(path), "'robustness'")
    result["robustness"] = {"pgd": {"eps": [0.0]}}
    path.write_text(json.dumps(result))
    assert main(["plot", str(out)]) == 2
    _one_line_error(capsys, str(path), "'accuracy'")
    assert not (out / "figures").exists()


def test_plot_refuses_seeds_on_different_grids_before_drawing(tiny_results, tmp_path, capsys):
    out = _copy(tiny_results, tmp_path)
    path = out / "shallow-vanilla-seed1.json"
    result = json.loads(path.read_text())
    result["robustness"]["pgd"]["eps"] = [0.0, 0.2]
    path.write_text(json.dumps(result))
    assert main(["plot", str(out)]) == 2
    _one_line_error(capsys, "pgd grids differ", "shallow-vanilla-seed1")
    assert not (out / "figures").exists()


def test_plot_tables_with_different_grids_per_curve(tiny_results, tmp_path, capsys):
    # curves (not seeds) may differ: the table shows the union of the grids, '-' where missing
    out = _copy(tiny_results, tmp_path)
    for seed in (0, 1):
        path = out / f"shallow-vanilla-seed{seed}.json"
        result = json.loads(path.read_text())
        result["robustness"]["fgsm"]["eps"] = [0.0, 0.2]
        path.write_text(json.dumps(result))
    assert main(["plot", str(out)]) == 0
    table = capsys.readouterr().out.split("FGSM: test accuracy")[1].split("\n\n")[0]
    rows = {line.split()[0]: line.split()[1:] for line in table.strip().splitlines()[1:]}
    assert set(rows) == {"0.000", "0.100", "0.200"}
    assert rows["0.100"][0] == "-" and rows["0.200"][-1] == "-"


def test_plot_skips_truncated_json_and_reports_stale_temporary_files(tiny_results, tmp_path,
                                                                     capsys):
    out = _copy(tiny_results, tmp_path)
    path = out / "shallow-vanilla-seed1.json"
    path.write_text(path.read_text()[:200])  # cut short
    stale = out / ".shallow-vanilla-seed0.json.4242.tmp"
    stale.write_text('{"status": "comp')
    assert main(["plot", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"powerlaw-fast: warning: {path}: not valid JSON, skipped" in err
    assert "1 temporary file(s) of an interrupted writer ignored" in err and str(stale) in err
    assert _pngs(out / "figures") == FIGURES


# ------------------------------------------------------------------------------------------------
# reproduce --preset (issue 15)


def _captured_configs(monkeypatch, argv):
    """The configs ``reproduce`` would run (the sweep itself is replaced)."""
    import powerlaw_fast.cli as cli

    seen = []

    def fake_sweep(configs, out, data, **kwargs):
        seen.extend(configs)
        return [(c.name, "ran") for c in configs]

    monkeypatch.setattr(cli, "run_sweep", fake_sweep)
    assert main(argv) == 0
    return seen


def test_reproduce_presets_set_the_documented_configs(tmp_path, monkeypatch, capsys):
    base = ["--out", str(tmp_path / "r"), "--no-plot", "--limit-train", "300", "--limit-test",
            "40", "--width", "24", "--seeds", "1", "--beta", "2", "--no-progress"]
    default = _captured_configs(monkeypatch, ["reproduce", "shallow", *base])
    paper = _captured_configs(monkeypatch, ["reproduce", "shallow", "--preset", "paper", *base])
    assert "preset paper (the default)" in capsys.readouterr().out
    for d, p in zip(default, paper, strict=True):  # the same runs; only the note differs
        assert d.notes == {} and p.notes["preset"] == "paper"
        assert {**d.to_dict(), "notes": {}} == {**p.to_dict(), "notes": {}}
    specreg = [c for c in default if c.regularised][0]
    assert (specreg.activation, specreg.batch_norm_position, specreg.lr, specreg.batch_size,
            specreg.epochs, specreg.basis_update, specreg.convention) == (
        "sigmoid", "pre", 1e-4, None, 50, "epoch", "paper")

    authors = _captured_configs(monkeypatch, ["reproduce", "shallow", "--preset", "authors",
                                              *base])
    cfg = [c for c in authors if c.regularised][0]
    assert (cfg.activation, cfg.batch_norm_position, cfg.lr, cfg.batch_size, cfg.convention,
            cfg.basis_update) == ("tanh", "post", 1e-3, 3500, "authors", "epoch")
    assert "josuenassar" in cfg.notes["why"]

    fresh = _captured_configs(monkeypatch, ["reproduce", "shallow", "--preset", "fresh-basis",
                                            "--lr", "5e-4", "--epochs", "12", *base])
    cfg = [c for c in fresh if c.regularised][0]
    assert (cfg.activation, cfg.batch_norm_position, cfg.batch_size, cfg.basis_update,
            cfg.basis_every, cfg.basis_momentum) == ("tanh", "pre", None, "tracked", 1, 0.1)
    assert (cfg.lr, cfg.epochs) == (5e-4, 12)  # explicit options override the preset

    mlp = _captured_configs(monkeypatch, ["reproduce", "whitening", "--preset", "fresh-basis",
                                          *base])
    assert {c.activation for c in mlp} == {"tanh"}
    # the tracked basis for the regularised variants; the others have no basis
    assert {c.basis_update for c in mlp if c.regularised} == {"tracked"}
    assert {c.basis_update for c in mlp if not c.regularised} == {"epoch"}


def test_reproduce_fresh_basis_refuses_refresh_every(tmp_path, capsys):
    out = tmp_path / "r"
    code = main(["reproduce", "shallow", "--preset", "fresh-basis", "--refresh-every", "3",
                 "--out", str(out), *TINY_REPRODUCE])
    assert code == 2
    assert "refresh_every" in capsys.readouterr().err
    assert not list(out.glob("*.json"))


def test_reproduce_fresh_basis_tiny_run_records_the_summary(tmp_path, capsys):
    out = tmp_path / "r"
    args = [a if a != "2" else "1" for a in TINY_REPRODUCE]  # one seed (and 1-step PGD)
    assert main(["reproduce", "shallow", "--preset", "fresh-basis", "--out", str(out),
                 *args]) == 0
    assert "preset fresh-basis" in capsys.readouterr().out
    result = json.loads((out / "shallow-specreg-beta1-seed0.json").read_text())
    cfg = result["config"]
    assert cfg["basis_update"] == "tracked" and cfg["notes"]["preset"] == "fresh-basis"
    summary = result["summary"]
    for key in ("alpha_tau_to_n", "alpha_decade", "effective_dimension", "penalty_first_step"):
        assert summary[key] is not None
    assert len(summary["penalty_per_epoch"]) == 1
    assert _pngs(out / "figures") == FIGURES


def test_a_scheme_sweep_shares_the_folder_and_reuses_vanilla(tmp_path, capsys):
    out = tmp_path / "results"
    tiny = list(TINY_REPRODUCE)
    tiny[tiny.index("--seeds") + 1] = "1"
    assert main(["reproduce", "shallow", "--out", str(out), "--no-plot", *tiny]) == 0
    capsys.readouterr()
    assert main(["reproduce", "shallow", "--out", str(out), "--basis-update", "random",
                 "--scheme", "random-basis", *tiny]) == 0
    printed = capsys.readouterr().out
    assert "1 run(s) done, 1 already complete" in printed  # vanilla is the same run
    names = sorted(p.name for p in out.glob("*.json"))
    assert names == ["shallow-specreg-beta1-seed0.json",
                     "shallow-specreg-random-basis-beta1-seed0.json",
                     "shallow-vanilla-seed0.json"]
    cfg = json.loads((out / names[1]).read_text())["config"]
    assert cfg["basis_update"] == "random" and cfg["scheme"] == "random-basis"
    summary = json.loads((out / "figures" / "summary.json").read_text())
    labels = [c["label"] for c in summary["figures"][0]["curves"]]
    assert labels == ["vanilla", "specreg (beta=1)", "specreg random-basis (beta=1)"]


# --- Issue 25: reproduce says what it is doing ----------------------------------------------


def test_reproduce_warns_first_then_prints_the_tables_and_the_undertrained_verdict(
        tmp_path, capsys, monkeypatch):
    """Before any run: the PGD-reach warning (2 steps of 0.01 cannot reach eps 0.1); at the
    end: the tables 'plot' prints (also with --no-plot) and the undertrained warning."""
    import powerlaw_fast.cli as cli

    before = {}
    real_sweep = cli.run_sweep

    def spy(*args, **kwargs):
        before.update(err=capsys.readouterr().err)  # what was said before the first run
        return real_sweep(*args, **kwargs)

    monkeypatch.setattr(cli, "run_sweep", spy)
    out = tmp_path / "r"
    tiny = list(TINY_REPRODUCE)
    tiny[tiny.index("--seeds") + 1] = "1"
    assert main(["reproduce", "shallow", "--out", str(out), "--no-plot", *tiny]) == 0
    assert ("powerlaw-fast: warning: PGD takes 2 steps of 0.01, so it moves at most 0.02 from "
            "the clean input: at eps 0.1 it cannot reach the edge of the eps-ball and can come "
            "out weaker than FGSM") in before["err"]
    assert "--pgd-steps 10 or more" in before["err"]
    printed = capsys.readouterr()
    from powerlaw_fast.paper.experiments import load_results
    from powerlaw_fast.paper.plots import summary_table

    results = load_results(out)
    for attack in ("fgsm", "pgd", "noise"):  # exactly plot's tables
        assert summary_table(results, attack) in printed.out
    assert printed.out.index("run(s) done") < printed.out.index("FGSM: test accuracy")
    (vanilla,) = [r for r in results if r["config"]["variant"] == "vanilla"]
    assert vanilla["test_accuracy"] < 0.95  # one epoch on 300 images: undertrained
    assert (f"powerlaw-fast: warning: shallow: the vanilla network reached "
            f"{vanilla['test_accuracy']:.3f} clean test accuracy (mean over 1 seed(s)), below "
            "0.95: it is undertrained (1 epoch(s), 300 training images") in printed.err
    assert "--epochs" in printed.err and "--limit-train" in printed.err
    assert not (out / "figures").exists()


def test_reproduce_with_enough_pgd_steps_says_nothing_about_reach(tmp_path, capsys,
                                                                  monkeypatch):
    import powerlaw_fast.cli as cli

    monkeypatch.setattr(cli, "run_sweep", lambda *a, **k: [])
    args = list(TINY_REPRODUCE)
    args[args.index("--pgd-steps") + 1] = "10"  # 10 x 0.01 reaches eps 0.1
    assert main(["reproduce", "shallow", "--out", str(tmp_path / "r"), "--no-plot",
                 *args]) == 0
    assert "PGD takes" not in capsys.readouterr().err
