"""Robustness sweeps (PGD-40 and FGSM over an 11-point epsilon grid) on the 10,000 MNIST test
images, on a GPU: this library against a plain per-epsilon loop and torchattacks.

    python benchmarks/bench_attacks.py                  # full run, writes results JSON
    python benchmarks/bench_attacks.py --models mlp --attacks pgd
    python benchmarks/bench_attacks.py --smoke          # tiny CPU run, no file

Implementations (one row each, per model and attack):
- ``ours_graph``: ``robustness_curve`` with the Triton step kernel and the step loop in a CUDA
  graph; the whole grid is one batched stream of rows (E x n).
- ``ours_eager``: the same without the CUDA graph.
- ``plain_loop``: what a user writes: for each epsilon, PGD (or FGSM) on the data in batches,
  with ``torch.autograd.grad`` w.r.t. the input and out-of-place torch ops.
- ``torchattacks``: ``torchattacks.PGD`` / ``FGSM`` looped over epsilon (skipped with a note when
  torchattacks is not installed).

Models: the paper's MLP (784-1000-1000-1000-10) and CNN (conv16 3x3, pool, conv32 3x3, pool,
fc1000, fc10), tanh, with random weights from ``torch.manual_seed(seed)`` (the robust accuracy
of random weights is not meaningful as a result; it is reported to show that every
implementation computes the same thing). Each time is the median of ``--repeats`` full sweeps
(attack + accuracy at every epsilon), timed with CUDA events after one warm-up sweep.
Writes ``benchmarks/results/<gpu-name>/attacks.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (  # noqa: E402
    cuda_backend_available,
    print_table,
    write_results,
)
from powerlaw_fast.attacks import robustness_curve  # noqa: E402
from powerlaw_fast.datasets import load_mnist  # noqa: E402
from powerlaw_fast.models import CNN, MLP  # noqa: E402

EPS_GRID = [round(0.03 * i, 2) for i in range(11)]  # 0, 0.03, ..., 0.3
PGD_STEP = 0.01


# ----------------------------------------------------------------------------- data and models
def load_test_set(data_dir: str | None, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n MNIST test images [n, 1, 28, 28] in [0, 1] and labels [n], from ``--data``
    or ``$POWERLAW_FAST_DATA`` (torchvision's layout); the shipped subset has only 1000."""
    return load_mnist(data_dir, train=False, limit=n)


def build_model(name: str, seed: int) -> nn.Module:
    """The paper's MLP or CNN with seeded random weights (the benchmark times the attack)."""
    torch.manual_seed(seed)
    return MLP() if name == "mlp" else CNN()


# ----------------------------------------------------------------------------- implementations
def _accuracy(model, x, y, batch) -> float:
    correct = 0
    with torch.no_grad():
        for i in range(0, x.shape[0], batch):
            correct += (model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum().item()
    return correct / x.shape[0]


def plain_pgd(model, x, y, eps, steps, batch):
    out = []
    for i in range(0, x.shape[0], batch):
        xb, yb = x[i : i + batch], y[i : i + batch]
        x_adv = xb.clone()
        for _ in range(steps):
            x_adv.requires_grad_(True)
            loss = F.cross_entropy(model(x_adv), yb)
            (g,) = torch.autograd.grad(loss, x_adv)
            x_adv = x_adv.detach() + PGD_STEP * g.sign()
            x_adv = torch.min(torch.max(x_adv, xb - eps), xb + eps).clamp(0.0, 1.0)
        out.append(x_adv)
    return torch.cat(out)


def plain_fgsm(model, x, y, eps, batch):
    out = []
    for i in range(0, x.shape[0], batch):
        xb = x[i : i + batch].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(xb), y[i : i + batch]), xb)
        out.append((xb.detach() + eps * g.sign()).clamp(0.0, 1.0))
    return torch.cat(out)


def make_sweeps(model, x, y, attack, steps, batch, backend, max_batch):
    """name -> function returning the accuracy at every epsilon."""
    common = dict(attack=attack, batch_size=x.shape[0], progress=False, backend=backend,
                  max_batch=max_batch)
    if attack == "pgd":
        common.update(steps=steps, step_size=PGD_STEP)

    def ours(cuda_graph):
        kw = dict(common, cuda_graph=cuda_graph) if attack == "pgd" else common
        return lambda: robustness_curve(model, (x, y), EPS_GRID, **kw).accuracy

    def plain():
        attack_fn = (lambda e: plain_pgd(model, x, y, e, steps, batch)) if attack == "pgd" \
            else (lambda e: plain_fgsm(model, x, y, e, batch))
        return [_accuracy(model, attack_fn(e), y, batch) for e in EPS_GRID]

    sweeps = {"ours_graph": ours(True)} if attack == "pgd" and x.is_cuda else {}
    sweeps["ours_eager" if attack == "pgd" else "ours"] = ours(False)
    if x.is_cuda and cuda_backend_available():
        cuda_common = dict(common, backend="cuda")
        if attack == "pgd":
            cuda_common["cuda_graph"] = True
        sweeps["ours_cuda"] = lambda: robustness_curve(model, (x, y), EPS_GRID,
                                                       **cuda_common).accuracy
    sweeps["plain_loop"] = plain
    try:
        import torchattacks
    except ImportError:
        return sweeps, "torchattacks not installed: skipped"

    def theirs():
        accs = []
        for e in EPS_GRID:
            atk = (torchattacks.PGD(model, eps=e, alpha=PGD_STEP, steps=steps, random_start=False)
                   if attack == "pgd" else torchattacks.FGSM(model, eps=e))
            adv = torch.cat([atk(x[i : i + batch], y[i : i + batch])
                             for i in range(0, x.shape[0], batch)])
            accs.append(_accuracy(model, adv, y, batch))
        return accs

    sweeps["torchattacks"] = theirs
    return sweeps, None


def time_median_ms(fn, repeats: int) -> tuple[float, object]:
    """Median of ``repeats`` runs after one warm-up; CUDA events on a GPU."""
    result = fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            result = fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), result


# ----------------------------------------------------------------------------- main
def run(args) -> list[dict]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.smoke:
        raise SystemExit("bench_attacks: needs a CUDA device (or --smoke for a tiny CPU run)")
    torch.set_float32_matmul_precision(args.precision)
    x, y = load_test_set(args.data, args.n)
    x, y = x.to(device), y.to(device)
    backend = "triton" if device == "cuda" else "torch"
    rows = []
    for model_name in args.models:
        model = build_model(model_name, args.seed).to(device).eval()
        for attack in args.attacks:
            sweeps, note = make_sweeps(model, x, y, attack, args.steps, args.batch, backend,
                                       args.max_batch)
            results = {}
            for impl, fn in sweeps.items():
                ms, acc = time_median_ms(fn, args.repeats)
                results[impl] = (ms, acc)
                print(f"{model_name} {attack} {impl}: {ms:.1f} ms", flush=True)
            base_ms, base_acc = results["plain_loop"]
            for impl, (ms, acc) in results.items():
                rows.append({
                    "model": model_name, "attack": attack, "impl": impl, "n": x.shape[0],
                    "eps": EPS_GRID, "steps": args.steps if attack == "pgd" else 1,
                    "step_size": PGD_STEP if attack == "pgd" else None,
                    "dtype": "float32", "matmul_precision": args.precision,
                    "median_ms": ms, "speedup_vs_plain_loop": base_ms / ms,
                    "accuracy": acc,
                    "max_acc_diff_pp_vs_plain_loop": 100 * max(
                        abs(a - b) for a, b in zip(acc, base_acc, strict=True)),
                })
            if note:
                rows.append({"model": model_name, "attack": attack, "impl": "torchattacks",
                             "note": note})
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=None, help="MNIST folder in torchvision's layout "
                   "(default: $POWERLAW_FAST_DATA, else the shipped 1000-image test subset)")
    p.add_argument("--n", type=int, default=10000, help="test images")
    p.add_argument("--models", type=lambda s: s.split(","), default=["mlp", "cnn"])
    p.add_argument("--attacks", type=lambda s: s.split(","), default=["pgd", "fgsm"])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=10000, help="batch of the looped baselines")
    p.add_argument("--max-batch", type=int, default=None,
                   help="rows per forward pass for ours (default: sized to half the free memory)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", default="highest", choices=["highest", "high", "medium"])
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run, writes no file")
    args = p.parse_args(argv)
    if args.smoke:
        args.n, args.steps, args.repeats = min(args.n, 32), min(args.steps, 2), 1
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    rows = run(args)
    print_table([r for r in rows if "median_ms" in r],
                ["model", "attack", "impl", "median_ms", "speedup_vs_plain_loop",
                 "max_acc_diff_pp_vs_plain_loop"])
    for r in rows:
        if "note" in r:
            print(f"{r['model']} {r['attack']} {r['impl']}: {r['note']}")
    if args.smoke and args.out is None:
        print("smoke run: no results file written")
        return
    extra = {"weights": f"random: torch.manual_seed({args.seed}) then default init, tanh",
             "data": "MNIST test set, first n images"}
    path = write_results("attacks", rows, args.out, extra=extra)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
