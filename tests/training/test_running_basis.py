"""``basis_update="running"``'s average (training/_running_basis.py): the global batch's
covariance over a process group (ranks as threads: tests/distributed_utils.py's ThreadGroup),
the step count a checkpoint keeps, and what a checkpoint's running covariances must be.

Found by `nox -s mutants -- training/_running_basis.py` (issue 28): each test fails for a
one-line change of _running_basis.py that the regulariser's tests let through."""

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from powerlaw_fast.training._running_basis import RunningBasis
from powerlaw_fast.training.regulariser import SpectralRegularizer
from tests.distributed_utils import ThreadGroup


def rows(n, width, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, width, generator=g, dtype=torch.float64)


def test_over_a_process_group_the_average_is_of_the_global_batchs_covariance(monkeypatch):
    x = rows(30, 3, seed=0) + 2.0
    shards = [x[:11], x[11:]]
    group = ThreadGroup([0, 1]).patch(monkeypatch)
    token = object()

    def body(rank):
        running = RunningBasis(momentum=0.5, every=1)
        running.fold({"a": shards[rank]}, group=token)
        return running.covariance["a"]

    for cov in group.run(body):
        torch.testing.assert_close(cov, torch.cov(x.T), rtol=1e-12, atol=1e-12)
    assert group.collectives and all(g is token for g in group.groups)


def test_the_average_is_an_exponential_one_and_due_every_k_steps():
    running = RunningBasis(momentum=0.25, every=3)
    batches = [rows(12, 2, seed=s) for s in range(5)]
    due = [running.fold({"a": b}, group=None) for b in batches]
    assert due == [True, False, False, True, False] and running.steps == 5
    expected = torch.cov(batches[0].T)
    for b in batches[1:]:
        expected = 0.75 * expected + 0.25 * torch.cov(b.T)
    torch.testing.assert_close(running.covariance["a"], expected, rtol=1e-12, atol=1e-14)
    assert running.state()["running_steps"] == 5


def test_a_non_finite_batch_is_refused_with_the_layers_name():
    bad = rows(4, 2, seed=1)
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"^layer 'h': x: contains NaN or infinite values$"):
        RunningBasis(momentum=0.1, every=1).fold({"h": bad}, group=None)


def test_inside_a_cuda_graph_capture_the_update_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match=(
        r"^SpectralRegularizer\(basis_update='running'\): the basis update cannot run inside a "
        r"CUDA graph capture \(eigh synchronises\); capture without the penalty or use "
        r"basis_update='epoch'$")):
        RunningBasis(momentum=0.1, every=1).fold({"a": rows(4, 2, seed=0)}, group=None)


def test_the_checkpoint_counts_the_penalty_calls():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.Tanh())
    reg = SpectralRegularizer(model, ["1"], tau=2, progress=False, backend="torch",
                              basis_update="running", basis_every=2)
    for seed in range(3):
        model(rows(16, 6, seed).float())
        reg.penalty()
    state = reg.state_dict()
    assert state["running_steps"] == 3 and set(state["running"]) == {"1"}


def test_an_epoch_checkpoint_warns_at_the_callers_line():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.Tanh())
    epoch = SpectralRegularizer(model, ["1"], tau=2, progress=False)
    epoch.refresh(rows(40, 6, seed=0).float())
    state = epoch.state_dict()
    epoch.remove()
    running = SpectralRegularizer(model, ["1"], tau=2, progress=False, basis_update="running")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        running.load_state_dict(state)  # the line the warning points at
    (w,) = caught
    assert str(w.message) == (
        "state: no running covariance for every layer (saved with basis_update='epoch' or by an "
        "older version): the running average restarts from the next batch")
    # at the caller's line; under mutmut, whose trampolines add two frames to every call of
    # the package, one of them is where stacklevel=3 lands (the test still tells a level that
    # points into the package or past the caller)
    assert w.filename == __file__ or "mutmut" in Path(w.filename).parts
    assert w.category is UserWarning


WIDTHS = {"a": (3, torch.device("cpu"))}


def test_load_copies_the_covariances_onto_each_layers_device():
    cov = torch.cov(rows(10, 3, seed=2).T)
    state = {"running": {"a": cov}, "running_steps": 4}
    running = RunningBasis(momentum=0.1, every=1)
    running.load(state, WIDTHS, expected=True)
    assert torch.equal(running.covariance["a"], cov) and running.steps == 4
    saved = cov.clone()
    cov.zero_()  # the checkpoint's tensor changed afterwards: the loaded average is a copy
    assert torch.equal(running.covariance["a"], saved)
    # the meta device stands in for a GPU: a covariance left on the CPU would show
    running.load(state, {"a": (3, torch.device("meta"))}, expected=True)
    assert running.covariance["a"].device.type == "meta"


def test_the_step_count_restarts_with_the_average():
    cov = torch.eye(3, dtype=torch.float64)
    running = RunningBasis(momentum=0.1, every=2)
    # averages without a step count (an older checkpoint): counted from 0
    running.load({"running": {"a": cov}}, WIDTHS, expected=True)
    assert running.steps == 0 and torch.equal(running.covariance["a"], cov)
    # an average for some layers only: it restarts, and so does the step count
    with pytest.warns(UserWarning, match="restarts"):
        running.load({"running": {"a": cov}, "running_steps": 5},
                     {**WIDTHS, "b": (2, torch.device("cpu"))}, expected=True)
    assert running.steps == 0 and running.covariance == {}


@pytest.mark.parametrize(
    "entries,match",
    [
        ([torch.eye(3)], r"^state: expected 'running' to be a mapping, got list$"),
        ({"zz": torch.eye(3, dtype=torch.float64)},
         r"^state: running covariance for unknown layer 'zz'$"),
        ({"a": torch.eye(2, dtype=torch.float64)},
         r"^state: layer 'a': expected a float64 \[3, 3\] running covariance, got torch\.float64 "
         r"\(2, 2\)$"),
        ({"a": torch.eye(3)},
         r"^state: layer 'a': expected a float64 \[3, 3\] running covariance, got torch\.float32 "
         r"\(3, 3\)$"),
        ({"a": [[1.0]]},
         r"^state: layer 'a': expected a float64 \[3, 3\] running covariance, got list \(\)$"),
    ],
)
def test_a_malformed_running_covariance_is_refused(entries, match):
    exc = TypeError if isinstance(entries, list) else ValueError
    with pytest.raises(exc, match=match):
        RunningBasis(momentum=0.1, every=1).load({"running": entries}, WIDTHS, expected=False)
