"""benchmarks/reproduce_full_scale.sh: the full-scale sweeps a GPU session runs (issue 15)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "reproduce_full_scale.sh"
TINY = ("--epochs 1 --limit-train 300 --limit-test 50 --width 16 --seeds 1 --eps 0 0.1 --noise "
        "--pgd-steps 2")

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


def _run(tmp_path, *sweeps, **env):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, **env}
    env.setdefault("MNIST", "shipped")
    return subprocess.run(["bash", str(SCRIPT), *sweeps], env=env, capture_output=True,
                          text=True, timeout=600)


def test_a_sweep_writes_runs_figures_and_summary_then_resumes(tmp_path):
    pytest.importorskip("matplotlib")
    done = _run(tmp_path, "shallow-paper", REPRODUCE_ARGS=TINY, BUDGET="300")
    assert done.returncode == 0, done.stdout + done.stderr
    sweep = tmp_path / "reproduce" / "shallow-paper"
    runs = sorted(p.name for p in sweep.glob("*.json"))
    assert runs == [f"shallow-specreg-beta{b}-seed0.json" for b in (1, 2, 5)] + [
        "shallow-vanilla-seed0.json"]
    assert json.loads((sweep / runs[0]).read_text())["config"]["notes"]["preset"] == "paper"
    summary = json.loads((sweep / "figures" / "summary.json").read_text())
    assert summary["runs"] == 4 and summary["figures"][0]["best_beta"]
    assert (sweep / "figures" / "shallow-robustness.png").is_file()
    # one seed chose one beta: its best-beta curve is the robustness panel's, so not drawn
    assert not (sweep / "figures" / "shallow-best-beta.png").exists()
    assert "shallow-paper: exit 0" in (tmp_path / "reproduce" / "summary.txt").read_text()
    again = _run(tmp_path, "shallow-paper", REPRODUCE_ARGS=TINY, BUDGET="300")
    assert "0 run(s) done, 4 already complete" in again.stdout


def test_refuses_an_unknown_sweep_or_no_data(tmp_path):
    bad = _run(tmp_path, "shallow-nope")
    assert bad.returncode == 2 and "unknown sweep shallow-nope" in bad.stderr
    nodata = _run(tmp_path, "shallow-paper", MNIST="", POWERLAW_FAST_DATA="")
    assert nodata.returncode == 2 and "set MNIST" in nodata.stderr


def test_a_spent_budget_stops_before_the_next_sweep(tmp_path):
    stopped = _run(tmp_path, "shallow-paper", BUDGET="0")
    assert stopped.returncode == 1 and "budget spent before shallow-paper" in stopped.stdout
    assert not (tmp_path / "reproduce" / "shallow-paper").exists()
