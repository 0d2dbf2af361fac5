"""Training one run: Adam on cross entropy plus the run's penalty, optionally data-parallel."""

from __future__ import annotations

import math
import time
import warnings

import torch
from torch import nn
from tqdm.auto import tqdm

from ...training.regulariser import STATE_FORMAT, SpectralRegularizer
from ..jacobian import jacobian_penalty
from .build import Data, batch_size_for
from .config import RunConfig
from .evaluation import accuracy
from .parallel import DataParallel, data_parallel_model, mean_over_ranks


def random_bases(model: nn.Module, layers: list[str], seed: int) -> dict:
    """A :meth:`SpectralRegularizer.load_state_dict` state with a random orthogonal basis
    ``[N, N]`` per layer (Q of the QR decomposition of a float64 Gaussian matrix, signs fixed
    by R's diagonal, so Haar distributed), drawn from ``seed``: the ``basis_update="random"``
    control. Its eigenvalues are unknown and stored as zeros (the penalty never reads them)."""
    widths = model.hidden_widths()
    generator = torch.Generator().manual_seed(10007 + seed)
    state = {}
    for name in layers:
        q, r = torch.linalg.qr(torch.randn(widths[name], widths[name], dtype=torch.float64,
                                           generator=generator))
        q = q * torch.sign(torch.diagonal(r))
        state[name] = {"basis": q.to(torch.float32),
                       "eigenvalues": torch.zeros(widths[name], dtype=torch.float64)}
    return {"format": STATE_FORMAT, "layers": state}


def train_model(
    model: nn.Module,
    cfg: RunConfig,
    data: Data,
    layers: list[str],
    device: torch.device,
    *,
    progress: bool = True,
    parallel: DataParallel | None = None,
) -> tuple[list[dict], SpectralRegularizer | None]:
    """Adam on cross entropy (+ spectral penalty or Jacobian penalty); one dict per epoch.

    With ``parallel``, ``model`` is trained data-parallel: every rank draws the same batch
    order, takes rows ``rank::world`` of each global batch, and DistributedDataParallel averages
    the gradients; the spectral penalty is scaled by ``world`` so that the average is the
    single-process gradient.
    """
    rank, world = (parallel.rank, parallel.world) if parallel is not None else (0, 1)
    trained = model
    if parallel is not None:
        trained = data_parallel_model(model, cfg, device)
    train_x, train_y = data.train_x.to(device), data.train_y.to(device)
    test_x, test_y = data.test_x.to(device), data.test_y.to(device)
    n = train_x.shape[0]
    batch = batch_size_for(cfg, model)
    if batch > n:
        warnings.warn(f"batch size {batch} exceeds the {n} training images; using {n}",
                      stacklevel=2)
        batch = n
    steps_per_epoch = n // batch  # drop the partial last batch: it would be rank-deficient
    optimiser = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    reg = None
    if layers:
        random_basis = cfg.basis_update == "random"
        reg = SpectralRegularizer(model, layers, alpha=cfg.alpha, tau=cfg.tau, beta=cfg.beta,
                                  convention=cfg.convention, progress=False,
                                  process_group=parallel.group if parallel is not None else None,
                                  basis_update="epoch" if random_basis else cfg.basis_update,
                                  basis_every=cfg.basis_every,
                                  basis_momentum=cfg.basis_momentum)
        if random_basis:
            reg.load_state_dict(random_bases(model, layers, cfg.seed))
    epoch_refresh = reg is not None and cfg.basis_update == "epoch"
    first_penalty = None  # the penalty of the first step, read once (one host sync)
    # each rank refreshes on its share of the training set; the regulariser merges the moments
    refresh_x = train_x[rank::world]
    order = torch.Generator().manual_seed(cfg.seed)
    # ranks draw their own projections for their own rows
    jac_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1 + 7919 * rank)
    history = []
    step = 0
    bar = tqdm(range(cfg.epochs), desc=cfg.name, unit="epoch", disable=not progress or rank != 0,
               leave=False)
    for epoch in bar:
        start = time.perf_counter()
        model.train()
        perm = torch.randperm(n, generator=order).to(device)
        # summed on the device, read once per epoch: no host synchronisation per step
        running = torch.zeros(3, dtype=torch.float64, device=device)
        for i in range(steps_per_epoch):
            if epoch_refresh and (
                i == 0 or (cfg.refresh_every is not None and step % cfg.refresh_every == 0)
            ):
                reg.refresh(refresh_x, batch_size=cfg.eval_batch)
            idx = perm[i * batch : (i + 1) * batch][rank::world]
            xb, yb = train_x[idx], train_y[idx]
            if cfg.variant == "jacobian":
                xb = xb.detach().requires_grad_(True)
            logits = trained(xb)
            ce = nn.functional.cross_entropy(logits, yb)
            if reg is not None:
                penalty = reg.penalty()  # of the global batch, identical on every rank
                # DDP averages the ranks' gradients; the global penalty's must not be divided
                loss = ce + (penalty * world if world > 1 else penalty)
            elif cfg.variant == "jacobian":
                penalty = jacobian_penalty(xb, logits, beta=cfg.beta_jacobian, generator=jac_gen)
                loss = ce + penalty
            else:
                penalty = ce.new_zeros(())
                loss = ce
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            loss = ce + penalty  # logged: the single-process value
            optimiser.step()
            if reg is not None and first_penalty is None:
                first_penalty = float(penalty.detach())
            step += 1
            running += torch.stack([t.detach().to(torch.float64) for t in (loss, ce, penalty)])
        sums = dict(zip(("loss", "cross_entropy", "penalty"), running.tolist(), strict=True))
        if world > 1:
            sums = mean_over_ranks(sums, parallel, device)
        record = {k: v / max(1, steps_per_epoch) for k, v in sums.items()}
        if reg is not None and epoch == 0:
            record["penalty_first_step"] = first_penalty
        record.update(
            epoch=epoch + 1,
            steps=steps_per_epoch,
            train_accuracy=accuracy(model, train_x, train_y, cfg.eval_batch),
            test_accuracy=accuracy(model, test_x, test_y, cfg.eval_batch),
            seconds=time.perf_counter() - start,
        )
        history.append(record)
        bar.set_postfix(loss=f"{record['loss']:.3f}", test=f"{record['test_accuracy']:.3f}")
        if not math.isfinite(record["loss"]):
            raise FloatingPointError(
                f"{cfg.name}: the training loss became non-finite in epoch {epoch + 1}"
            )
    bar.close()
    return history, reg
