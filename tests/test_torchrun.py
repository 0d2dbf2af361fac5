"""`python -m powerlaw_fast reproduce` under torchrun (2 CPU processes, gloo), both modes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "reproduce",
    "all-layers",
    "--arch",
    "mlp",
    "--width",
    "32",
    "--limit-train",
    "300",
    "--limit-test",
    "100",
    "--epochs",
    "1",
    "--seeds",
    "1",
    "--beta",
    "1",
    "--eps",
    "0",
    "0.1",
    "--noise",
    "--pgd-steps",
    "2",
    "--no-progress",
    "--no-plot",
    "--device",
    "cpu",
]


@pytest.mark.parametrize("mode", ["runs", "data"])
def test_reproduce_under_torchrun(tmp_path, mode):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(29500 + os.getpid() % 1000 + (mode == "data")),
        "-m",
        "powerlaw_fast",
        *TINY,
        "--parallel",
        mode,
        "--out",
        str(tmp_path),
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(p.name for p in tmp_path.glob("*.json"))
    assert runs == [
        "all-layers-mlp-jacobian-seed0.json",
        "all-layers-mlp-specreg-all-beta1-seed0.json",
        "all-layers-mlp-vanilla-seed0.json",
    ]
    for name in runs:
        record = json.loads((tmp_path / name).read_text())
        assert 0.0 <= record["test_accuracy"] <= 1.0
        if mode == "data":
            assert record["parallel"] == {"mode": "data", "world_size": 2}
