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

Layout: this module checks the arguments and picks the mode (:func:`pgd`, and
:func:`run_pgd`, the same path for :func:`powerlaw_fast.attacks.curve.robustness_curve`);
``attacks/_pgd_search.py`` is the any-iterate search, ``attacks/_pgd_final.py`` the
final-iterate runner with its CUDA graphs, ``attacks/_common.py`` what all attacks share.
"""

from __future__ import annotations

import torch

from powerlaw_fast._torch_helpers import eval_mode
from powerlaw_fast._validation import check_int_range, check_real
from powerlaw_fast.attacks._common import (
    AttackResult,
    check_bounds,
    check_eps,
    check_inputs,
    check_labels,
    check_max_batch,
    check_precision,
    make_generator,
    rows_per_pass,
)
from powerlaw_fast.attacks._pgd_final import final_iterate_sweep, pgd_sweep
from powerlaw_fast.attacks._pgd_search import pgd_search
from powerlaw_fast.ops.attack_step import resolve_step_backend

# pgd_search and pgd_sweep: the validated cores of the two modes, importable from here as before
__all__ = ["AttackResult", "pgd", "pgd_search", "pgd_sweep"]


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
    result, single = run_pgd(
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


def run_pgd(model, x, y, eps, *, steps, step_size, random_start, restarts, bounds, generator,
            backend, cuda_graph, max_batch, memory_budget, need_adv, progress,
            final_iterate=False, precision=None, compact_every=None, need_success=True,
            runners=None, labels_checked=False) -> tuple[AttackResult, bool]:
    """Check every argument, then run the chosen mode: the one path of :func:`pgd` and of
    :func:`powerlaw_fast.attacks.curve.robustness_curve` (internal: not in ``__all__``).

    Arguments as :func:`pgd`, and:
        need_adv, need_success: compute the examples / the verdicts (a curve needs no examples).
        runners: a dict the final-iterate mode keeps its buffers and captured CUDA graphs in;
            pass the same dict for every batch of one curve to capture once and replay after.
        labels_checked: the caller already ran ``check_labels`` on these inputs (a curve checks
            each batch once for every attack).

    Returns: (:class:`AttackResult` over the grid, whether ``eps`` was a single float).
    """
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
        if not labels_checked:
            check_labels(model, x, y)
        rows = max_batch
        if rows is None:
            rows = rows_per_pass(model, x, y, memory_budget, cuda_graph and final_iterate)
        if final_iterate:
            result = final_iterate_sweep(
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
