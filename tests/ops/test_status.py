"""Deferred validation (powerlaw_fast/ops/status.py): the control path a GPU takes, run here on
the CPU through ``simulate_deferral`` (the same host copy, the same queue, the same raise at a
later call), so a CPU-only suite catches what a GPU would hit."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest
import torch

from powerlaw_fast import projected_spectrum, raise_pending_errors, spec_penalty
from powerlaw_fast.ops import status
from powerlaw_fast.ops.grouped_penalty import grouped_penalty_torch
from powerlaw_fast.ops.status import DeferredValidationError
from tests.devices import DEVICE
from tests.ops.test_spec_penalty import make_batch

pytestmark = pytest.mark.skipif(DEVICE.type != "cpu", reason="simulates the GPU's path on a CPU")


def _bad_batch(seed=0, B=30, N=10):
    x, V = make_batch(B, N, seed=seed)
    bad = x.clone()
    bad[1, 2] = float("nan")
    return x, bad, V


def test_cpu_tensors_raise_at_once_by_default():
    _, bad, V = _bad_batch()
    with pytest.raises(ValueError, match="non-finite") as info:
        spec_penalty(bad, V, tau=2)
    assert not isinstance(info.value, DeferredValidationError)
    assert status.pending_count() == 0


def test_status_rows_of_any_width_are_deferred():
    # the grouped op sends 3 values per layer: the old fixed ring row of 4 could not hold 2+
    # layers and every grouped penalty on a GPU raised in the copy
    x, bad, V = _bad_batch(B=40, N=12)
    with status.simulate_deferral():
        for width in (1, 3, 6, 18, 300):
            status.check(torch.zeros(width), "deferred", lambda values: None)
        status.check(torch.tensor([0.0] * 299 + [1.0]), "deferred", _fail_on_last)
        with pytest.raises(DeferredValidationError, match="value 299 is bad"):
            raise_pending_errors()


def _fail_on_last(values):
    if values[-1]:
        raise ValueError(f"value {len(values) - 1} is bad")


def test_more_checks_in_flight_than_the_limit_lose_nothing():
    calls = status.MAX_IN_FLIGHT * 2 + 5
    with status.simulate_deferral(delay=10**9):  # never reported done unless waited for
        for i in range(calls):
            bad = 1.0 if i in (3, calls - 1) else 0.0
            status.check(torch.tensor([bad]), "deferred", _raise_if_set(i))
        assert status.pending_count() <= status.MAX_IN_FLIGHT + 1
        found = []
        for _ in range(2):
            with pytest.raises(DeferredValidationError) as info:
                raise_pending_errors()
            found.append(str(info.value))
    assert "check 3 failed" in found[0] and f"check {calls - 1} failed" in found[1]
    assert status.pending_count() == 0


def _raise_if_set(i):
    def raise_for(values):
        if values[0]:
            raise ValueError(f"check {i} failed")

    return raise_for


def test_a_failed_copy_leaves_nothing_pending(monkeypatch):
    with status.simulate_deferral():
        status.check(torch.zeros(3), "deferred", lambda values: None)

        def broken_copy(self, *args, **kwargs):
            raise RuntimeError("copy failed")

        monkeypatch.setattr(torch.Tensor, "copy_", broken_copy)
        with pytest.raises(RuntimeError, match="copy failed"):
            status.check(torch.zeros(3), "deferred", lambda values: None)
        monkeypatch.undo()
        assert status.pending_count() == 1  # only the check whose copy was issued
        raise_pending_errors()


def test_a_deferred_error_names_the_call_op_and_where_it_came_from():
    x, bad, V = _bad_batch()
    with status.simulate_deferral(delay=0):
        spec_penalty(x, V, tau=2)
        with status.where("layer 'fc2', step 7"):
            spec_penalty(bad, V, tau=2)
        with pytest.raises(DeferredValidationError) as info:
            projected_spectrum(x, V)  # raised before this call does any work
    message = str(info.value)
    assert "x: expected finite activations" in message
    assert "(spec_penalty, layer 'fc2', step 7)" in message
    number = int(message.split("call #")[1].split(" ")[0])
    assert number == status._state["calls"]  # the latest check made: the bad call's


def test_per_layer_wrappers_do_not_blame_the_current_layer_for_an_earlier_error():
    _, bad, V = _bad_batch(N=10)
    good, _ = make_batch(30, 10, seed=5)
    with status.simulate_deferral():
        with status.where("layer 'first'"):
            grouped_penalty_torch([bad], [V], alphas=[1.0], anchors=[1], betas=[1.0],
                                  convention="paper", names=["first"])  # fmt: skip
        with pytest.raises(DeferredValidationError) as info:
            grouped_penalty_torch([good], [V], alphas=[1.0], anchors=[1], betas=[1.0],
                                  convention="paper", names=["second"])  # fmt: skip
    assert "layer 'second'" not in str(info.value)
    assert "layer 'first'" in str(info.value)


def test_collective_checks_are_settled_by_the_next_call_whether_or_not_done():
    # ranks of a process group must raise at the same call; a collective check is waited for
    # at the next call instead of being left to whenever its copy happens to be done
    with status.simulate_deferral(delay=10**9):
        status.check(torch.tensor([1.0]), "deferred", _raise_if_set(0), collective=True)
        with pytest.raises(DeferredValidationError, match="check 0 failed"):
            status.poll()
        status.check(torch.tensor([1.0]), "deferred", _raise_if_set(1), collective=False)
        status.poll()  # not done, not collective: stays pending
        assert status.pending_count() == 1
        status.discard_pending()


def test_errors_pending_at_exit_are_written_to_stderr():
    script = (
        "import torch\n"
        "from powerlaw_fast import spec_penalty\n"
        "from powerlaw_fast.ops import status\n"
        "x = torch.randn(30, 10); x[0, 0] = float('nan')\n"
        "V = torch.eye(10)\n"
        "with status.simulate_deferral(delay=10**9):\n"
        "    spec_penalty(x, V, tau=2)\n"
        "print('returned')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "returned" in done.stdout
    assert "a deferred validation error was never raised" in done.stderr
    assert "x: expected finite activations" in done.stderr


def test_threads_share_the_queue_safely():
    x, V = make_batch(30, 10, seed=2)
    failures = []

    def worker():
        try:
            for _ in range(20):
                spec_penalty(x, V, tau=2)
        except Exception as err:  # noqa: BLE001 - any error fails the test below
            failures.append(err)

    with status.simulate_deferral(delay=1):
        threads = [threading.Thread(target=worker) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        raise_pending_errors()
    assert not failures
    assert status.pending_count() == 0


def test_nothing_is_recorded_with_validation_off_or_immediate():
    x, bad, V = _bad_batch()
    with status.simulate_deferral():
        spec_penalty(bad, V, tau=2, validate="off")
        with pytest.raises(ValueError, match="non-finite") as info:
            spec_penalty(bad, V, tau=2, validate="immediate")
        assert not isinstance(info.value, DeferredValidationError)
    assert status.pending_count() == 0
