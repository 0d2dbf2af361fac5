"""Validation without a host synchronisation: on-device status words checked later.

The penalty kernels write a few status values next to their results (non-finite spectrum
values, a zero anchor, an overflowing penalty). Reading them on the host costs a
synchronisation, which on a GPU stalls the CPU until every queued kernel has run. Three modes:

- ``"immediate"`` (``True``): read the status at once and raise before returning (one sync).
- ``"deferred"`` (the default): copy the status to pinned host memory without blocking and
  raise a :class:`DeferredValidationError` (a ValueError) from the first later call of any op
  in this package that finds the copy complete, or from :func:`raise_pending_errors`. The value
  of the bad call has already been returned (it is NaN or meaningless); the error names the
  call it came from (its sequence number, the op, and the layer and step when the regulariser
  made it). On CPU tensors the status is already there, so "deferred" raises at once, like
  "immediate".
- ``"off"`` (``False``): never read it (the values are then whatever the arithmetic gives).

Rules of the deferred path:

- Inside a CUDA graph capture nothing can be read or recorded (replays run no Python):
  validate eagerly before capturing.
- With a process group (``collective=True`` checks) every rank holds the same status values,
  since they come from all-reduced moments; a rank must not raise at a different call than the
  others, or they would wait forever in the next all-reduce. So a collective check is always
  settled by the next call of an op of this package (a wait on an event that has long
  finished in a training loop), never "when it happens to be done": in SPMD code every rank
  raises at the same call.
- At interpreter exit every pending check is waited for and any error is written to stderr:
  nothing found is lost.
- Thread safety: the bookkeeping is guarded by a lock; an error is raised in whichever thread
  calls an op of this package next, so validate per thread with ``"immediate"`` if threads
  must see their own errors.

Example::

    >>> import torch
    >>> from powerlaw_fast.ops.status import validation_mode
    >>> validation_mode(True), validation_mode("deferred"), validation_mode(False)
    ('immediate', 'deferred', 'off')
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import sys
import threading
from collections.abc import Callable
from typing import NamedTuple

import torch

MODES = ("immediate", "deferred", "off")
MAX_IN_FLIGHT = 64  # deferred checks in flight before the oldest is waited for


class DeferredValidationError(ValueError):
    """A problem found by the deferred check of an earlier call (see the module docstring).

    Wrappers that add context to a call's own errors (the regulariser's layer names) must let
    this one through unchanged: it is about another call.
    """


class _Check(NamedTuple):
    event: object  # torch.cuda.Event, or _SimulatedEvent on the CPU under simulate_deferral
    host: torch.Tensor  # the status values, copied without blocking
    raise_for: Callable[[list[float]], None]
    origin: tuple  # (sequence number, op, where): formatted only if an error is found
    collective: bool


_lock = threading.RLock()
_pending: collections.deque[_Check] = collections.deque()  # oldest first
_found: list[str] = []  # errors of checks settled while making room, raised at the next call
_spare: dict[int, list[torch.Tensor]] = {}  # width -> host buffers free for reuse
_state = {"calls": 0, "where": "", "simulated_delay": None}


def validation_mode(validate) -> str:
    """Map ``validate=`` (a bool or one of :data:`MODES`) to a mode name; a clear TypeError
    otherwise."""
    if validate is True:
        return "immediate"
    if validate is False:
        return "off"
    if isinstance(validate, str) and validate in MODES:
        return validate
    raise TypeError(f"validate: expected True, False or one of {MODES}, got {validate!r}")


@contextlib.contextmanager
def where(description: str):
    """Label the checks made inside the block (e.g. ``"step 12"``, and inside that
    ``"layer 'fc1'"``: ``"layer 'fc1', step 12"``), so that a deferred error says which layer
    and step it came from."""
    previous = _state["where"]
    _state["where"] = f"{description}, {previous}" if previous else description
    try:
        yield
    finally:
        _state["where"] = previous


def check(
    status: torch.Tensor,
    mode: str,
    raise_for: Callable[[list[float]], None],
    *,
    op: str = "",
    collective: bool = False,
) -> None:
    """Act on ``status`` (a small float32 tensor on the op's device) according to ``mode``.

    ``raise_for(values)`` raises the op's ValueError for bad status values and returns
    otherwise; ``op`` names the public op for a deferred error; ``collective`` marks a check
    whose values are identical on every rank of a process group (see the module docstring).
    """
    if mode == "off":
        return
    deferred = mode == "deferred" and (
        status.device.type == "cuda" or _state["simulated_delay"] is not None
    )
    if not deferred:
        raise_for(status.tolist())
        return
    if status.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return
    with _lock:
        _state["calls"] += 1
        origin = (_state["calls"], op, _state["where"])
        if len(_pending) >= MAX_IN_FLIGHT:
            _settle(_pending.popleft(), wait=True, into=_found)
        host = _host_buffer(status.numel(), status.device)
        # The copy is the step that can fail (a device error, a bad width): nothing is recorded
        # as pending until it has been issued.
        try:
            host.copy_(status.reshape(-1), non_blocking=True)
        except BaseException:
            _spare.setdefault(host.numel(), []).append(host)
            raise
        _pending.append(_Check(_record_event(status.device), host, raise_for, origin, collective))


def poll() -> None:
    """Raise the error of the oldest settled deferred check that found a problem.

    A check is settled when its copy has completed, and always when it is collective; settled
    checks without a problem are dropped. Called at the start of every op of the package.
    """
    if not _pending and not _found:
        return
    # Querying an event is not allowed while a CUDA graph is being captured.
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return
    with _lock:
        kept: collections.deque[_Check] = collections.deque()
        # Copies finish in stream order: after the first unfinished one, only the collective
        # checks are settled (waited for), the rest are not queried.
        blocked = False
        while _pending:
            entry = _pending.popleft()
            if entry.collective or (not blocked and entry.event.query()):
                _settle(entry, wait=entry.collective, into=_found)
            else:
                blocked = True
                kept.append(entry)
        _pending.extend(kept)
        if _found:
            raise DeferredValidationError(_found.pop(0))


def raise_pending_errors() -> None:
    """Wait for every deferred check and raise the first error found (one synchronisation).

    Example::

        >>> import powerlaw_fast
        >>> powerlaw_fast.raise_pending_errors()   # nothing pending: returns None
    """
    with _lock:
        while _pending:
            _settle(_pending.popleft(), wait=True, into=_found)
        if _found:
            raise DeferredValidationError(_found.pop(0))


def _settle(entry: _Check, *, wait: bool, into: list[str]) -> None:
    """Read one finished check; append its error message (if any) to ``into``."""
    if wait:
        entry.event.synchronize()
    values = entry.host.tolist()
    _spare.setdefault(entry.host.numel(), []).append(entry.host)
    try:
        entry.raise_for(values)
    except ValueError as err:
        number, op, where_ = entry.origin
        label = ", ".join(p for p in (op, where_) if p)
        call = f"call #{number}" + (f" ({label})" if label else "")
        into.append(
            f"{err} [found by the deferred check of {call}, an earlier call whose result was "
            f"not valid; validate='immediate' raises from the call itself]"
        )


def _host_buffer(width: int, device: torch.device) -> torch.Tensor:
    spare = _spare.get(width)
    if spare:
        return spare.pop()
    pinned = device.type == "cuda"
    return torch.empty((width,), dtype=torch.float32, pin_memory=pinned)


def _record_event(device: torch.device):
    if device.type != "cuda":
        return _SimulatedEvent(_state["simulated_delay"])
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event


class _SimulatedEvent:
    """A CPU stand-in for a CUDA event: reports "not done" to its first ``delay`` queries."""

    def __init__(self, delay: int) -> None:
        self.remaining = delay

    def query(self) -> bool:
        if self.remaining <= 0:
            return True
        self.remaining -= 1
        return False

    def synchronize(self) -> None:
        self.remaining = 0


@contextlib.contextmanager
def simulate_deferral(delay: int = 0):
    """Testing switch: CPU tensors take the device's deferred path (the same host copy, the
    same pending queue, the same raise at a later call), their copies reporting completion to
    the ``delay + 1``-th query. Users on a CPU keep getting errors at once."""
    previous = _state["simulated_delay"]
    _state["simulated_delay"] = delay
    try:
        yield
    finally:
        _state["simulated_delay"] = previous


def pending_count() -> int:
    """Deferred checks not yet settled (for tests and diagnostics)."""
    return len(_pending) + len(_found)


def discard_pending() -> None:
    """Forget every pending check and found error without raising (tests' clean-up)."""
    with _lock:
        _pending.clear()
        _found.clear()


@atexit.register
def _report_at_exit() -> None:
    """Errors still pending when the interpreter exits are written to stderr, not lost."""
    try:
        raise_pending_errors()
    except DeferredValidationError as err:
        print(f"powerlaw_fast: a deferred validation error was never raised: {err}",
              file=sys.stderr)  # fmt: skip
        while _found:
            print(f"powerlaw_fast: also: {_found.pop(0)}", file=sys.stderr)
    except Exception as err:  # the device may already be gone at exit
        print(f"powerlaw_fast: the deferred checks could not be read at exit: {err}",
              file=sys.stderr)  # fmt: skip
