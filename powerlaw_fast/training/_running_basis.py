"""``basis_update="running"``: a float64 exponential average of the covariances of the batches
the penalty sees, eigendecomposed every ``every`` steps (see
:class:`~powerlaw_fast.training.regulariser.SpectralRegularizer`).

Each batch's covariance comes from a
:class:`~powerlaw_fast.training.accumulator.CovarianceAccumulator` (float64 around a shift; with
a process group, the global batch's, merged over the ranks).

Example::

    >>> import torch
    >>> from powerlaw_fast.training._running_basis import RunningBasis
    >>> running = RunningBasis(momentum=0.5, every=2)
    >>> running.fold({"a": torch.randn(30, 4)}, group=None)
    True
    >>> running.fold({"a": torch.randn(30, 4)}, group=None)   # not due: every 2 steps
    False
    >>> running.covariance["a"].dtype
    torch.float64
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch

from powerlaw_fast.training.accumulator import CovarianceAccumulator


class RunningBasis:
    """The running covariances (``covariance[name]``, float64 ``[N, N]``) and the number of
    steps folded so far (``steps``), which decides when an eigendecomposition is due."""

    def __init__(self, momentum: float, every: int) -> None:
        self.momentum = momentum
        self.every = every
        self.covariance: dict[str, torch.Tensor] = {}
        self.steps = 0

    def fold(self, batches: Mapping[str, torch.Tensor], group) -> bool:
        """Fold each layer's batch ``[B, N]`` covariance into its average; True when the
        bases are due (the first call, then every ``every`` calls)."""
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "SpectralRegularizer(basis_update='running'): the basis update cannot run inside "
                "a CUDA graph capture (eigh synchronises); capture without the penalty or use "
                "basis_update='epoch'"
            )
        m = self.momentum
        with torch.no_grad():
            for name, x in batches.items():
                accumulator = CovarianceAccumulator(x.shape[1], device=x.device)
                try:
                    accumulator.update(x)
                except ValueError as err:
                    raise ValueError(f"layer {name!r}: {err}") from None
                if group is not None:
                    accumulator.all_reduce(group)
                cov = accumulator.covariance()
                old = self.covariance.get(name)
                if old is None or old.shape != cov.shape or old.device != cov.device:
                    self.covariance[name] = cov
                else:
                    old.mul_(1.0 - m).add_(cov, alpha=m)
        due = self.steps % self.every == 0
        self.steps += 1
        return due

    def state(self) -> dict:
        return {"running": dict(self.covariance), "running_steps": self.steps}

    def load(self, state: Mapping, widths: Mapping[str, tuple[int, torch.device]],
             expected: bool) -> None:  # fmt: skip
        """Restore from a checkpoint; ``widths``: name -> (N, device) of the loaded bases;
        ``expected``: the regulariser is in running mode (a checkpoint without the averages
        then restarts them, with a warning)."""
        entries = state.get("running") or {}
        if not isinstance(entries, Mapping):
            raise TypeError(
                f"state: expected 'running' to be a mapping, got {type(entries).__name__}"
            )
        if expected and set(entries) != set(widths):
            warnings.warn(
                "state: no running covariance for every layer (saved with "
                "basis_update='epoch' or by an older version): the running average restarts "
                "from the next batch",
                stacklevel=3,
            )
            entries = {}
        covariance = {}
        for name, cov in entries.items():
            if name not in widths:
                raise ValueError(f"state: running covariance for unknown layer {name!r}")
            N, device = widths[name]
            if not isinstance(cov, torch.Tensor) or cov.dtype != torch.float64 or (
                cov.shape != (N, N)
            ):
                raise ValueError(
                    f"state: layer {name!r}: expected a float64 [{N}, {N}] running covariance, "
                    f"got {getattr(cov, 'dtype', type(cov).__name__)} "
                    f"{tuple(getattr(cov, 'shape', ()))}"
                )
            covariance[name] = cov.detach().to(device, copy=True)
        self.covariance = covariance
        self.steps = int(state.get("running_steps", 0)) if covariance else 0
