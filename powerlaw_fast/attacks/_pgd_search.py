"""PGD's any-iterate search (the default mode of :func:`powerlaw_fast.attacks.pgd.pgd`).

A sample is fooled at eps when some PGD iterate within the eps-ball is misclassified; the rule
and the savings it allows (early retirement, nested balls, reduced-precision gradients confirmed
in fp32) are described in :mod:`powerlaw_fast.attacks.pgd`. Here they are carried out.

Read top to bottom:

- :func:`_attack_rows`: PGD with early retirement on a block of rows (several radii of the same
  samples at once); settled rows get a zero gradient and are compacted away.
- :func:`_search_chunk`: one chunk of samples over the whole grid, smallest radius first, only
  the survivors of the smaller radii attacked, the next radii joining while few survive.
- :func:`_final_check`: every success re-checked once (in the ball, in the bounds, misclassified
  by an fp32 forward).
- :func:`pgd_search`: the above in order, then the verdicts back on the caller's grid.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from powerlaw_fast._torch_helpers import accumulation_dtype
from powerlaw_fast.attacks._common import (
    AttackResult,
    draw,
    fp32_forward,
    gradient_precision,
    in_ball_and_bounds,
    misclassified,
    needs_verification,
)
from powerlaw_fast.ops.attack_step import pgd_update

__all__ = ["pgd_search"]

# Below this many rows (samples alive x radii) the next radii join the current attack.
_GROUP_ROWS = {"cpu": 512, "cuda": 4096}


@dataclass
class _SearchConfig:
    model: torch.nn.Module
    sample_shape: tuple
    steps: int
    step_size: float
    bounds: tuple[float, float]
    backend: str
    precision: str
    verify: bool  # re-check each success with an fp32 forward before retiring the row
    compact_every: int
    restarts: int
    random_start: bool
    generator: torch.Generator | None
    group_rows: int  # radii are grouped while (samples alive) x (radii) stays within this


class _Counter:
    def __init__(self):
        self.row_steps = 0
        self.row_forwards = 0


@dataclass
class _Found:
    """What the search has found so far, per sample (n) and per radius level (L, ascending)."""

    level: torch.Tensor  # [n] int64: the smallest level whose ball holds a fooling iterate; L: none
    step: torch.Tensor  # [n] int64: gradient steps before that iterate; -1: none
    x: torch.Tensor  # [n, D]: that iterate where fooled, else x itself
    x_last: torch.Tensor | None  # [L, n, D]: each level's final iterates (None: not asked for)

    @classmethod
    def nothing(cls, x2d: torch.Tensor, L: int, need_adv: bool) -> _Found:
        n, D = x2d.shape
        level = torch.full((n,), L, dtype=torch.long, device=x2d.device)
        step = torch.full((n,), -1, dtype=torch.long, device=x2d.device)
        x_last = None
        if need_adv:
            x_last = x2d.new_empty((L, n, D))
            x_last[:] = x2d
        return cls(level, step, x2d.clone(), x_last)


def _wrong_verified(cfg: _SearchConfig, logits, x, y, candidates, count: _Counter):
    """Boolean [R]: rows whose iterate is misclassified. Without verification that is the step's
    own forward; with it, candidates are re-classified by an fp32 forward (a host sync)."""
    wrong = logits.argmax(dim=1) != y
    if not cfg.verify:
        return wrong
    idx = (wrong & candidates).nonzero().squeeze(1)
    out = torch.zeros_like(wrong)
    if idx.numel():
        with torch.no_grad(), fp32_forward(x.device):
            ok = cfg.model(x[idx].view(-1, *cfg.sample_shape)).argmax(dim=1) != y[idx]
        count.row_forwards += int(idx.numel())
        out[idx[ok]] = True
    return out


def _attack_rows(cfg: _SearchConfig, x_nat, y, eps_rows, x_start, sample, level,
                 n_samples: int, count: _Counter):
    """PGD with early retirement on ``[r, D]`` rows: several radii of the same samples at once.

    Row i attacks sample ``sample[i]`` (local id < n_samples) at radius ``eps_rows[i]``, the
    ``level[i]``-th radius of the group (ascending). A row is settled once its iterate is
    misclassified, or once a row of the same sample at a smaller or equal level is (nested
    balls: its verdict is then known). Settled rows keep their iterate (masked loss, zero
    gradient) and are dropped at the next compaction.

    Returns (step [r] int64: gradient steps before the row's first misclassified iterate, -1 if
    none; x_out [r, D]: that iterate where there is one, else the row's last iterate).
    """
    r, D = x_nat.shape
    device = x_nat.device
    x = x_start.clone()
    x_out = torch.empty_like(x)
    step_of = torch.full((r,), -1, dtype=torch.long, device=device)
    pos = torch.arange(r, device=device)  # input row of each live row
    xn, yy = x_nat, y
    top = int(level.max()) + 1
    min_level = torch.full((n_samples,), top, dtype=torch.long, device=device)
    done = torch.zeros(r, dtype=torch.bool, device=device)
    since_compact = 0
    for k in range(cfg.steps + 1):
        last = k == cfg.steps
        R = x.shape[0]
        x_in = x.view(R, *cfg.sample_shape).detach().requires_grad_(not last)
        with torch.set_grad_enabled(not last), gradient_precision(cfg.precision, device):
            logits = cfg.model(x_in)
        wrong = _wrong_verified(cfg, logits.detach(), x, yy, ~done, count)
        step_of[pos] = torch.where(wrong & (step_of[pos] < 0), k, step_of[pos])
        # smallest level fooled so far, per sample; rows at or above it are settled
        min_level.scatter_reduce_(0, sample, torch.where(wrong, level, top), "amin")
        done = done | wrong | (level >= min_level[sample])
        if last:
            count.row_forwards += R
            break
        # Settled rows get a zero gradient (their loss is masked), so the update below leaves
        # their iterate exactly as it is: sign(0) = 0 and both clamps are idempotent.
        with gradient_precision(cfg.precision, device):
            loss = (F.cross_entropy(logits, yy, reduction="none") * (~done).to(logits.dtype))
            (grad,) = torch.autograd.grad(loss.sum(), x_in)
        count.row_steps += R
        with torch.no_grad():
            pgd_update(x, xn, grad.view(R, D).to(x.dtype), eps_rows, cfg.step_size, cfg.bounds,
                       backend=cfg.backend, out=x)
        since_compact += 1
        if since_compact >= cfg.compact_every or cfg.verify:
            since_compact = 0
            keep = ~done
            n_keep = int(keep.sum())  # the host sync the compaction needs
            if n_keep < R:
                gone = done.nonzero().squeeze(1)
                x_out[pos[gone]] = x[gone]
                kept = keep.nonzero().squeeze(1)
                x, xn, yy = x[kept], xn[kept], yy[kept]
                eps_rows, pos, done = eps_rows[kept], pos[kept], done[kept]
                sample, level = sample[kept], level[kept]
                if n_keep == 0:
                    return step_of, x_out
    x_out[pos] = x
    return step_of, x_out


def _search_chunk(cfg: _SearchConfig, found: _Found, x2d, y, levels: list[float], i0: int,
                  i1: int, bar, count: _Counter) -> None:
    """Samples ``i0:i1`` over every level, smallest radius first; updates ``found``.

    Only samples not fooled at a smaller radius are attacked (nested balls). While few survive,
    the next radii join the same attack: a step has a fixed cost (dispatch, thread wake-ups; on
    a busy CPU each parallel region can wait a time slice for its other thread), so many
    sequential steps on a handful of rows would cost as much as big ones. Grouping changes only
    the schedule, not a single verdict.
    """
    L, D, device = len(levels), x2d.shape[1], x2d.device
    eps_dtype = accumulation_dtype(x2d.dtype)
    u = 0
    while u < L:
        if levels[u] == 0.0:
            u += 1
            bar.update(1)
            continue
        alive = i0 + (found.level[i0:i1] == L).nonzero().squeeze(1)
        a = alive.numel()
        g = 1
        # restarts keep one radius at a time: a later restart may still fool a sample at
        # a smaller radius than an earlier restart did, and must get the chance to
        while cfg.restarts == 1 and u + g < L and a * (g + 1) <= cfg.group_rows:
            g += 1
        bar.update(g)
        for _ in range(cfg.restarts):
            if a == 0:
                break
            group = torch.tensor(levels[u : u + g], dtype=torch.float64, device=device)
            rows_sample = torch.arange(a, device=device).repeat(g)  # level-major rows
            rows_level = torch.arange(g, device=device).repeat_interleave(a)
            xn = x2d[alive].repeat(g, 1)
            eps_rows = group.to(eps_dtype)[rows_level]
            if cfg.random_start:
                # drawn for the whole chunk at each radius, so a sample's start does not
                # depend on which other samples are alive (and matches a plain loop's draw)
                noise = torch.cat([draw((i1 - i0, D), "uniform", cfg.generator, x2d)[alive - i0]
                                   for _ in range(g)])
                start = (xn + (2 * noise - 1) * eps_rows.to(x2d.dtype)[:, None])
                start = start.clamp_(cfg.bounds[0], cfg.bounds[1])
            else:
                start = xn
            k, x_out = _attack_rows(cfg, xn, y[alive].repeat(g), eps_rows, start,
                                    rows_sample, rows_level, a, count)
            # per sample: the smallest level whose row was fooled (g: none)
            lvl = torch.where(k >= 0, rows_level, g)
            first = torch.full((a,), g, dtype=torch.long, device=device)
            first.scatter_reduce_(0, rows_sample, lvl, "amin")
            fooled = first < g
            row = first[fooled] * a + torch.arange(a, device=device)[fooled]
            hit = alive[fooled]
            found.level[hit] = u + first[fooled]
            found.step[hit] = k[row]
            found.x[hit] = x_out[row]
            if found.x_last is not None:
                found.x_last[u : u + g, alive] = x_out.view(g, a, D)
            alive = alive[~fooled]
            a = alive.numel()
        u += g


def _final_check(cfg: _SearchConfig, found: _Found, x2d, y, levels: list[float],
                 rows_per_chunk: int, count: _Counter) -> int:
    """Re-check every success once per sample (a larger ball holds it as well): inside the
    eps-ball, inside the bounds, misclassified by an fp32 forward. Failures are reset to not
    fooled, with a warning; returns their number."""
    L = len(levels)
    hit = (found.level < L).nonzero().squeeze(1)
    if not hit.numel():
        return 0
    eps_levels = torch.tensor(levels, dtype=torch.float64, device=x2d.device)
    ok = in_ball_and_bounds(found.x[hit], x2d[hit], eps_levels[found.level[hit]], cfg.bounds)
    wrong = misclassified(cfg.model, found.x[hit].view(-1, *cfg.sample_shape), y[hit],
                          rows_per_chunk)
    count.row_forwards += int(hit.numel())
    bad = hit[~(ok & wrong)]
    unverified = int(bad.numel())
    if unverified:
        warnings.warn(
            f"pgd: {unverified} adversarial examples failed the final fp32 check (a logit "
            "tie decided differently in another batch) and are counted as not fooled",
            RuntimeWarning, stacklevel=4)
        found.level[bad] = L
        found.step[bad] = -1
    return unverified


def pgd_search(
    model,
    x: torch.Tensor,
    y: torch.Tensor,
    eps_list: list[float],
    *,
    steps: int,
    step_size: float,
    random_start: bool,
    restarts: int,
    bounds: tuple[float, float],
    generator: torch.Generator | None,
    backend: str,
    rows_per_chunk: int,
    precision: str = "fp32",
    compact_every: int | None = None,
    need_adv: bool = True,
    progress: bool = False,
) -> AttackResult:
    """Validated core of the any-iterate mode (model already in eval mode).

    Args:
        x: ``[n, *]`` inputs within bounds; y: ``[n]`` int64 labels in range.
        eps_list: the E radii in the caller's order (duplicates and any order allowed).
        rows_per_chunk: samples attacked together (rows per forward pass at most).
        compact_every: steps between compactions; None: 1 on the CPU, 4 on CUDA.

    Returns: an :class:`AttackResult` for the grid in the caller's order.
    """
    n = x.shape[0]
    x2d = x.reshape(n, -1)
    device = x.device
    y = y.long()
    if compact_every is None:
        compact_every = 1 if device.type != "cuda" else 4
    group_rows = min(rows_per_chunk, _GROUP_ROWS.get(device.type, _GROUP_ROWS["cuda"]))
    cfg = _SearchConfig(model, tuple(x.shape[1:]), steps, step_size, bounds, backend, precision,
                        needs_verification(precision, device), compact_every, restarts,
                        random_start, generator, group_rows)
    levels = sorted(set(eps_list))  # ascending: a success at eps_i is one at every eps_j > eps_i
    L = len(levels)
    count = _Counter()
    found = _Found.nothing(x2d, L, need_adv)

    # The clean point lies in every ball: one fp32 forward settles every misclassified sample
    # at the smallest radius, and eps = 0 (all PGD iterates equal x) needs nothing more.
    clean_wrong = misclassified(model, x, y, rows_per_chunk)
    count.row_forwards += n
    found.level[clean_wrong] = 0
    found.step[clean_wrong] = 0

    m = min(n, rows_per_chunk)
    chunks = [(i0, min(n, i0 + m)) for i0 in range(0, n, m)]
    bar = tqdm(total=len(chunks) * L, desc="pgd", disable=not progress)
    for i0, i1 in chunks:
        _search_chunk(cfg, found, x2d, y, levels, i0, i1, bar, count)
    bar.close()
    unverified = _final_check(cfg, found, x2d, y, levels, rows_per_chunk, count)

    # Back to the caller's grid: entry e is fooled when found at a radius <= eps_e.
    level_idx = torch.tensor([levels.index(e) for e in eps_list], device=device)
    first_entry = torch.tensor([eps_list.index(v) for v in levels] + [-1], device=device)
    success = found.level[None, :] <= level_idx[:, None]  # [E, n]
    step = torch.where(success, found.step[None, :], -1)
    found_at = torch.where(success, first_entry[found.level][None, :], -1)
    adv = None
    if need_adv:
        adv = torch.where(success[:, :, None], found.x[None], found.x_last[level_idx])
        adv = adv.view(len(eps_list), *x.shape)
    return AttackResult(adv, success, step, found_at, count.row_steps, count.row_forwards,
                        unverified)
