"""Accuracy against attack strength over a data set: the paper's robustness figures."""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from powerlaw_fast._torch_helpers import eval_mode, module_device
from powerlaw_fast._validation import check_int_range
from powerlaw_fast.attacks._common import (
    check_bounds,
    check_eps,
    check_inputs,
    check_labels,
    check_max_batch,
    check_precision,
    make_generator,
    misclassified,
    rows_per_pass,
)
from powerlaw_fast.attacks.fgsm import fgsm_search
from powerlaw_fast.attacks.noise import white_noise
from powerlaw_fast.attacks.pgd import run_pgd
from powerlaw_fast.ops.attack_step import resolve_step_backend

__all__ = ["RobustnessCurve", "robustness_curve"]

ATTACKS = ("pgd", "fgsm", "noise")


def _json_safe(value):
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    return repr(value)


@dataclass
class RobustnessCurve:
    """Accuracy per attack strength.

    Attributes:
        eps: the E attack strengths (L-inf radius, or noise sigma for "noise").
        accuracy: E accuracies in [0, 1] (correct under attack / n). For PGD and FGSM in the
            default (any-iterate) mode it never increases with eps.
        success: bool tensor ``[E, n]``, True where the sample is misclassified under attack
            (already misclassified clean samples count as successes).
        attack: "pgd", "fgsm" or "noise"; attack_kwargs: the attack's arguments (JSON-safe).
        step: int64 ``[E, n]`` (PGD, FGSM; None for noise): gradient steps taken before the
            fooling example (0: the clean input or the random start), -1 where not fooled.
        found_at: int64 ``[E, n]`` (PGD, FGSM): index into ``eps`` of the ball whose attack
            found the example (a smaller eps when inherited through nested balls), -1 where
            not fooled.
        work: totals over the data: ``row_steps`` (rows through a forward + input-gradient
            pass), ``row_forwards`` (rows through a forward alone), ``unverified`` (successes
            the final fp32 check rejected, counted as not fooled).
    """

    eps: list[float]
    accuracy: list[float]
    success: torch.Tensor
    attack: str
    attack_kwargs: dict = field(default_factory=dict)
    step: torch.Tensor | None = None
    found_at: torch.Tensor | None = None
    work: dict = field(default_factory=dict)

    @property
    def n_samples(self) -> int:
        return int(self.success.shape[1])

    def __repr__(self) -> str:
        # a summary: the per-sample tensors would print thousands of entries
        eps = ", ".join(f"{e:g}" for e in self.eps)
        acc = ", ".join(f"{a:.4g}" for a in self.accuracy)
        return (f"RobustnessCurve(attack={self.attack!r}, eps=[{eps}], accuracy=[{acc}], "
                f"n_samples={self.n_samples})")

    def to_dict(self, per_sample_steps: bool = False) -> dict:
        """JSON-safe dict; ``per_sample_steps`` adds ``step`` and ``found_at`` (E x n ints)."""
        d = {
            "attack": self.attack,
            "attack_kwargs": _json_safe(self.attack_kwargs),
            "eps": [float(e) for e in self.eps],
            "accuracy": [float(a) for a in self.accuracy],
            "n_samples": self.n_samples,
            # one '0'/'1' string per eps: compact and readable
            "success": ["".join("1" if s else "0" for s in row) for row in self.success.tolist()],
            "work": _json_safe(self.work),
        }
        if per_sample_steps:
            for key in ("step", "found_at"):
                value = getattr(self, key)
                d[key] = None if value is None else value.tolist()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> RobustnessCurve:
        success = torch.tensor([[c == "1" for c in row] for row in d["success"]], dtype=torch.bool)
        success = success.view(len(d["eps"]), int(d["n_samples"]))
        extra = {key: torch.tensor(d[key], dtype=torch.long).view_as(success)
                 for key in ("step", "found_at") if d.get(key) is not None}
        return cls(eps=list(d["eps"]), accuracy=list(d["accuracy"]), success=success,
                   attack=d["attack"], attack_kwargs=dict(d.get("attack_kwargs", {})),
                   work=dict(d.get("work", {})), **extra)

    def to_json(self, path) -> None:
        """Everything, per-sample steps included, so from_json gives the curve back."""
        Path(path).write_text(json.dumps(self.to_dict(per_sample_steps=True)))

    @classmethod
    def from_json(cls, path) -> RobustnessCurve:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def plot(self, ax=None, label: str | None = None, **plot_kwargs):
        """Accuracy against eps on ``ax`` (a new figure when None); returns the axes."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots()
        plot_kwargs.setdefault("marker", "o")
        ax.plot(self.eps, self.accuracy, label=label or self.attack.upper(), **plot_kwargs)
        ax.set_xlabel("sigma" if self.attack == "noise" else "epsilon")
        ax.set_ylabel("accuracy")
        ax.set_ylim(0.0, 1.0)
        return ax


def _batches(data, batch_size: int):
    """Yield (x, y) batches from a tensor pair, a TensorDataset or a DataLoader."""
    from torch.utils.data import DataLoader, TensorDataset

    if isinstance(data, DataLoader):
        yield from data
        return
    if isinstance(data, TensorDataset):
        if len(data.tensors) < 2:
            raise ValueError("data: expected a TensorDataset of (x, y), got one tensor")
        x, y = data.tensors[0], data.tensors[1]
    elif isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = data
    else:
        raise TypeError(
            f"data: expected an (x, y) pair of tensors, a TensorDataset or a DataLoader, "
            f"got {type(data).__name__}"
        )
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError("data: expected x and y to be tensors")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"data: x has {x.shape[0]} samples but y has {y.shape[0]}")
    for i in range(0, x.shape[0], batch_size):
        yield x[i : i + batch_size], y[i : i + batch_size]


def _n_batches(data, batch_size: int) -> int | None:
    from torch.utils.data import DataLoader, TensorDataset

    if isinstance(data, DataLoader):
        try:
            return len(data)
        except TypeError:
            return None
    if isinstance(data, TensorDataset):
        return math.ceil(len(data) / batch_size)
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        return math.ceil(data[0].shape[0] / batch_size)
    return None


def robustness_curve(
    model: torch.nn.Module,
    data,
    eps,
    *,
    attack: str = "pgd",
    batch_size: int = 1000,
    progress: bool = True,
    **attack_kwargs,
) -> RobustnessCurve:
    """Accuracy of ``model`` on ``data`` under ``attack`` at every strength in ``eps``.

    Args:
        model: classifier; inputs are moved to its device.
        data: ``(x, y)`` tensors, a ``TensorDataset`` or a ``DataLoader`` yielding ``(x, y)``.
        eps: E strengths (L-inf radius; sigma for "noise"). The whole grid is attacked as one
            batch per data batch.
        attack: "pgd" (kwargs of :func:`pgd`), "fgsm" (bounds, backend, max_batch,
            final_iterate) or "noise" (bounds, generator, max_batch). PGD and FGSM count a
            sample as fooled at eps when any example they found within the eps-ball fools it
            (nested balls, any iterate: see :mod:`powerlaw_fast.attacks.pgd`);
            ``final_iterate=True`` judges each eps on its own final iterate instead, as a
            plain per-eps loop or torchattacks does.
        batch_size: samples per data batch for tensor data (a DataLoader keeps its own).
        progress: a tqdm bar over the data batches, drawn only on a terminal (not when the
            output is piped) and only for more than one batch.

    Returns: a :class:`RobustnessCurve`; ``eps = 0`` gives the clean accuracy. Labels must lie
    in ``[0, classes)`` of the model's output.

    >>> model = torch.nn.Linear(4, 3)
    >>> x, y = torch.rand(8, 4), torch.randint(0, 3, (8,))
    >>> c = robustness_curve(model, (x, y), [0.0, 0.1], attack="fgsm", progress=False)
    >>> c.success.shape
    torch.Size([2, 8])
    """
    if attack not in ATTACKS:
        raise ValueError(f"attack: expected one of {ATTACKS}, got {attack!r}")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    batch_size = check_int_range(batch_size, "batch_size", 1, 2**62)
    eps_list, _ = check_eps(eps, "sigma" if attack == "noise" else "eps")
    kwargs = dict(attack_kwargs)
    allowed = {
        "pgd": {"steps", "step_size", "random_start", "restarts", "bounds", "generator",
                "backend", "cuda_graph", "max_batch", "memory_budget", "final_iterate",
                "precision", "compact_every"},
        "fgsm": {"bounds", "backend", "max_batch", "final_iterate"},
        "noise": {"bounds", "generator", "max_batch"},
    }[attack]
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise TypeError(f"attack_kwargs: {unknown} not accepted by attack={attack!r}; "
                        f"expected some of {sorted(allowed)}")
    bounds = check_bounds(kwargs.get("bounds", (0.0, 1.0)))
    max_batch = check_max_batch(kwargs.get("max_batch"))
    final_iterate = kwargs.get("final_iterate", False)
    if not isinstance(final_iterate, bool):
        raise TypeError(f"final_iterate: expected a bool, got {type(final_iterate).__name__}")
    check_precision(kwargs.get("precision"))
    device = module_device(model)
    noise_gen = pgd_gen = None
    if attack == "pgd" and kwargs.get("random_start", False):
        # one generator across batches, so every batch gets fresh random starts
        pgd_gen = make_generator(kwargs.get("generator"), device or torch.device("cpu"))
    runners: dict = {}  # CUDA graphs captured on the first batch are replayed on the next ones
    successes, step_parts, found = [], [], []
    work = {"row_steps": 0, "row_forwards": 0, "unverified": 0}
    total = _n_batches(data, batch_size)
    # a bar only where it helps: on a terminal (disable=None: tqdm hides it when its output
    # is piped or redirected) and over more than one batch (a bar of total 1 says nothing)
    bar = tqdm(_batches(data, batch_size), total=total, desc=f"{attack} x {len(eps_list)} eps",
               disable=None if progress and (total is None or total > 1) else True)
    with eval_mode(model):
        for x, y in bar:
            if device is not None:
                x, y = x.to(device), y.to(device)
            check_inputs(x, y, bounds)
            check_labels(model, x, y)
            work["row_forwards"] += 1
            if attack == "pgd":
                if max_batch is None:  # size the chunks once, on the first batch
                    max_batch = rows_per_pass(model, x, y, kwargs.get("memory_budget"),
                                              kwargs.get("cuda_graph", True) and final_iterate)
                result, _ = run_pgd(
                    model, x, y, eps_list, steps=kwargs.get("steps", 40),
                    step_size=kwargs.get("step_size", 0.01),
                    random_start=kwargs.get("random_start", False),
                    restarts=kwargs.get("restarts", 1), bounds=bounds, generator=pgd_gen,
                    backend=kwargs.get("backend", "auto"),
                    cuda_graph=kwargs.get("cuda_graph", True), max_batch=max_batch,
                    memory_budget=None, need_adv=False, progress=False, runners=runners,
                    final_iterate=final_iterate, precision=kwargs.get("precision"),
                    compact_every=kwargs.get("compact_every"), labels_checked=True,
                )
            elif attack == "fgsm":
                backend = resolve_step_backend(kwargs.get("backend", "auto"), x.device, x.dtype)
                result = fgsm_search(model, x, y, eps_list, bounds, backend,
                                     final_iterate=final_iterate, max_batch=max_batch)
            else:
                if noise_gen is None:  # one stream across batches: batches get fresh noise
                    noise_gen = make_generator(kwargs.get("generator"), x.device)
                adv = white_noise(x, eps_list, bounds=bounds, generator=noise_gen)
                E, n = adv.shape[0], adv.shape[1]
                rows = adv.reshape(E * n, *x.shape[1:])
                success = misclassified(model, rows, y.long().repeat(E), max_batch).view(E, n)
                work["row_forwards"] += E * n
                successes.append(success.cpu())
                continue
            successes.append(result.success.cpu())
            step_parts.append(result.step.cpu())
            found.append(result.found_at.cpu())
            for key, value in result.work().items():
                work[key] += value
    if not successes:
        raise ValueError("data: expected at least one (x, y) batch, got none")
    success = torch.cat(successes, dim=1)
    accuracy = (1.0 - success.double().mean(dim=1)).tolist()
    step = torch.cat(step_parts, dim=1) if step_parts else None
    found_at = torch.cat(found, dim=1) if found else None
    return RobustnessCurve(eps=eps_list, accuracy=accuracy, success=success, attack=attack,
                           attack_kwargs=kwargs, step=step, found_at=found_at, work=work)
