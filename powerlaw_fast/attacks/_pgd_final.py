"""PGD's final-iterate mode: the whole eps grid as one batched stream of rows, CUDA-graph replayed.

The verdict at each eps is the final iterate's (``pgd(..., final_iterate=True)``; the rule of
torchattacks and of a plain per-eps loop). The grid runs as rows ``E x n``, epsilon-major, each
row with its own radius: one forward/backward per step for the whole grid, one fused update
kernel (:func:`powerlaw_fast.ops.attack_step.pgd_update`), no host sync in the step loop, and on
CUDA the loop is captured in a CUDA graph and replayed. Only eps = 0 is skipped (its PGD
iterates are all x).

Read top to bottom: :class:`_ChunkRunner` (static buffers and the captured graph for chunks of
one shape), :func:`pgd_sweep` (chunks, restarts, best restart per sample) and
:func:`final_iterate_sweep` (eps = 0 and the :class:`AttackResult` of the mode).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from powerlaw_fast._torch_helpers import accumulation_dtype
from powerlaw_fast.attacks._common import (
    AttackResult,
    draw,
    gradient_precision,
    input_gradient,
    misclassified,
)
from powerlaw_fast.ops.attack_step import pgd_update

__all__ = ["final_iterate_sweep", "pgd_sweep"]

# Eager steps run on a side stream before capture (lazy init of cuBLAS/cuDNN handles, Triton
# compilation, autograd's workspace); they are real PGD steps, not thrown away.
_WARMUP_STEPS = 3


@dataclass
class _Config:
    """The settings a runner's buffers and captured graph were built for."""

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


def final_iterate_sweep(model, x, y, eps_list, *, need_success, need_adv, **kw) -> AttackResult:
    """The final-iterate mode over the whole grid (model already in eval mode, arguments checked).

    The eps > 0 entries go through :func:`pgd_sweep` (``kw``: its keyword arguments); eps = 0
    is x itself, judged by one forward when ``need_success``.
    """
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

