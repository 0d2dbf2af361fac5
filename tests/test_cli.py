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
    assert runs == ["shallow-shallow-specreg-beta5-seed0.json",
                    "shallow-shallow-vanilla-seed0.json"]
    summary = json.loads((out / "demo.json").read_text())
    assert summary["settings"]["quick"] is True and summary["runs"] == runs[::-1]
    assert _pngs(out) == sorted(summary["figures"]) == [
        "shallow-shallow-robustness.png", "shallow-shallow-sensitivity.png",
        "shallow-shallow-spectra.png"]
    assert all(_is_png(out / name) for name in summary["figures"])
    for name in runs:
        result = json.loads((out / name).read_text())
        assert result["status"] == "complete" and result["config"]["width"] == 64
        # the printed table holds exactly the accuracies in the JSON
        for acc in result["robustness"]["pgd"]["accuracy"]:
            assert f"{acc:.3f}" in printed


def test_reproduce_writes_one_json_per_run_and_resumes(tmp_path, capsys):
    out = tmp_path / "results"
    args = ["reproduce", "shallow", "--out", str(out), *TINY_REPRODUCE]
    assert main(args) == 0
    assert "4 run(s) done, 0 already complete" in capsys.readouterr().out
    runs = sorted(out.glob("*.json"))
    assert [p.name for p in runs] == [
        "shallow-shallow-specreg-beta1-seed0.json", "shallow-shallow-specreg-beta1-seed1.json",
        "shallow-shallow-vanilla-seed0.json", "shallow-shallow-vanilla-seed1.json"]
    assert _pngs(out / "figures") == [
        "shallow-shallow-robustness.png", "shallow-shallow-sensitivity.png",
        "shallow-shallow-spectra.png"]
    config = json.loads(runs[0].read_text())["config"]
    assert (config["lr"], config["tau"], config["alpha"], config["pgd_steps"]) == (1e-4, 10, 1, 2)
    stamps = {p.name: p.stat().st_mtime_ns for p in runs}

    # interrupted sweep: one JSON lost, a killed writer's temporary file left behind
    runs[1].unlink()
    (out / f".{runs[2].name}.4242.tmp").write_text('{"status": "comp')
    assert main(args) == 0
    assert "1 run(s) done, 3 already complete" in capsys.readouterr().out
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
    assert _pngs(figures) == [
        "shallow-shallow-robustness.png", "shallow-shallow-sensitivity.png",
        "shallow-shallow-spectra.png"]
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
    assert "usage:" in capsys.readouterr().err
