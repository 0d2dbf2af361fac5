"""L-inf PGD over a whole epsilon grid, doing no work that cannot change the answer.

Two modes.

**Any-iterate search (default).** A sample is fooled at eps when some iterate of PGD within
the eps-ball is misclassified (the rule of AutoAttack and RobustBench; never weaker than judging
the final iterate alone). That makes three savings exact:

1. *Early retirement.* The forward pass a step needs for its gradient also classifies the
   current iterate. A row whose iterate is misclassified keeps that iterate and stops: its loss
   is masked out (zero gradient, so the fused update leaves it exactly unchanged) and the
   active rows are compacted (every step on the CPU, every few steps on CUDA, where finding the
   survivors costs a host sync) so the GEMMs stay dense.
2. *Nested balls.* The grid is attacked in increasing eps. An adversarial example found within
   eps_i lies within every larger eps_j, so only samples that survived every smaller radius are
   attacked at eps_j. Every attack that does run is the same PGD a plain per-eps loop runs, so
   every sample the loop fools is fooled here too. eps = 0 costs one forward pass. When few
   samples survive, the next radii join the same batch (a row settles as soon as the same
   sample is fooled at its radius or a smaller one): fewer sequential steps, same verdicts.
3. *Cheaper gradients (opt-in).* ``precision="tf32"`` or ``"bf16"`` computes the attack's
   forward/backward in reduced precision (only the gradient's sign is used); a success it sees
   counts only after an fp32 forward of that iterate confirms it.

Every success is finally re-checked in one pass: inside the eps-ball, inside the bounds, and
misclassified by an fp32 forward.

**Final-iterate mode** (``final_iterate=True``): the verdict at each eps is the final
iterate's, as torchattacks and plain loops report it. The grid then runs as one batched
stream of rows (E x n, epsilon-major, each row with its own radius): one forward/backward per
step for the whole grid, one fused update kernel
(:func:`powerlaw_fast.ops.attack_step.pgd_update`), no host sync in the step loop, and on
CUDA the loop is captured in a CUDA graph and replayed. Only eps = 0 is skipped (its PGD
iterates are all x).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from powerlaw_fast._torch_helpers import accumulation_dtype, eval_mode
from powerlaw_fast._validation import check_int_range, check_real
from powerlaw_fast.attacks._common import (
    CPU_DEFAULT_ROWS,
    check_bounds,
    check_eps,
    check_inputs,
    check_labels,
    check_max_batch,
    check_precision,
    draw,
    fp32_forward,
    gradient_precision,
    in_ball_and_bounds,
    input_gradient,
    make_generator,
    misclassified,
    needs_verification,
)
from powerlaw_fast.ops.attack_step import pgd_update, resolve_step_backend

__all__ = ["AttackResult", "pgd", "pgd_search", "pgd_sweep"]

# Eager steps run on a side stream before capture (lazy init of cuBLAS/cuDNN handles, Triton
# compilation, autograd's workspace); they are real PGD steps, not thrown away.
_WARMUP_STEPS = 3


@dataclass
class AttackResult:
    """What an attack over an eps grid found, per eps and sample.

    Attributes:
        adv: ``[E, n, *]`` adversarial examples (None when not asked for): where ``success`` is
            True the fooling iterate, else the final iterate of the attack at that eps.
        success: bool ``[E, n]``: fooled (clean misclassified samples count as fooled).
        step: int64 ``[E, n]``: gradient steps taken before the fooling iterate (0: the clean
            input or the random start; ``steps`` in final-iterate mode), -1 where not fooled.
        found_at: int64 ``[E, n]``: index into the eps grid of the ball whose attack found the
            example (smaller than the row's own index when inherited from a smaller eps), -1
            where not fooled.
        row_steps: rows passed through a forward + input-gradient pass (the attack's work).
        row_forwards: rows passed through a forward pass alone (clean pass, checks).
        unverified: successes the final fp32 check rejected (reported as not fooled; expected
            0, see :func:`pgd`).
    """

    adv: torch.Tensor | None
    success: torch.Tensor
    step: torch.Tensor
    found_at: torch.Tensor
    row_steps: int = 0
    row_forwards: int = 0
    unverified: int = 0

    def work(self) -> dict:
        return {"row_steps": self.row_steps, "row_forwards": self.row_forwards,
                "unverified": self.unverified}


@dataclass
class _Config:
    steps: int
    step_size: float
    bounds: tuple[float, float]
    backend: str
    cuda_graph: bool
    precision: str = "fp32"


class _ChunkRunner:
    """Static buffers for chunks of one shape (R rows = E_chunk x m samples) and their graph."""

    def __init__(self, model, sample_shape, rows: int, m: int, dtype, device, cfg: _Config):
        self.model, self.cfg = model, cfg
        self.shape = (rows, *sample_shape)
        D = 1
        for s in sample_shape:
            D *= s
        self.x = torch.empty((rows, D), dtype=dtype, device=device)
        self.x_nat = torch.empty((m, D), dtype=dtype, device=device)
        self.y = torch.empty((rows,), dtype=torch.long, device=device)
        eps_dtype = accumulation_dtype(dtype)
        self.eps = torch.empty((rows,), dtype=eps_dtype, device=device)
        self.use_graph = cfg.cuda_graph and device.type == "cuda"
        self.graph: torch.cuda.CUDAGraph | None = None

    def load(self, x_nat: torch.Tensor, y: torch.Tensor, eps_rows: torch.Tensor) -> None:
        self.x_nat.copy_(x_nat)
        self.y.copy_(y.repeat(self.x.shape[0] // y.shape[0]))
        self.eps.copy_(eps_rows)

    def step(self) -> None:
        # a fresh leaf over the buffer's storage: only the input ever requires grad
        x_in = self.x.view(self.shape).detach().requires_grad_(True)
        with gradient_precision(self.cfg.precision, self.x.device):
            grad = input_gradient(self.model, x_in, self.y)
        with torch.no_grad():
            pgd_update(self.x, self.x_nat, grad.view(self.x.shape), self.eps, self.cfg.step_size,
                       self.cfg.bounds, backend=self.cfg.backend, out=self.x)

    def run(self, steps: int) -> None:
        done = 0
        if self.use_graph and self.graph is None and steps > _WARMUP_STEPS:
            done = self._warmup_and_capture()
        if self.graph is not None:
            for _ in range(steps - done):
                self.graph.replay()
        else:
            for _ in range(steps - done):
                self.step()

    def _warmup_and_capture(self) -> int:
        side = torch.cuda.Stream(device=self.x.device)
        side.wait_stream(torch.cuda.current_stream(self.x.device))
        with torch.cuda.stream(side):
            for _ in range(_WARMUP_STEPS):
                self.step()
        caller_stream = torch.cuda.current_stream(self.x.device)
        caller_stream.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            # capture only records kernels: the buffers are not advanced by it
            with torch.cuda.graph(graph):
                self.step()
        except Exception as err:  # model not capturable (host syncs, dynamic shapes, ...)
            # torch.cuda.graph's __exit__ skips restoring the stream when capture_end raises
            # (an invalidated capture): without this the eager steps, and everything after
            # them in this thread, would run on the graph's private capture stream.
            torch.cuda.set_stream(caller_stream)
            warnings.warn(
                f"pgd: CUDA graph capture failed ({type(err).__name__}: {err}); running the step "
                "loop eagerly. Pass cuda_graph=False to skip the attempt.",
                RuntimeWarning,
                stacklevel=4,
            )
            self.use_graph = False
            return _WARMUP_STEPS
        self.graph = graph
        return _WARMUP_STEPS


def _auto_rows(model, x: torch.Tensor, y: torch.Tensor, memory_budget: int | None,
               cuda_graph: bool = True) -> int:
    """Rows per forward pass: the CPU default, or on CUDA what fits in ``memory_budget`` bytes
    (default: half the free device memory), from the peak memory of one probe step."""
    if x.device.type != "cuda":
        return CPU_DEFAULT_ROWS
    device = x.device
    if memory_budget is None:
        free, _ = torch.cuda.mem_get_info(device)
        memory_budget = free // 2
    probe = min(x.shape[0], 256)
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    x_in = x[:probe].detach().clone().requires_grad_(True)
    input_gradient(model, x_in, y[:probe].long())
    torch.cuda.synchronize(device)
    per_row = (torch.cuda.max_memory_allocated(device) - base) / probe
    if cuda_graph:  # the graph's private pool holds a second copy of a step's activations
        per_row *= 2
    # the attack's own buffers: iterate, gradient, best restart, output slice
    per_row += 4 * x[0].numel() * x.element_size()
    return max(1, int(memory_budget // max(per_row, 1.0)))


def pgd_sweep(
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
    generator: torch.Generator,
    backend: str,
    cuda_graph: bool,
    rows_per_chunk: int,
    need_success: bool,
    progress: bool = False,
    runners: dict | None = None,
    precision: str = "fp32",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validated core: returns (adversarial [E, n, *], misclassified [E, n] or None).

    The model must already be in eval mode. Chunks hold ``rows_per_chunk`` rows at most:
    m samples x a group of epsilons, so x's rows are read, never replicated, per chunk.
    """
    n, E = x.shape[0], len(eps_list)
    sample_shape = tuple(x.shape[1:])
    x2d = x.reshape(n, -1)
    y = y.long()
    eps_dtype = accumulation_dtype(x.dtype)
    eps_all = torch.tensor(eps_list, dtype=eps_dtype, device=x.device)
    m = min(n, rows_per_chunk)
    eps_group = max(1, rows_per_chunk // m)
    cfg = _Config(steps, step_size, bounds, backend, cuda_graph, precision)
    adv = torch.empty((E, n, x2d.shape[1]), dtype=x.dtype, device=x.device)
    success = torch.empty((E, n), dtype=torch.bool, device=x.device) if need_success else None
    # runners (buffers + captured graphs) keyed by chunk shape; a caller may pass a dict to
    # reuse them across calls with the same model and settings
    runners = {} if runners is None else runners
    chunks = [(e0, min(E, e0 + eps_group), i0, min(n, i0 + m))
              for e0 in range(0, E, eps_group) for i0 in range(0, n, m)]
    for e0, e1, i0, i1 in tqdm(chunks, desc="pgd", disable=not progress or len(chunks) < 2):
        mc, ec = i1 - i0, e1 - e0
        rows = ec * mc
        key = (rows, mc, sample_shape, x.dtype, x.device, steps, step_size, bounds, backend,
               cuda_graph, precision)
        if key not in runners:
            runners[key] = _ChunkRunner(model, sample_shape, rows, mc, x.dtype, x.device, cfg)
        run = runners[key]
        eps_rows = eps_all[e0:e1].repeat_interleave(mc)
        run.load(x2d[i0:i1], y[i0:i1], eps_rows)
        best = fooled = None
        for r in range(restarts):
            run.x.copy_(run.x_nat.repeat(ec, 1))
            if random_start:
                noise = draw(run.x.shape, "uniform", generator, run.x)
                run.x.add_((2 * noise - 1) * run.eps.to(run.x.dtype)[:, None])
                run.x.clamp_(bounds[0], bounds[1])
            run.run(steps)
            if restarts == 1 and not need_success:
                break
            fool = misclassified(model, run.x.view(run.shape), run.y, None)
            if r == 0:
                best, fooled = run.x.clone(), fool
            else:
                # keep the first restart that fools the model; otherwise the latest one
                torch.where((~fooled)[:, None], run.x, best, out=best)
                fooled = fooled | fool
        final = run.x if best is None else best
        adv[e0:e1, i0:i1] = final.view(ec, mc, -1)
        if success is not None:
            success[e0:e1, i0:i1] = fooled.view(ec, mc)
    return adv.view(E, *x.shape), success


# ----------------------------------------------------------------------------- any-iterate search
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


class _Counter:
    def __init__(self):
        self.row_steps = 0
        self.row_forwards = 0


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
    sample_shape = tuple(x.shape[1:])
    x2d = x.reshape(n, -1)
    D = x2d.shape[1]
    device = x.device
    eps_dtype = accumulation_dtype(x.dtype)
    y = y.long()
    if compact_every is None:
        compact_every = 1 if device.type != "cuda" else 4
    cfg = _SearchConfig(model, sample_shape, steps, step_size, bounds, backend, precision,
                        needs_verification(precision, device), compact_every)
    levels = sorted(set(eps_list))  # ascending: a success at eps_i is one at every eps_j > eps_i
    L = len(levels)
    count = _Counter()
    level_of = torch.full((n,), L, dtype=torch.long, device=device)  # L: never fooled
    step_of = torch.full((n,), -1, dtype=torch.long, device=device)
    x_found = x2d.clone()  # the fooling iterate where fooled
    x_last = x2d.new_empty((L, n, D)) if need_adv else None  # final iterates of robust rows

    # The clean point lies in every ball: one fp32 forward settles every misclassified sample
    # at the smallest radius, and eps = 0 (all PGD iterates equal x) needs nothing more.
    clean_wrong = misclassified(model, x, y, rows_per_chunk)
    count.row_forwards += n
    level_of[clean_wrong] = 0
    step_of[clean_wrong] = 0
    if need_adv:
        x_last[:] = x2d

    m = min(n, rows_per_chunk)
    chunks = [(i0, min(n, i0 + m)) for i0 in range(0, n, m)]
    # Radii attacked together when few samples survive: a step has a fixed cost (dispatch,
    # thread wake-ups; on a busy CPU each parallel region can wait a time slice for its other
    # thread), so many sequential steps on a handful of rows would cost as much as big ones.
    # Grouping changes only the schedule, not a single verdict.
    group_rows = min(rows_per_chunk, _GROUP_ROWS.get(device.type, _GROUP_ROWS["cuda"]))
    bar = tqdm(total=len(chunks) * L, desc="pgd", disable=not progress)
    for i0, i1 in chunks:
        u = 0
        while u < L:
            if levels[u] == 0.0:
                u += 1
                bar.update(1)
                continue
            alive = i0 + (level_of[i0:i1] == L).nonzero().squeeze(1)
            a = alive.numel()
            g = 1
            # restarts keep one radius at a time: a later restart may still fool a sample at
            # a smaller radius than an earlier restart did, and must get the chance to
            while restarts == 1 and u + g < L and a * (g + 1) <= group_rows:
                g += 1
            bar.update(g)
            for _ in range(restarts):
                if a == 0:
                    break
                group = torch.tensor(levels[u : u + g], dtype=torch.float64, device=device)
                rows_sample = torch.arange(a, device=device).repeat(g)  # level-major rows
                rows_level = torch.arange(g, device=device).repeat_interleave(a)
                xn = x2d[alive].repeat(g, 1)
                eps_rows = group.to(eps_dtype)[rows_level]
                if random_start:
                    # drawn for the whole chunk at each radius, so a sample's start does not
                    # depend on which other samples are alive (and matches a plain loop's draw)
                    noise = torch.cat([draw((i1 - i0, D), "uniform", generator, x2d)[alive - i0]
                                       for _ in range(g)])
                    start = (xn + (2 * noise - 1) * eps_rows.to(x2d.dtype)[:, None])
                    start = start.clamp_(bounds[0], bounds[1])
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
                level_of[hit] = u + first[fooled]
                step_of[hit] = k[row]
                x_found[hit] = x_out[row]
                if need_adv:
                    x_last[u : u + g, alive] = x_out.view(g, a, D)
                alive = alive[~fooled]
                a = alive.numel()
            u += g
    bar.close()

    # Final check of every success, once per sample (a larger ball holds it as well).
    hit = (level_of < L).nonzero().squeeze(1)
    unverified = 0
    if hit.numel():
        eps_levels = torch.tensor(levels, dtype=torch.float64, device=device)
        ok = in_ball_and_bounds(x_found[hit], x2d[hit], eps_levels[level_of[hit]], bounds)
        wrong = misclassified(model, x_found[hit].view(-1, *sample_shape), y[hit],
                              rows_per_chunk)
        count.row_forwards += int(hit.numel())
        bad = hit[~(ok & wrong)]
        unverified = int(bad.numel())
        if unverified:
            warnings.warn(
                f"pgd: {unverified} adversarial examples failed the final fp32 check (a logit "
                "tie decided differently in another batch) and are counted as not fooled",
                RuntimeWarning, stacklevel=3)
            level_of[bad] = L
            step_of[bad] = -1

    # Back to the caller's grid: entry e is fooled when found at a radius <= eps_e.
    level_idx = torch.tensor([levels.index(e) for e in eps_list], device=device)
    first_entry = torch.tensor([eps_list.index(v) for v in levels] + [-1], device=device)
    success = level_of[None, :] <= level_idx[:, None]  # [E, n]
    step = torch.where(success, step_of[None, :], -1)
    found_at = torch.where(success, first_entry[level_of][None, :], -1)
    adv = None
    if need_adv:
        adv = torch.where(success[:, :, None], x_found[None], x_last[level_idx])
        adv = adv.view(len(eps_list), *x.shape)
    return AttackResult(adv, success, step, found_at, count.row_steps, count.row_forwards,
                        unverified)


# ----------------------------------------------------------------------------- public API
def pgd(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps,
    *,
    steps: int = 40,
    step_size: float = 0.01,
    random_start: bool = False,
    restarts: int = 1,
    bounds: tuple[float, float] = (0.0, 1.0),
    generator: torch.Generator | int | None = None,
    backend: str = "auto",
    cuda_graph: bool = True,
    max_batch: int | None = None,
    memory_budget: int | None = None,
    progress: bool = False,
    final_iterate: bool = False,
    precision: str | None = None,
    compact_every: int | None = None,
    details: bool = False,
):
    """Projected gradient descent in the L-inf ball (eq. 7-8 of Nassar et al. 2020).

    ``delta <- clip_eps(delta + step_size * sign(grad_x CE(model(x + delta), y)))`` with
    ``x + delta`` clamped to ``bounds``. The paper uses 40 steps of 0.01 on MNIST.

    By default a sample counts as fooled at eps when any PGD iterate within the eps-ball
    (including x itself and iterates found at smaller eps of the grid) is misclassified; see the
    module docstring for how that saves work without weakening the attack. Every sample a plain
    per-eps loop of the same PGD fools is fooled here too (up to rounding of a gradient sign,
    which can differ with the batch composition).

    Args:
        model: maps ``[R, *]`` inputs to ``[R, classes]`` logits. Run in eval mode; its modes
            are restored afterwards. Parameters get no ``.grad``.
        x: ``[n, *]`` float inputs within ``bounds``.
        y: ``[n]`` integer labels in ``[0, classes)``.
        eps: a float, or a sequence of E floats >= 0 attacked together.
        steps, step_size: number of steps (>= 1) and their size (> 0).
        random_start: start from ``x + U(-eps, eps)`` (clamped to ``bounds``).
        restarts: with random starts, per sample keep the first restart that fools the model
            (else the last one).
        generator: ``torch.Generator``, int seed or None (seed 0) for the random starts; the
            global RNG is not used.
        backend: update kernel: "auto" | "torch" | "triton" | "cuda".
        cuda_graph: on CUDA, capture the final-iterate mode's step loop in a CUDA graph (eager
            fallback with a warning when the model cannot be captured). The default mode runs
            eagerly: its batch shrinks as rows retire.
        max_batch: rows per forward pass. None: on CUDA sized to ``memory_budget`` bytes
            (default half the free memory; measured with one probe step, which resets the
            peak-memory statistics), 4096 on CPU.
        progress: tqdm bar.
        final_iterate: judge only the final iterate at each eps (torchattacks' and a plain
            loop's rule; no retirement, no nesting) and return it.
        precision: arithmetic of the attack's gradient passes: None or "fp32" (the caller's
            float32 settings), "tf32" (TF32 matmuls/convolutions on CUDA), "bf16" (bfloat16
            autocast). Successes are always confirmed by an fp32 forward.
        compact_every: default mode: steps between compactions of the live rows (None: 1 on
            the CPU, 4 on CUDA, where each costs a host sync).
        details: return an :class:`AttackResult` (examples, success, step, work) instead.

    Returns: adversarial examples shaped like ``x`` (float eps) or ``[E, *x.shape]``, dtype of
    ``x``: in the default mode the fooling iterate where the sample was fooled (possibly found
    at a smaller eps), else the final iterate; in final-iterate mode the final iterate.

    >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    >>> x, y = torch.rand(5, 4), torch.tensor([0, 1, 2, 0, 1])
    >>> pgd(model, x, y, [0.0, 0.1], steps=3).shape
    torch.Size([2, 5, 4])
    >>> r = pgd(model, x, y, [0.0, 0.1], steps=3, details=True)
    >>> r.success.shape, r.step.dtype
    (torch.Size([2, 5]), torch.int64)
    """
    result, single = _pgd_validated(
        model, x, y, eps, steps=steps, step_size=step_size, random_start=random_start,
        restarts=restarts, bounds=bounds, generator=generator, backend=backend,
        cuda_graph=cuda_graph, max_batch=max_batch, memory_budget=memory_budget,
        need_adv=True, progress=progress, final_iterate=final_iterate, precision=precision,
        compact_every=compact_every, need_success=details)
    if details:
        if single:
            result.adv, result.success = result.adv[0], result.success[0]
            result.step, result.found_at = result.step[0], result.found_at[0]
        return result
    return result.adv[0] if single else result.adv


def _final_iterate_sweep(model, x, y, eps_list, *, need_success, need_adv, **kw) -> AttackResult:
    """Final-iterate mode: the batched sweep over the eps > 0 entries; eps = 0 is x itself."""
    n, E = x.shape[0], len(eps_list)
    pos = [i for i, e in enumerate(eps_list) if e > 0]
    zero = [i for i, e in enumerate(eps_list) if e == 0]
    adv = x.detach().unsqueeze(0).repeat(E, *([1] * x.dim())) if need_adv else None
    success = torch.zeros((E, n), dtype=torch.bool, device=x.device)
    row_steps = row_forwards = 0
    if zero and need_success:
        success[zero] = misclassified(model, x, y.long(), kw["rows_per_chunk"])
        row_forwards += n
    if pos:
        out, fooled = pgd_sweep(model, x, y, [eps_list[i] for i in pos],
                                need_success=need_success, **kw)
        restarts = kw["restarts"]
        row_steps += len(pos) * n * kw["steps"] * restarts
        if need_adv:
            adv[pos] = out
        if need_success:
            success[pos] = fooled
            row_forwards += len(pos) * n * restarts
    step = torch.where(success, kw["steps"], -1)
    step[zero] = torch.where(success[zero], 0, -1)
    found_at = torch.where(success, torch.arange(E, device=x.device)[:, None], -1)
    return AttackResult(adv, success, step, found_at, row_steps, row_forwards)


def _pgd_validated(model, x, y, eps, *, steps, step_size, random_start, restarts, bounds,
                   generator, backend, cuda_graph, max_batch, memory_budget, need_adv,
                   progress, final_iterate=False, precision=None, compact_every=None,
                   need_success=True, runners=None, checked=False):
    """Checks every argument, then runs the chosen mode. Returns (AttackResult, single eps)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    eps_list, single = check_eps(eps)
    steps = check_int_range(steps, "steps", 1, 2**31 - 1)
    step_size = check_real(step_size, "step_size", low=0.0, low_inclusive=False)
    restarts = check_int_range(restarts, "restarts", 1, 2**31 - 1)
    if restarts > 1 and not random_start:
        raise ValueError(
            f"restarts: expected 1 without random_start (restarts from x itself are identical), "
            f"got {restarts}; pass random_start=True"
        )
    if not isinstance(final_iterate, bool):
        raise TypeError(f"final_iterate: expected a bool, got {type(final_iterate).__name__}")
    precision = check_precision(precision)
    if compact_every is not None:
        compact_every = check_int_range(compact_every, "compact_every", 1, 2**31 - 1)
    bounds = check_bounds(bounds)
    max_batch = check_max_batch(max_batch)
    if memory_budget is not None:
        check_int_range(memory_budget, "memory_budget", 1, 2**62, " (bytes)")
    check_inputs(x, y, bounds)
    resolved = resolve_step_backend(backend, x.device, x.dtype)
    gen = make_generator(generator, x.device) if random_start else None
    with eval_mode(model):
        if not checked:
            check_labels(model, x, y)
        rows = max_batch
        if rows is None:
            rows = _auto_rows(model, x, y, memory_budget, cuda_graph and final_iterate)
        if final_iterate:
            result = _final_iterate_sweep(
                model, x.detach(), y, eps_list, need_success=need_success, need_adv=need_adv,
                steps=steps, step_size=step_size, random_start=random_start,
                restarts=restarts, bounds=bounds, generator=gen, backend=resolved,
                cuda_graph=cuda_graph, rows_per_chunk=rows, progress=progress,
                runners=runners, precision=precision)
        else:
            result = pgd_search(
                model, x.detach(), y, eps_list, steps=steps, step_size=step_size,
                random_start=random_start, restarts=restarts, bounds=bounds, generator=gen,
                backend=resolved, rows_per_chunk=rows, precision=precision,
                compact_every=compact_every, need_adv=need_adv, progress=progress)
    return result, single
