"""L-inf PGD over a whole epsilon grid as one batched stream of rows.

Rows are (epsilon, sample) pairs laid out epsilon-major; every row carries its own radius, so
one forward/backward per step serves the whole grid. Each step is: the model's forward, the
input gradient of the summed cross entropy (parameters get none) and one fused update kernel
(:func:`powerlaw_fast.ops.attack_step.pgd_update`). Nothing in the step loop waits for the host,
and on CUDA the loop is captured in a CUDA graph and replayed.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from powerlaw_fast._validation import check_int_range, check_real
from powerlaw_fast.attacks._common import (
    CPU_DEFAULT_ROWS,
    check_bounds,
    check_eps,
    check_inputs,
    check_max_batch,
    draw,
    eval_mode,
    input_gradient,
    make_generator,
    misclassified,
)
from powerlaw_fast.ops.attack_step import pgd_update, resolve_step_backend

__all__ = ["pgd", "pgd_sweep"]

# Eager steps run on a side stream before capture (lazy init of cuBLAS/cuDNN handles, Triton
# compilation, autograd's workspace); they are real PGD steps, not thrown away.
_WARMUP_STEPS = 3


@dataclass
class _Config:
    steps: int
    step_size: float
    bounds: tuple[float, float]
    backend: str
    cuda_graph: bool


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
        eps_dtype = torch.float64 if dtype == torch.float64 else torch.float32
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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validated core: returns (adversarial [E, n, *], misclassified [E, n] or None).

    The model must already be in eval mode. Chunks hold ``rows_per_chunk`` rows at most:
    m samples x a group of epsilons, so x's rows are read, never replicated, per chunk.
    """
    n, E = x.shape[0], len(eps_list)
    sample_shape = tuple(x.shape[1:])
    x2d = x.reshape(n, -1)
    y = y.long()
    eps_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    eps_all = torch.tensor(eps_list, dtype=eps_dtype, device=x.device)
    m = min(n, rows_per_chunk)
    eps_group = max(1, rows_per_chunk // m)
    cfg = _Config(steps, step_size, bounds, backend, cuda_graph)
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
               cuda_graph)
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
) -> torch.Tensor:
    """Projected gradient descent in the L-inf ball (eq. 7-8 of Nassar et al. 2020).

    ``delta <- clip_eps(delta + step_size * sign(grad_x CE(model(x + delta), y)))`` with
    ``x + delta`` clamped to ``bounds``; the final iterate is returned. The paper uses 40 steps
    of 0.01 on MNIST.

    Args:
        model: maps ``[R, *]`` inputs to ``[R, classes]`` logits. Run in eval mode; its modes
            are restored afterwards. Parameters get no ``.grad``.
        x: ``[n, *]`` float inputs within ``bounds``.
        y: ``[n]`` integer labels.
        eps: a float, or a sequence of E floats >= 0 attacked together as one batch.
        steps, step_size: number of steps (>= 1) and their size (> 0).
        random_start: start from ``x + U(-eps, eps)`` (clamped to ``bounds``).
        restarts: with random starts, per sample keep the first restart that fools the model
            (else the last one).
        generator: ``torch.Generator``, int seed or None (seed 0) for the random starts; the
            global RNG is not used.
        backend: update kernel: "auto" | "torch" | "triton" | "cuda".
        cuda_graph: on CUDA, capture the step loop in a CUDA graph (eager fallback with a
            warning when the model cannot be captured).
        max_batch: rows (epsilons x samples) per forward pass. None: on CUDA sized to
            ``memory_budget`` bytes (default half the free memory; measured with one probe
            step, which resets the peak-memory statistics), 4096 on CPU.
        progress: tqdm bar over chunks.

    Returns: adversarial examples shaped like ``x`` (float eps) or ``[E, *x.shape]``.

    >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    >>> x, y = torch.rand(5, 4), torch.tensor([0, 1, 2, 0, 1])
    >>> pgd(model, x, y, [0.0, 0.1], steps=3).shape
    torch.Size([2, 5, 4])
    """
    x_adv, _ = _pgd_validated(model, x, y, eps, steps=steps, step_size=step_size,
                              random_start=random_start, restarts=restarts, bounds=bounds,
                              generator=generator, backend=backend, cuda_graph=cuda_graph,
                              max_batch=max_batch, memory_budget=memory_budget,
                              need_success=False, progress=progress)
    return x_adv


def _pgd_validated(model, x, y, eps, *, steps, step_size, random_start, restarts, bounds,
                   generator, backend, cuda_graph, max_batch, memory_budget, need_success,
                   progress, runners=None):
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
    bounds = check_bounds(bounds)
    max_batch = check_max_batch(max_batch)
    if memory_budget is not None:
        check_int_range(memory_budget, "memory_budget", 1, 2**62, " (bytes)")
    check_inputs(x, y, bounds)
    resolved = resolve_step_backend(backend, x.device, x.dtype)
    gen = make_generator(generator, x.device) if random_start else None
    with eval_mode(model):
        rows = max_batch
        if rows is None:
            rows = _auto_rows(model, x, y, memory_budget, cuda_graph)
        adv, success = pgd_sweep(
            model, x.detach(), y, eps_list, steps=steps, step_size=step_size,
            random_start=random_start, restarts=restarts, bounds=bounds, generator=gen,
            backend=resolved, cuda_graph=cuda_graph, rows_per_chunk=rows,
            need_success=need_success, progress=progress, runners=runners,
        )
    if single:
        adv = adv[0]
        success = None if success is None else success[0]
    return adv, success
