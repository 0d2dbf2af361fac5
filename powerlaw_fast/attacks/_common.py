"""Shared pieces of the attacks: their result type, argument checks, rows per forward pass,
input gradients, private RNG, gradient precision and the fp32 verification of adversarial
examples."""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from powerlaw_fast._torch_helpers import accumulation_dtype
from powerlaw_fast._validation import check_float_dtype, check_int_range, check_real, check_tensor

# Rows (epsilon replicas x samples) per forward pass on the CPU when max_batch is None.
CPU_DEFAULT_ROWS = 4096


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
            0, see :func:`powerlaw_fast.attacks.pgd.pgd`).
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


def check_bounds(bounds) -> tuple[float, float]:
    if not isinstance(bounds, (tuple, list)) or len(bounds) != 2:
        raise ValueError(f"bounds: expected a pair (lo, hi), got {bounds!r}")
    lo = check_real(bounds[0], "bounds[0]", low=-math.inf, low_inclusive=False)
    hi = check_real(bounds[1], "bounds[1]", low=-math.inf, low_inclusive=False)
    if not lo < hi:
        raise ValueError(f"bounds: expected lo < hi, got {bounds!r}")
    return lo, hi


def check_eps(eps, name: str = "eps") -> tuple[list[float], bool]:
    """Return (list of radii, whether a single float was given)."""
    if isinstance(eps, torch.Tensor):
        if eps.dim() > 1:
            raise ValueError(
                f"{name}: expected a float or a 1-D sequence, got shape {tuple(eps.shape)}"
            )
        single = eps.dim() == 0
        eps = [eps.item()] if single else eps.tolist()
    elif isinstance(eps, numbers.Real) and not isinstance(eps, bool):
        single, eps = True, [eps]
    elif isinstance(eps, Sequence) and not isinstance(eps, str):
        single, eps = False, list(eps)
    else:
        raise TypeError(
            f"{name}: expected a float or a sequence of floats, got {type(eps).__name__}"
        )
    if not eps:
        raise ValueError(f"{name}: expected at least one value, got an empty sequence")
    values = [check_real(e, f"{name}[{i}]" if not single else name, low=0.0, low_inclusive=True)
              for i, e in enumerate(eps)]
    return values, single


def check_inputs(x, y, bounds: tuple[float, float] | None) -> None:
    """x: [n, *] float within bounds; y: [n] integer labels on x's device."""
    check_tensor(x, "x")
    check_tensor(y, "y")
    check_float_dtype(x, "x")
    if x.dim() < 2:
        raise ValueError(
            f"x: expected a batch [n, *] with at least 2 dims, got shape {tuple(x.shape)}"
        )
    if x.shape[0] < 1:
        raise ValueError("x: expected at least one sample, got n = 0")
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(
            f"y: expected labels of shape [n] = [{x.shape[0]}] (one per row of x), "
            f"got {tuple(y.shape)}"
        )
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise TypeError(f"y: expected integer class labels, got dtype {y.dtype}")
    if y.device != x.device:
        raise ValueError(f"y: expected device {x.device} (the device of x), got {y.device}")
    # cross_entropy would silently skip -100 (its ignore_index) and raise a bare IndexError on
    # other negatives; the upper end is checked against the model's outputs (check_labels).
    y_min = int(y.min())
    if y_min < 0:
        raise ValueError(f"y: expected class labels in [0, classes), got min {y_min}")
    if bounds is not None:
        lo, hi = bounds
        # one host sync per call, outside every step loop
        bad = ~((x >= lo) & (x <= hi))
        if bool(bad.any()):
            raise ValueError(
                f"x: expected every value within bounds [{lo}, {hi}] (and no NaN), got "
                f"{int(bad.sum())} values outside "
                f"(min {x.min().item():.4g}, max {x.max().item():.4g})"
            )


def check_finite(x: torch.Tensor, name: str = "x") -> None:
    """No NaN or inf in x (one host sync)."""
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        raise ValueError(f"{name}: expected finite values, got {int(bad.sum())} NaN or inf")


def check_labels(model, x: torch.Tensor, y: torch.Tensor) -> int:
    """Number of classes C from one forward of a single row; every label must be in [0, C).

    A label >= C would otherwise end in a raw IndexError inside cross_entropy (pgd, fgsm) or
    count as a silent misclassification (noise). Model already in eval mode.
    """
    with torch.no_grad(), fp32_forward(x.device):
        out = model(x[:1])
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 1:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"model: expected logits [n, classes] (one row per input row), got {shape} "
            "for an input of 1 row"
        )
    classes = int(out.shape[1])
    y_min, y_max = int(y.min()), int(y.max())
    if y_min < 0 or y_max >= classes:
        raise ValueError(
            f"y: expected class labels in [0, {classes}) for a model with {classes} outputs, "
            f"got min {y_min}, max {y_max}"
        )
    return classes


def check_max_batch(max_batch) -> int | None:
    if max_batch is None:
        return None
    return check_int_range(max_batch, "max_batch", 1, 2**62, " (rows per forward pass)")


def make_generator(generator, device: torch.device) -> torch.Generator:
    """A private generator: an int seeds a new one, None means seed 0 (reproducible by default).

    The global RNG is never touched.
    """
    if isinstance(generator, torch.Generator):
        return generator
    if generator is None:
        seed = 0
    elif isinstance(generator, numbers.Integral) and not isinstance(generator, bool):
        seed = int(generator)
    else:
        raise TypeError(
            "generator: expected a torch.Generator, an int seed or None, "
            f"got {type(generator).__name__}"
        )
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def draw(shape, kind: str, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """Uniform [0, 1) or standard normal numbers on the generator's device, moved to ``like``."""
    fn = torch.rand if kind == "uniform" else torch.randn
    dtype = accumulation_dtype(like.dtype)
    out = fn(shape, generator=generator, device=generator.device, dtype=dtype)
    return out.to(device=like.device, dtype=like.dtype)


def input_gradient(model, x_leaf: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """d/dx of the summed cross entropy (so per-sample gradients do not depend on the batch).

    Only the input gets a gradient: parameters' ``.grad`` stay as they were.
    """
    with torch.enable_grad():
        loss = F.cross_entropy(model(x_leaf), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x_leaf)
    return grad


@torch.no_grad()
def rows_per_pass(model, x: torch.Tensor, y: torch.Tensor, memory_budget: int | None,
                  cuda_graph: bool = True) -> int:
    """Rows per forward pass of a PGD attack when ``max_batch`` is None: the CPU default, or on
    CUDA what fits in ``memory_budget`` bytes (default: half the free device memory), from the
    peak memory of one probe step (which resets the peak-memory statistics). ``cuda_graph``:
    the step loop will be captured, whose private pool holds a second copy of the activations."""
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


def misclassified(model, x: torch.Tensor, y: torch.Tensor, max_batch: int | None) -> torch.Tensor:
    """Boolean [n]: the model's argmax differs from y, by fp32 forwards (autocast off, full
    float32 matmuls) of at most max_batch rows."""
    step = x.shape[0] if max_batch is None else max_batch
    with fp32_forward(x.device):
        parts = [
            model(x[i : i + step]).argmax(dim=1) != y[i : i + step]
            for i in range(0, x.shape[0], step)
        ]
    return torch.cat(parts)


# ----------------------------------------------------------------------------- precision
PRECISIONS = ("fp32", "tf32", "bf16")


def check_precision(precision) -> str:
    if precision is None:
        return "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS} or None, got {precision!r}")
    return precision


@contextlib.contextmanager
def _matmul_settings(precision: str, cudnn_tf32: bool) -> Iterator[None]:
    """Set torch's float32 matmul precision and cuDNN's TF32 flag; restore both afterwards."""
    old_prec = torch.get_float32_matmul_precision()
    old_cudnn = torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision(precision)
    torch.backends.cudnn.allow_tf32 = cudnn_tf32
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old_prec)
        torch.backends.cudnn.allow_tf32 = old_cudnn


@contextlib.contextmanager
def fp32_forward(device: torch.device) -> Iterator[None]:
    """What "verified by an fp32 forward" means: autocast off, float32 arithmetic as the caller
    set it (torch's float32 matmul precision and cuDNN flags are respected, not overridden)."""
    with torch.autocast(device.type, enabled=False):
        yield


@contextlib.contextmanager
def gradient_precision(precision: str, device: torch.device) -> Iterator[None]:
    """Arithmetic of the attack's forward/backward passes.

    "fp32": the caller's settings, untouched. "tf32": float32 matmuls and cuDNN convolutions
    may use TF32 (CUDA only; a no-op elsewhere). "bf16": autocast to bfloat16 (fp32
    accumulation). PGD only uses the sign of the gradient, so rounding it costs little; every
    success found this way is re-checked by :func:`fp32_forward` before it counts.
    """
    if precision == "tf32":
        with _matmul_settings("high", True):
            yield
    elif precision == "bf16":
        # no weight cache: it would go stale across CUDA-graph replays and calls
        with torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False):
            yield
    else:
        yield


def needs_verification(precision: str, device: torch.device) -> bool:
    """Whether the attack's own forward can differ from an fp32 forward, so that a success it
    sees must be re-checked before it counts."""
    return precision != "fp32" or torch.is_autocast_enabled(device.type)


# ----------------------------------------------------------------------------- verification
def in_ball_and_bounds(adv: torch.Tensor, x: torch.Tensor, eps: torch.Tensor,
                       bounds: tuple[float, float]) -> torch.Tensor:
    """Boolean [n]: every pixel of adv [n, D] within eps [n] of x [n, D] and within bounds.

    The ball's edges are computed as the step kernel computes them (x +- eps in the compute
    dtype), so an iterate the kernel clamped to the edge passes exactly.
    """
    compute = accumulation_dtype(x.dtype)
    a, xn = adv.to(compute), x.to(compute)
    e = eps.to(compute)[:, None]
    ok = (a >= xn - e) & (a <= xn + e) & (a >= bounds[0]) & (a <= bounds[1])
    return ok.all(dim=1)
