"""Eigenspectra of hidden representations over a data set, power-law fits, effective dimension.

The covariance of a layer over a whole data set is accumulated in streaming fashion
(:class:`CovarianceAccumulator`): per batch, float64 sums of the shifted activations and of
their outer products, so ``[dataset, N]`` is never held in memory. Eigenvalues are returned in
descending order and ranks are 1-indexed, as in the paper (lambda_1 is the largest).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ._modules import find_submodule, module_device
from ._validation import check_float_dtype, check_int_range, check_real, check_tensor

# --------------------------------------------------------------------------------------------
# Streaming covariance


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
        >>> from powerlaw_fast.spectra import CovarianceAccumulator
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


# --------------------------------------------------------------------------------------------
# Running a model and capturing one layer


class _StopForward(Exception):
    """Raised by the capture hook once the wanted layer has run, to skip the rest."""


def resolve_layer(model: nn.Module, layer) -> tuple[str, nn.Module]:
    """``layer`` as (name, module): a module of ``model``, a name from ``model.hidden_layers()``
    or a dotted submodule name, or ``None`` for the last of ``model.hidden_layers()``."""
    if layer is None:
        hidden = model.hidden_layers() if hasattr(model, "hidden_layers") else {}
        if not hidden:
            raise ValueError(
                "layer: None means the last hidden layer, but the model has no hidden_layers()"
            )
        name = next(reversed(hidden))
        return name, hidden[name]
    if not isinstance(layer, (str, nn.Module)):
        raise TypeError(
            f"layer: expected a str, an nn.Module or None, got {type(layer).__name__}"
        )
    return find_submodule(model, layer, "layer")


def _first_input(batch):
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise TypeError(
        f"data: expected batches that are tensors or (inputs, targets) tuples, got "
        f"{type(batch).__name__}"
    )


def iterate_inputs(data, batch_size: int) -> Iterator[torch.Tensor]:
    """Input batches from a tensor ``[M, ...]`` (split into ``batch_size`` rows, last partial)
    or from an iterable of tensors / ``(inputs, targets)`` tuples such as a DataLoader."""
    if isinstance(data, torch.Tensor):
        if data.dim() < 1 or data.shape[0] < 1:
            raise ValueError(f"data: expected a non-empty [M, ...] tensor, got {tuple(data.shape)}")
        yield from data.split(batch_size)
        return
    if not isinstance(data, Iterable):
        raise TypeError(
            f"data: expected a tensor or an iterable of batches, got {type(data).__name__}"
        )
    for batch in data:
        yield _first_input(batch)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's parameters (else buffers); the CPU when it has neither."""
    return module_device(model, torch.device("cpu"))


@contextmanager
def eval_mode(model: nn.Module):
    """Put ``model`` in eval mode and restore every submodule's own training flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def layer_output(model: nn.Module, module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """Run ``model(inputs)`` until ``module`` has produced its output; return it as ``[B, N]``.

    The forward pass is cut short after the layer, so later layers cost nothing. Autograd
    follows the current grad mode.
    """
    captured: list[torch.Tensor] = []

    def hook(_module, _args, output):
        captured.append(output)
        raise _StopForward

    handle = module.register_forward_hook(hook)
    try:
        model(inputs)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not captured:
        raise ValueError("layer: the module did not run during the model's forward pass")
    out = captured[0]
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"layer: expected the layer to output a tensor, got {type(out).__name__}")
    return out.reshape(out.shape[0], -1)


def layer_covariance(
    model: nn.Module,
    layer,
    data,
    *,
    batch_size: int = 1000,
    device: torch.device | str | None = None,
) -> CovarianceAccumulator:
    """Streaming covariance of a layer's output over a data set (model in eval mode, no grad).

    Args:
        model: the network; put in eval mode for the pass and restored afterwards.
        layer: see :func:`resolve_layer` (e.g. ``"hidden3"`` or ``None`` for the last).
        data: a tensor ``[M, ...]`` of inputs or an iterable of batches (see
            :func:`iterate_inputs`).
        batch_size: rows per forward pass when ``data`` is a tensor.
        device: where the model runs (default: the model's parameters' device).

    Returns the :class:`CovarianceAccumulator` (float64, on ``device``).
    """
    batch_size = check_int_range(batch_size, "batch_size", 1, 1 << 30)
    _, module = resolve_layer(model, layer)
    run_device = torch.device(device) if device is not None else model_device(model)
    acc: CovarianceAccumulator | None = None
    with eval_mode(model), torch.no_grad():
        for inputs in iterate_inputs(data, batch_size):
            out = layer_output(model, module, inputs.to(run_device))
            if acc is None:
                acc = CovarianceAccumulator(out.shape[1], device=run_device)
            acc.update(out)
    if acc is None:
        raise ValueError("data: no batches")
    return acc


def layer_spectrum(
    model: nn.Module,
    layer,
    data,
    *,
    batch_size: int = 1000,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Eigenvalues (float64, CPU, descending) of a layer's covariance over a data set.

    Example::

        >>> import torch
        >>> from powerlaw_fast.models import MLP
        >>> from powerlaw_fast.spectra import layer_spectrum
        >>> lam = layer_spectrum(MLP(widths=(30, 20)), "hidden2", torch.rand(100, 784))
        >>> lam.shape, lam.dtype, bool((lam[:-1] >= lam[1:]).all())
        (torch.Size([20]), torch.float64, True)
    """
    acc = layer_covariance(model, layer, data, batch_size=batch_size, device=device)
    return torch.linalg.eigvalsh(acc.covariance()).flip(0).cpu()


# --------------------------------------------------------------------------------------------
# Summaries of a spectrum


def _as_spectrum(eigenvalues, name: str = "eigenvalues") -> torch.Tensor:
    if not isinstance(eigenvalues, torch.Tensor):
        try:
            eigenvalues = torch.as_tensor(eigenvalues, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(
                f"{name}: expected a 1-D tensor or sequence of numbers, got "
                f"{type(eigenvalues).__name__}"
            ) from None
    if eigenvalues.dim() != 1 or eigenvalues.numel() < 1:
        raise ValueError(
            f"{name}: expected a non-empty 1-D spectrum, got shape {tuple(eigenvalues.shape)}"
        )
    lam = eigenvalues.detach().to(device="cpu", dtype=torch.float64)
    if not bool(torch.isfinite(lam).all()):
        raise ValueError(f"{name}: contains NaN or infinite values")
    return lam


def fit_power_law(
    eigenvalues, *, start: int = 10, stop: int | None = None
) -> tuple[float, float, tuple[int, int]]:
    """Least-squares fit of ``log lam_n = intercept - alpha * log n`` over ranks start..stop.

    Ranks are 1-indexed and inclusive; natural logs, so ``lam_n ~ exp(intercept) * n^-alpha``.
    The default window starts at the paper's tau = 10. With ``stop=None`` the window ends at
    the last rank before the first non-positive eigenvalue (numerically zero tail); an explicit
    window containing a non-positive value is an error.

    Returns ``(alpha, intercept, (start, stop))``.

    Example::

        >>> import torch
        >>> from powerlaw_fast.spectra import fit_power_law
        >>> n = torch.arange(1, 501, dtype=torch.float64)
        >>> alpha, intercept, window = fit_power_law(3.0 * n ** -1.2)
        >>> round(alpha, 6), window
        (1.2, (10, 500))
    """
    lam = _as_spectrum(eigenvalues)
    size = lam.numel()
    start = check_int_range(start, "start", 1, size, f" (1-indexed rank, N = {size})")
    if stop is None:
        nonpositive = torch.nonzero(lam[start - 1 :] <= 0)
        stop = size if nonpositive.numel() == 0 else start - 1 + int(nonpositive[0])
        if stop - start + 1 < 2:
            raise ValueError(
                f"eigenvalues: fewer than 2 positive values from rank start = {start}; cannot fit"
            )
    else:
        stop = check_int_range(
            stop, "stop", start + 1, size, f" (1-indexed, after start = {start})"
        )
        if bool((lam[start - 1 : stop] <= 0).any()):
            raise ValueError(
                f"eigenvalues: ranks {start}..{stop} include non-positive values; a log-log fit "
                f"needs positive eigenvalues (choose a smaller stop)"
            )
    ranks = torch.arange(start, stop + 1, dtype=torch.float64)
    log_n = ranks.log()
    log_lam = lam[start - 1 : stop].log()
    design = torch.stack([torch.ones_like(log_n), log_n], dim=1)
    coef = torch.linalg.lstsq(design, log_lam.unsqueeze(1)).solution.squeeze(1)
    return -float(coef[1]), float(coef[0]), (start, stop)


def effective_dimension(eigenvalues, threshold: float = 0.9) -> int:
    """The 1-indexed rank n at which the cumulative variance first reaches ``threshold``.

    The eigenvalues are sorted in descending order first; negative values (rounding noise of a
    covariance's zero eigenvalues) count as 0. This is the star in the paper's spectrum plots.

    Example::

        >>> from powerlaw_fast.spectra import effective_dimension
        >>> effective_dimension([5.0, 3.0, 1.0, 1.0])
        3
    """
    lam = _as_spectrum(eigenvalues)
    threshold = check_real(threshold, "threshold", low=0.0, low_inclusive=False)
    if threshold > 1.0:
        raise ValueError(f"threshold: expected a fraction in (0, 1], got {threshold}")
    lam = lam.clamp_min(0.0).sort(descending=True).values
    total = float(lam.sum())
    if total <= 0.0:
        raise ValueError("eigenvalues: the total variance is zero; the dimension is undefined")
    cumulative = lam.cumsum(0) / total
    # A relative slack of a few ulps so that an exact hit (e.g. 9/10 of the variance) counts.
    reached = torch.nonzero(cumulative >= threshold * (1.0 - 4 * math.ulp(1.0)))
    return int(reached[0]) + 1
