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


# --- found by `nox -s mutants -- ops/status.py` (issue 28): each test below fails for a
# one-line change of status.py that the tests above let through


@pytest.mark.parametrize(
    "validate, mode",
    [(True, "immediate"), (False, "off"), ("immediate", "immediate"), ("deferred", "deferred"),
     ("off", "off")],
)  # fmt: skip
def test_validation_mode_maps_each_accepted_value(validate, mode):
    assert status.validation_mode(validate) == mode


@pytest.mark.parametrize("validate", ["eager", "", None, 1, 0, "True"])
def test_validation_mode_rejects_anything_else_with_a_clear_type_error(validate):
    with pytest.raises(TypeError, match=r"validate: expected True, False or one of .*got"):
        status.validation_mode(validate)


def test_deferred_errors_are_numbered_by_call_and_unlabelled_without_op_or_where():
    first = status._state["calls"] + 1
    with status.simulate_deferral(delay=10**9):
        status.check(torch.tensor([1.0]), "deferred", _raise_if_set(0))
        status.check(torch.tensor([0.0]), "deferred", _raise_if_set(1))
        status.check(torch.tensor([1.0]), "deferred", _raise_if_set(2))
        messages = []
        for _ in range(2):
            with pytest.raises(DeferredValidationError) as info:
                raise_pending_errors()
            messages.append(str(info.value))
    # no op, no where: the call is named by its number alone, with no empty "()" label
    assert f"deferred check of call #{first}, an earlier call" in messages[0]
    assert f"deferred check of call #{first + 2}, an earlier call" in messages[1]


def test_checks_are_not_collective_unless_asked():
    with status.simulate_deferral(delay=10**9):
        status.check(torch.tensor([1.0]), "deferred", _raise_if_set(0))
        status.poll()  # not done and not collective: neither waited for nor raised
        assert status.pending_count() == 1
        status.discard_pending()


def test_an_error_left_after_raise_pending_errors_is_raised_by_the_next_poll():
    with status.simulate_deferral():
        status.check(torch.tensor([1.0]), "deferred", _raise_if_set(0))
        status.check(torch.tensor([1.0]), "deferred", _raise_if_set(1))
        with pytest.raises(DeferredValidationError, match="check 0 failed"):
            raise_pending_errors()
        assert status.pending_count() == 1  # the second error: found, nothing pending
        with pytest.raises(DeferredValidationError, match="check 1 failed"):
            status.poll()
    assert status.pending_count() == 0


def test_a_check_is_settled_by_the_poll_after_its_copy_reports_done():
    # simulate_deferral(delay=d): the copy reports done to its (d + 1)-th query, one per poll
    with status.simulate_deferral(delay=2):
        status.check(torch.tensor([1.0]), "deferred", _raise_if_set(0))
        status.poll()
        status.poll()
        assert status.pending_count() == 1
        with pytest.raises(DeferredValidationError, match="check 0 failed"):
            status.poll()


def test_a_simulated_copy_is_done_once_waited_for():
    event = status._SimulatedEvent(5)
    event.synchronize()
    assert event.query() is True


def test_checks_after_an_unfinished_copy_are_not_queried():
    # copies finish in stream order: a later copy is not taken as done before an earlier one
    with status.simulate_deferral(delay=10**9):
        status.check(torch.tensor([0.0]), "deferred", _raise_if_set(0))
    with status.simulate_deferral(delay=0):
        status.check(torch.tensor([1.0]), "deferred", _raise_if_set(1))
        status.poll()
        assert status.pending_count() == 2
        status.discard_pending()


class _SpyOnWaits:
    """Counts the waits on simulated copies (on a GPU, reading before the wait reads garbage)."""

    def __init__(self, monkeypatch):
        self.waits = 0
        original = status._SimulatedEvent.synchronize

        def synchronize(event):
            self.waits += 1
            original(event)

        monkeypatch.setattr(status._SimulatedEvent, "synchronize", synchronize)


def test_every_check_is_waited_for_before_it_is_read(monkeypatch):
    spy = _SpyOnWaits(monkeypatch)
    with status.simulate_deferral(delay=10**9):
        for i in range(status.MAX_IN_FLIGHT + 1):
            status.check(torch.tensor([0.0]), "deferred", _raise_if_set(i))
        assert spy.waits == 1  # the oldest, settled to make room
        assert status.pending_count() == status.MAX_IN_FLIGHT
        status.check(torch.tensor([1.0]), "deferred", _raise_if_set(0), collective=True)
        status.check(torch.tensor([0.0]), "deferred", _raise_if_set(1))
        assert spy.waits == 3  # two more made room
        waits = spy.waits
        with pytest.raises(DeferredValidationError, match="check 0 failed"):
            status.poll()  # only the collective one is settled, by waiting
        assert spy.waits == waits + 1
        raise_pending_errors()  # the other MAX_IN_FLIGHT - 1, each waited for
        assert spy.waits == waits + 1 + status.MAX_IN_FLIGHT - 1
    assert status.pending_count() == 0


def test_found_and_pending_checks_are_both_counted():
    with status.simulate_deferral(delay=10**9):
        for i in range(status.MAX_IN_FLIGHT + 1):
            status.check(torch.tensor([1.0 if i == 0 else 0.0]), "deferred", _raise_if_set(i))
        # the first was settled to make room (an error found), MAX_IN_FLIGHT still pending
        assert status.pending_count() == status.MAX_IN_FLIGHT + 1
        with pytest.raises(DeferredValidationError, match="check 0 failed"):
            raise_pending_errors()


class _SpyOnCopies:
    """Records the host buffers the deferred path copies into, and how."""

    def __init__(self, monkeypatch, *, fail_first=False):
        self.targets, self.non_blocking = [], []
        self.fail = fail_first
        original = torch.Tensor.copy_

        def copy_(target, source, non_blocking=False):
            self.targets.append(target)
            self.non_blocking.append(non_blocking)
            if self.fail:
                self.fail = False
                raise RuntimeError("copy failed")
            return original(target, source, non_blocking)

        monkeypatch.setattr(torch.Tensor, "copy_", copy_)


def test_host_buffers_are_reused_and_filled_without_blocking(monkeypatch):
    width = 7919  # a width no other test uses: the spare pool starts without it
    with status.simulate_deferral():
        spy = _SpyOnCopies(monkeypatch)
        status.check(torch.zeros(width), "deferred", lambda values: None)
        raise_pending_errors()  # settled: the buffer goes back to the pool
        status.check(torch.zeros(width), "deferred", lambda values: None)
        raise_pending_errors()
        monkeypatch.undo()
    assert spy.targets[0] is spy.targets[1]
    assert spy.targets[0].dtype == torch.float32 and spy.targets[0].shape == (width,)
    assert spy.non_blocking == [True, True]


def test_the_buffer_of_a_failed_copy_is_reused(monkeypatch):
    width = 7907
    with status.simulate_deferral():
        spy = _SpyOnCopies(monkeypatch, fail_first=True)
        with pytest.raises(RuntimeError, match="copy failed"):
            status.check(torch.zeros(width), "deferred", lambda values: None)
        status.check(torch.tensor([0.0] * (width - 1) + [1.0]), "deferred", _fail_on_last)
        monkeypatch.undo()
        with pytest.raises(DeferredValidationError, match=f"value {width - 1} is bad"):
            raise_pending_errors()
    assert spy.targets[0] is spy.targets[1]
