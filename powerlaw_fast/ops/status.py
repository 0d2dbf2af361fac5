"""Validation without a host synchronisation: on-device status words checked later.

The penalty kernels write a few status values next to their results (non-finite spectrum
values, a zero anchor, an overflowing penalty). Reading them on the host costs a
synchronisation, which on a GPU stalls the CPU until every queued kernel has run. Three modes:

- ``"immediate"`` (``True``): read the status at once and raise before returning (one sync).
- ``"deferred"`` (the default): copy the status to pinned host memory without blocking and
  raise from the first later call of any op in this package that finds the copy complete, or
  from :func:`raise_pending_errors`. The value of the bad call has already been returned (it
  is NaN or meaningless); the error names the call it came from. On CPU tensors the status is
  already there, so "deferred" raises at once, like "immediate".
- ``"off"`` (``False``): never read it (the values are then whatever the arithmetic gives).

Inside a CUDA graph capture nothing can be read; "deferred" records nothing there (replays run
no Python), so validate eagerly before capturing.

Example::

    >>> import torch
    >>> from powerlaw_fast.ops.status import validation_mode
    >>> validation_mode(True), validation_mode("deferred"), validation_mode(False)
    ('immediate', 'deferred', 'off')
"""

from __future__ import annotations

import collections
from collections.abc import Callable

import torch

MODES = ("immediate", "deferred", "off")
_RING_SLOTS = 64
_STATUS_WIDTH = 4

# (event, host row, raise_for) per outstanding deferred check, oldest first.
_pending: collections.deque = collections.deque()
_ring: dict = {"host": None, "next": 0}


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


def check(status: torch.Tensor, mode: str, raise_for: Callable[[list[float]], None]) -> None:
    """Act on ``status`` (a small float32 tensor on the op's device) according to ``mode``.

    ``raise_for(values)`` raises the op's error for bad status values and returns otherwise.
    """
    if mode == "off":
        return
    if status.device.type != "cuda" or mode == "immediate":
        raise_for(status.tolist())
        return
    if torch.cuda.is_current_stream_capturing():
        return
    poll()
    host = _ring_row(status.numel())
    host.copy_(status, non_blocking=True)
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(status.device))
    _pending.append((event, host, raise_for))


def poll() -> None:
    """Raise the error of the oldest finished deferred check that found a problem."""
    # Querying an event is not allowed while a CUDA graph is being captured.
    if not _pending or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
        return
    while _pending and _pending[0][0].query():
        _, host, raise_for = _pending.popleft()
        _raise_deferred(raise_for, host)


def raise_pending_errors() -> None:
    """Wait for every deferred check and raise the first error found (one synchronisation).

    Example::

        >>> import powerlaw_fast
        >>> powerlaw_fast.raise_pending_errors()   # nothing pending: returns None
    """
    while _pending:
        event, host, raise_for = _pending.popleft()
        event.synchronize()
        _raise_deferred(raise_for, host)


def _raise_deferred(raise_for, host: torch.Tensor) -> None:
    try:
        raise_for(host.tolist())
    except ValueError as err:
        raise ValueError(
            f"{err} [found by the deferred check of an earlier call, whose result was not "
            f"valid; validate='immediate' raises from the call itself]"
        ) from None


def _ring_row(width: int) -> torch.Tensor:
    """A row of a pinned host ring buffer; waits for the oldest check when all are in use."""
    if _ring["host"] is None:
        _ring["host"] = torch.empty((_RING_SLOTS, _STATUS_WIDTH), pin_memory=True)
    if len(_pending) >= _RING_SLOTS:
        event, host, raise_for = _pending.popleft()
        event.synchronize()
        _raise_deferred(raise_for, host)
    slot = _ring["next"]
    _ring["next"] = (slot + 1) % _RING_SLOTS
    return _ring["host"][slot, :width]
