"""Streaming covariance of ``[B, N]`` batches and its descending eigendecomposition.

The covariance of a layer over a whole data set is accumulated in streaming fashion
(:class:`CovarianceAccumulator`): per batch, float64 sums of the shifted activations and of
their outer products, so ``[dataset, N]`` is never held in memory. Eigenvalues are returned in
descending order and ranks are 1-indexed, as in the paper (lambda_1 is the largest).
"""

from __future__ import annotations

import torch

from .._validation import check_float_dtype, check_int_range, check_tensor


class CovarianceAccumulator:
    """Streaming mean and covariance of ``[B, N]`` batches in float64.

    Keeps ``count``, ``S1 = sum_b (x_b - c)`` and ``S2 = sum_b (x_b - c)(x_b - c)^T`` around a
    shift ``c`` (by default the mean of the first batch). The shift makes the sums small, so the
    final ``S2 - S1 S1^T / count`` does not cancel catastrophically when the mean is large
    compared with the spread (e.g. sigmoid units near 1). Batches may have any size, including a
    partial last batch or a single row; the result does not depend on how the rows are split.

    ``mean = c + S1 / count``; ``covariance() = (S2 - S1 S1^T / count) / (count - 1)`` (unbiased,
    like ``torch.cov``).

    Args:
        num_features: N.
        device: where the sums live (inputs are moved there); default CPU.
        dtype: accumulation dtype, float64 (default) or float32.
        shift: a fixed shift ``c`` ``[N]`` instead of the first batch's mean, e.g. so that
            several processes share one and can all-reduce ``count``, ``S1`` and ``S2`` as
            plain sums (see :meth:`rebase`).

    Example::

        >>> import torch
        >>> from powerlaw_fast.training.accumulator import CovarianceAccumulator
        >>> x = torch.randn(103, 5, dtype=torch.float64)
        >>> acc = CovarianceAccumulator(5)
        >>> for chunk in x.split(25):
        ...     _ = acc.update(chunk)
        >>> torch.allclose(acc.covariance(), torch.cov(x.T)), acc.count
        (True, 103)
    """

    def __init__(
        self,
        num_features: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float64,
        *,
        shift: torch.Tensor | None = None,
    ) -> None:
        self.num_features = check_int_range(num_features, "num_features", 1, 1 << 24)
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype: expected torch.float64 or torch.float32, got {dtype}")
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype
        self.count = 0
        self.sum = torch.zeros(num_features, device=self.device, dtype=dtype)
        self.sum_outer = torch.zeros(num_features, num_features, device=self.device, dtype=dtype)
        self.shift: torch.Tensor | None = None
        if shift is not None:
            self.shift = self._as_vector(shift, "shift")

    def __repr__(self) -> str:
        return (
            f"CovarianceAccumulator(num_features={self.num_features}, count={self.count}, "
            f"device={self.device}, dtype={self.dtype})"
        )

    def _as_vector(self, v, name: str) -> torch.Tensor:
        check_tensor(v, name)
        if v.shape != (self.num_features,):
            raise ValueError(
                f"{name}: expected shape [{self.num_features}] (num_features), got {tuple(v.shape)}"
            )
        return v.detach().to(device=self.device, dtype=self.dtype)

    def update(self, x: torch.Tensor) -> CovarianceAccumulator:
        """Add the rows of ``x`` (``[B, N]`` or ``[B, *]``, any float dtype, any device; B >= 1)."""
        check_tensor(x, "x")
        check_float_dtype(x, "x")
        if x.dim() < 2 or x.shape[0] < 1:
            raise ValueError(f"x: expected [B, N] or [B, *] with B >= 1, got {tuple(x.shape)}")
        rows = x.detach().reshape(x.shape[0], -1)
        if rows.shape[1] != self.num_features:
            raise ValueError(
                f"x: expected {self.num_features} features per sample (num_features), got "
                f"{rows.shape[1]} from shape {tuple(x.shape)}"
            )
        rows = rows.to(device=self.device, dtype=self.dtype)
        if not bool(torch.isfinite(rows).all()):
            raise ValueError("x: contains NaN or infinite values")
        if self.shift is None:
            self.shift = rows.mean(dim=0)
        centred = rows - self.shift
        self.count += rows.shape[0]
        self.sum += centred.sum(dim=0)
        self.sum_outer += centred.mT @ centred
        return self

    def rebase(self, shift: torch.Tensor) -> CovarianceAccumulator:
        """Re-express the sums around a new shift ``[N]`` (exact algebra, no loss of data)."""
        new = self._as_vector(shift, "shift")
        if self.shift is None or self.count == 0:
            self.shift = new
            return self
        d = self.shift - new  # x - new = (x - old) + d
        s1_old = self.sum
        self.sum_outer += torch.outer(s1_old, d) + torch.outer(d, s1_old)
        self.sum_outer += self.count * torch.outer(d, d)
        self.sum = s1_old + self.count * d
        self.shift = new
        return self

    def merge(self, other: CovarianceAccumulator) -> CovarianceAccumulator:
        """Add another accumulator's rows to this one (in place; ``other`` is not changed)."""
        if not isinstance(other, CovarianceAccumulator):
            raise TypeError(f"other: expected a CovarianceAccumulator, got {type(other).__name__}")
        if other.num_features != self.num_features:
            raise ValueError(
                f"other: expected num_features = {self.num_features}, got {other.num_features}"
            )
        if other.count == 0:
            return self
        moved = CovarianceAccumulator(self.num_features, self.device, self.dtype)
        moved.count = other.count
        moved.shift = other.shift.to(device=self.device, dtype=self.dtype)
        moved.sum = other.sum.to(device=self.device, dtype=self.dtype).clone()
        moved.sum_outer = other.sum_outer.to(device=self.device, dtype=self.dtype).clone()
        if self.shift is None:
            self.shift = moved.shift.clone()
        moved.rebase(self.shift)
        self.count += moved.count
        self.sum += moved.sum
        self.sum_outer += moved.sum_outer
        return self

    def all_reduce(self, group=None) -> CovarianceAccumulator:
        """Combine the accumulators of all processes of ``group`` in place (torch.distributed).

        Every rank first re-bases its sums on a common shift (the count-weighted mean of the
        ranks' shifts, itself one all-reduce of N + 1 numbers), then ``count``, ``S1`` and ``S2``
        are summed: O(N^2) communication once. Ranks that saw no rows take part with zeros.
        Without an initialised process group (or with one process) this does nothing.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self
        if dist.get_world_size(group) == 1:
            return self
        weighted = torch.zeros(self.num_features + 1, device=self.device, dtype=self.dtype)
        if self.count > 0:
            weighted[:-1] = self.count * self.shift
            weighted[-1] = self.count
        dist.all_reduce(weighted, group=group)
        total = int(round(float(weighted[-1])))
        if total == 0:
            return self
        self.rebase(weighted[:-1] / weighted[-1])
        dist.all_reduce(self.sum, group=group)
        dist.all_reduce(self.sum_outer, group=group)
        self.count = total
        return self

    @property
    def mean(self) -> torch.Tensor:
        """``[N]`` mean of all rows seen (``dtype`` of the accumulator)."""
        if self.count == 0:
            raise ValueError("CovarianceAccumulator: no rows yet, the mean is undefined")
        return self.shift + self.sum / self.count

    def covariance(self) -> torch.Tensor:
        """``[N, N]`` unbiased covariance ``/(count - 1)``, exactly symmetric."""
        if self.count < 2:
            raise ValueError(
                f"CovarianceAccumulator: need at least 2 rows for a covariance, got {self.count}"
            )
        s1 = self.sum
        cov = (self.sum_outer - torch.outer(s1, s1) / self.count) / (self.count - 1)
        return (cov + cov.mT) * 0.5

    def eigh(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigenvalues ``[N]`` in descending order and eigenvectors ``[N, N]`` (columns)."""
        return eigh_descending(self.covariance())


def eigh_descending(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric eigendecomposition sorted by decreasing eigenvalue (column n is v_{n+1})."""
    values, vectors = torch.linalg.eigh(cov)
    return values.flip(0), vectors.flip(1)
