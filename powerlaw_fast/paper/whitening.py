"""Batch whitening layer of Nassar et al. (2020), eq. (10): x~ = R^-1 (x - mu).

The paper "breaks" a hidden representation by whitening it: with mu the batch mean and R the
lower Cholesky factor of the batch covariance, the output has (up to ``eps``) identity
covariance on every batch, i.e. a flat spectrum. As in batch norm, gradients flow through the
mean, the covariance and the Cholesky factorisation (torch's ``linalg.cholesky`` and
``linalg.solve_triangular`` are differentiable).
"""

from __future__ import annotations

import torch
from torch import nn

from .._validation import check_float_dtype, check_int_range, check_real, check_tensor

EVAL_MODES = ("batch", "running")


def _cholesky_or_raise(cov: torch.Tensor, what: str) -> torch.Tensor:
    chol, info = torch.linalg.cholesky_ex(cov)
    if int(info.max()) != 0:
        raise ValueError(
            f"Whiten: the {what} covariance plus eps*I is not positive definite (Cholesky failed "
            f"at order {int(info.max())}); the input has non-finite values or eps is too small"
        )
    return chol


class Whiten(nn.Module):
    """Whitening layer, eq. (10): ``x~_b = R^-1 (x_b - mu)`` with ``R R^T = Sigma + eps I``.

    Input ``[B, N]`` or ``[B, *]`` (flattened per sample to ``N = num_features`` features and
    reshaped back). ``Sigma = (x - mu)^T (x - mu) / (B - 1)`` is the unbiased batch covariance
    and ``R`` its lower Cholesky factor; the authors add ``eps = 1e-5`` to the diagonal. The
    output of a training batch has covariance ``R^-1 Sigma R^-T`` = I up to ``eps``.

    Statistics are computed in float32 at least (Cholesky is not defined for half types); the
    output has the input's dtype.

    Args:
        num_features: N, the number of features per sample.
        eps: added to the covariance diagonal before the Cholesky factorisation.
        eval_mode: statistics used in eval mode. ``"batch"`` (what the authors did): the batch's
            own mean and covariance, as in training. ``"running"``: the running estimates
            updated in training, so an evaluated sample does not depend on its batch mates.
        momentum: running estimates are updated as ``r <- (1 - momentum) r + momentum * batch``
            (the batch's unbiased covariance, detached) on every training forward.

    Buffers: ``running_mean [N]``, ``running_cov [N, N]`` (start at 0 and I) and
    ``num_batches_tracked``.

    Example::

        >>> import torch
        >>> from powerlaw_fast.paper.whitening import Whiten
        >>> _ = torch.manual_seed(0)
        >>> layer = Whiten(4, eps=0.0)
        >>> y = layer(torch.randn(64, 4) @ torch.randn(4, 4))
        >>> torch.allclose(torch.cov(y.T), torch.eye(4), atol=1e-4)
        True
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        eval_mode: str = "batch",
        momentum: float = 0.1,
    ) -> None:
        super().__init__()
        self.num_features = check_int_range(num_features, "num_features", 1, 1 << 20)
        self.eps = check_real(eps, "eps", low=0.0, low_inclusive=True)
        if eval_mode not in EVAL_MODES:
            raise ValueError(f"eval_mode: expected one of {EVAL_MODES}, got {eval_mode!r}")
        self.eval_mode = eval_mode
        self.momentum = check_real(momentum, "momentum", low=0.0, low_inclusive=False)
        if self.momentum > 1.0:
            raise ValueError(f"momentum: expected a number in (0, 1], got {momentum}")
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_cov", torch.eye(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, eval_mode={self.eval_mode!r}, "
            f"momentum={self.momentum}"
        )

    def _as_matrix(self, x) -> torch.Tensor:
        check_tensor(x, "x")
        check_float_dtype(x, "x")
        if x.dim() < 2:
            raise ValueError(
                f"x: expected [B, N] or [B, *] with N = {self.num_features} features per sample, "
                f"got shape {tuple(x.shape)}"
            )
        flat = x.reshape(x.shape[0], -1)
        if flat.shape[1] != self.num_features:
            raise ValueError(
                f"x: expected {self.num_features} features per sample (num_features), got "
                f"{flat.shape[1]} from shape {tuple(x.shape)}"
            )
        return flat

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = self._as_matrix(x)
        work_dtype = torch.promote_types(flat.dtype, torch.float32)
        flat_w = flat.to(work_dtype)
        use_batch = self.training or self.eval_mode == "batch"
        if use_batch:
            batch = flat.shape[0]
            if batch < 2:
                raise ValueError(
                    f"x: Whiten needs a batch of at least 2 samples to estimate a covariance, got "
                    f"B = {batch} (use eval_mode='running' to evaluate single samples)"
                )
            mean = flat_w.mean(dim=0)
            centred = flat_w - mean
            cov = centred.mT @ centred / (batch - 1)
            if self.training:
                self._update_running(mean.detach(), cov.detach())
            what = "batch"
        else:
            mean = self.running_mean.to(work_dtype)
            centred = flat_w - mean
            cov = self.running_cov.to(work_dtype)
            what = "running"
        eye = torch.eye(self.num_features, dtype=work_dtype, device=flat.device)
        chol = _cholesky_or_raise(cov + self.eps * eye, what)
        # Solving Y R^T = X_c gives rows y_b = R^-1 (x_b - mu) without transposing X_c.
        white = torch.linalg.solve_triangular(chol.mT, centred, upper=True, left=False)
        return white.to(x.dtype).reshape(x.shape)

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, cov: torch.Tensor) -> None:
        m = self.momentum
        self.running_mean.mul_(1.0 - m).add_(mean.to(self.running_mean.dtype), alpha=m)
        self.running_cov.mul_(1.0 - m).add_(cov.to(self.running_cov.dtype), alpha=m)
        self.num_batches_tracked += 1
