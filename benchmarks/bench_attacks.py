"""Robustness sweeps (PGD-40 and FGSM over an 11-point epsilon grid) on MNIST test images, with
the paper's MLP and CNN trained briefly: this library against a plain per-epsilon loop and
torchattacks, on a GPU (10,000 images) or the CPU (1,000 images, 2 threads).

    python benchmarks/bench_attacks.py                        # GPU if present, writes JSON
    python benchmarks/bench_attacks.py --device cpu --data /path/to/mnist   # the CPU rows
    python benchmarks/bench_attacks.py --models mlp --attacks pgd
    python benchmarks/bench_attacks.py --smoke                # tiny CPU run, no file
    python benchmarks/bench_attacks.py --dry-run --out DIR    # tiny CPU run on the Triton step
                                                              # (interpreter), writes the JSON

Implementations (one row each, per model and attack):
- ``ours``: ``robustness_curve`` as shipped: any-iterate success, fooled rows retired, nested
  epsilon balls, eps = 0 one forward (PGD); one gradient and nested verdicts (FGSM).
- ``ours_final``: ``final_iterate=True``, each epsilon judged on its own final iterate (the
  rule of the two baselines); PGD runs the whole grid as one batch, in a CUDA graph on a GPU.
- ``ours_bf16`` / ``ours_tf32`` (PGD): the default with reduced-precision gradients (bf16
  autocast; TF32 on a GPU only), every success confirmed by an fp32 forward.
- ``plain_loop``: what a user writes: for each epsilon, PGD (or FGSM) on the data in batches,
  with ``torch.autograd.grad`` w.r.t. the input and out-of-place torch ops.
- ``torchattacks``: ``torchattacks.PGD`` / ``FGSM`` looped over epsilon (skipped with a note when
  torchattacks is not installed).

Models: the paper's MLP (784-1000-1000-1000-10) and CNN (conv16 3x3, pool, conv32 3x3, pool,
fc1000, fc10), tanh, trained from ``torch.manual_seed(seed)`` for ``--epochs`` epochs of Adam
(lr 1e-3, batch 100) on the first ``--train-n`` training images: briefly, but enough that the
attacks meet a real classifier (success rates are what the savings depend on). Each row gives
the median of ``--repeats`` full sweeps (attack + accuracy at every epsilon) after one warm-up,
the accuracy per epsilon, and the work done: ``row_steps`` (rows through a forward +
input-gradient pass) and ``row_forwards`` (rows through a forward pass alone).
Writes ``benchmarks/results/<device>/attacks.json`` after every implementation's sweep
(``"complete": false`` until the end), so a run cut off by its time budget keeps what it measured.
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
    interpreter_for_dry_run,
    print_table,
    triton_compile_counts,
    write_results,
)

interpreter_for_dry_run(sys.argv)
from powerlaw_fast.attacks import robustness_curve  # noqa: E402
from powerlaw_fast.paper.datasets import load_mnist  # noqa: E402
from powerlaw_fast.paper.models import CNN, MLP  # noqa: E402

EPS_GRID = [round(0.03 * i, 2) for i in range(11)]  # 0, 0.03, ..., 0.3
PGD_STEP = 0.01
TRAIN_LR, TRAIN_BATCH = 1e-3, 100


# ----------------------------------------------------------------------------- data and models
def load_test_set(data_dir: str | None, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n MNIST test images [n, 1, 28, 28] in [0, 1] and labels [n], from ``--data``
    or ``$POWERLAW_FAST_DATA`` (torchvision's layout); the shipped subset has only 1000."""
    return load_mnist(data_dir, train=False, limit=n)


def build_model(name: str, seed: int) -> nn.Module:
    """The paper's MLP or CNN with seeded initial weights."""
    torch.manual_seed(seed)
    return MLP() if name == "mlp" else CNN()


def train_model(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int,
                seed: int) -> float:
    """Adam (lr 1e-3) on batches of 100, seeded shuffles; returns the seconds it took."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=TRAIN_LR)
    model.train()
    t0 = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(x.shape[0], generator=g).to(x.device)
        for i in range(0, x.shape[0], TRAIN_BATCH):
            idx = order[i : i + TRAIN_BATCH]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    if x.is_cuda:
        torch.cuda.synchronize()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)  # the attacks only need input gradients
    return time.perf_counter() - t0


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


def make_sweeps(model, x, y, attack, steps, batch, backend, max_batch, bf16_on_cpu=False):
    """name -> function returning (accuracy at every epsilon, work dict); and a note or None.

    bf16 autocast on a CPU without bf16 matrix units is slower than fp32 (smoke run on the
    2-core development machine: 4.9x slower), so the CPU gets that row only on request."""
    n, E = x.shape[0], len(EPS_GRID)
    common = dict(attack=attack, batch_size=n, progress=False, backend=backend,
                  max_batch=max_batch)
    if attack == "pgd":
        common.update(steps=steps, step_size=PGD_STEP)

    def ours(**kw):
        def sweep():
            c = robustness_curve(model, (x, y), EPS_GRID, **common, **kw)
            return c.accuracy, c.work
        return sweep

    sweeps = {"ours": ours()}
    if attack == "pgd":
        sweeps["ours_final"] = ours(final_iterate=True, cuda_graph=True)
        if x.is_cuda or bf16_on_cpu:
            sweeps["ours_bf16"] = ours(precision="bf16")
        if x.is_cuda:
            sweeps["ours_tf32"] = ours(precision="tf32")
            if cuda_backend_available():
                sweeps["ours_cuda"] = ours(backend="cuda")
    else:
        sweeps["ours_final"] = ours(final_iterate=True)
    # the loops attack every epsilon, eps = 0 included, then classify every result
    loop_work = {"row_steps": E * n * (steps if attack == "pgd" else 1), "row_forwards": E * n}

    def plain():
        attack_fn = (lambda e: plain_pgd(model, x, y, e, steps, batch)) if attack == "pgd" \
            else (lambda e: plain_fgsm(model, x, y, e, batch))
        return [_accuracy(model, attack_fn(e), y, batch) for e in EPS_GRID], loop_work

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
        return accs, loop_work

    sweeps["torchattacks"] = theirs
    return sweeps, None


def time_median_ms(fn, repeats: int, warmup: int = 1) -> tuple[float, object]:
    """Median of ``repeats`` runs after ``warmup`` runs; CUDA events on a GPU."""
    for _ in range(warmup):
        fn()
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
def run(args, on_progress=None) -> tuple[list[dict], dict]:
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(args.threads)
    torch.set_float32_matmul_precision(args.precision)
    x, y = load_test_set(args.data, args.n)
    x, y = x.to(device), y.to(device)
    x_train, y_train = load_mnist(args.data, train=True, limit=args.train_n)
    x_train, y_train = x_train.to(device), y_train.to(device)
    # a dry run takes the Triton step on the CPU too (the interpreter)
    backend = "triton" if device == "cuda" or args.dry_run else "torch"
    rows, training = [], {}
    for model_name in args.models:
        model = build_model(model_name, args.seed).to(device)
        seconds = train_model(model, x_train, y_train, args.epochs, args.seed)
        clean = _accuracy(model, x, y, args.batch)
        training[model_name] = {"train_images": x_train.shape[0], "epochs": args.epochs,
                                "optimizer": f"Adam lr {TRAIN_LR}", "batch": TRAIN_BATCH,
                                "seconds": round(seconds, 1), "test_accuracy": clean}
        print(f"{model_name}: trained on {x_train.shape[0]} images x {args.epochs} epoch(s) in "
              f"{seconds:.1f} s, clean accuracy on the {x.shape[0]} test images {clean:.4f}",
              flush=True)
        for attack in args.attacks:
            sweeps, note = make_sweeps(model, x, y, attack, args.steps, args.batch, backend,
                                       args.max_batch, bf16_on_cpu=args.bf16_on_cpu)
            if args.impls:
                sweeps = {k: v for k, v in sweeps.items() if k in args.impls}
            results = {}
            if args.interleave:
                # on a shared machine the load drifts over minutes: alternating the
                # implementations gives each the same mix of quiet and busy moments
                times = {impl: [] for impl in sweeps}
                for _ in range(args.repeats):
                    for impl, fn in sweeps.items():
                        ms, out = time_median_ms(fn, 1, args.warmup)
                        times[impl].append(ms)
                        results[impl] = (statistics.median(times[impl]), *out)
                        print(f"{model_name} {attack} {impl}: {ms:.1f} ms", flush=True)
                        if on_progress is not None:
                            on_progress(rows + _rows_for(args, x, device, model_name, attack,
                                                         results, None), training)
            else:
                for impl, fn in sweeps.items():
                    ms, (acc, work) = time_median_ms(fn, args.repeats, args.warmup)
                    results[impl] = (ms, acc, work)
                    print(f"{model_name} {attack} {impl}: {ms:.1f} ms, row_steps "
                          f"{work['row_steps']}, accuracy {[round(a, 4) for a in acc]}",
                          flush=True)
                    if on_progress is not None:  # each sweep kept as soon as it is timed
                        on_progress(rows + _rows_for(args, x, device, model_name, attack,
                                                     results, None), training)
            rows += _rows_for(args, x, device, model_name, attack, results, note)
            if on_progress is not None:  # a long CPU run keeps what it measured so far
                on_progress(rows, training)
    return rows, training


def _rows_for(args, x, device, model_name, attack, results, note) -> list[dict]:
    """One row per timed implementation of (model, attack), with its ratios to the baselines
    timed so far; a note row where a baseline was skipped."""
    rows = []
    base = results.get("plain_loop")
    ta = results.get("torchattacks")
    for impl, (ms, acc, work) in results.items():
        row = {
            "model": model_name, "attack": attack, "impl": impl, "n": x.shape[0],
            "eps": EPS_GRID, "steps": args.steps if attack == "pgd" else 1,
            "step_size": PGD_STEP if attack == "pgd" else None,
            "dtype": "float32", "matmul_precision": args.precision,
            "threads": torch.get_num_threads() if device == "cpu" else None,
            "median_ms": ms, "accuracy": acc, "row_steps": work["row_steps"],
            "row_forwards": work["row_forwards"],
        }
        if base is not None:
            row["speedup_vs_plain_loop"] = base[0] / ms
            row["max_acc_diff_pp_vs_plain_loop"] = 100 * max(
                abs(a - b) for a, b in zip(acc, base[1], strict=True))
        if ta is not None:
            row["speedup_vs_torchattacks"] = ta[0] / ms
            # signed: > 0 where ours is weaker (higher robust accuracy) than torchattacks
            row["max_acc_excess_pp_vs_torchattacks"] = 100 * max(
                a - b for a, b in zip(acc, ta[1], strict=True))
        rows.append(row)
    if note:
        rows.append({"model": model_name, "attack": attack, "impl": "torchattacks",
                     "note": note})
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--data", default=None, help="MNIST folder in torchvision's layout "
                   "(default: $POWERLAW_FAST_DATA, else the shipped 6000/1000-image subset)")
    p.add_argument("--n", type=int, default=None,
                   help="test images (default 10000 on a GPU, 1000 on the CPU)")
    p.add_argument("--train-n", type=int, default=10000, help="training images")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--threads", type=int, default=2, help="torch threads on the CPU")
    p.add_argument("--models", type=lambda s: s.split(","), default=["mlp", "cnn"])
    p.add_argument("--attacks", type=lambda s: s.split(","), default=["pgd", "fgsm"])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=10000, help="batch of the looped baselines")
    p.add_argument("--max-batch", type=int, default=None,
                   help="rows per forward pass for ours (default: sized to half the free memory)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed sweeps before timing (default 1 on a GPU, 0 on the CPU, where "
                        "one sweep takes seconds and has nothing to compile or capture)")
    p.add_argument("--impls", type=lambda s: s.split(","), default=None,
                   help="only these implementations (default: all)")
    p.add_argument("--interleave", action="store_true",
                   help="alternate the implementations repeat by repeat (shared machines)")
    p.add_argument("--bf16-on-cpu", action="store_true",
                   help="add the ours_bf16 PGD row on the CPU as well")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", default="highest", choices=["highest", "high", "medium"])
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run, writes no file")
    p.add_argument("--dry-run", action="store_true",
                   help="a smoke run on the Triton step (the interpreter on a CPU) that writes "
                        "the results file like a full run")
    args = p.parse_args(argv)
    if args.dry_run and args.out is None:  # never over the committed results
        p.error("--dry-run needs --out DIR")
    if args.n is None:
        on_gpu = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
        args.n = 10000 if on_gpu else 1000
    if args.warmup is None:
        on_gpu = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
        args.warmup = 1 if on_gpu else 0
    if args.smoke or args.dry_run:
        args.device = "cpu"
        args.n, args.steps, args.repeats = min(args.n, 32), min(args.steps, 2), 1
        args.train_n = min(args.train_n, 200)
    return args


def _extra(args, training) -> dict:
    return {"weights": f"trained from torch.manual_seed({args.seed}), tanh: "
                       + "; ".join(f"{m}: {t}" for m, t in training.items()),
            "training": training,
            "data": f"MNIST ({args.data or 'POWERLAW_FAST_DATA or the shipped subset'}): "
                    f"first {args.n} test images, first {args.train_n} training images",
            "threads": torch.get_num_threads(), "repeats": args.repeats,
            "warmup": args.warmup, "interleaved": args.interleave, "dry_run": args.dry_run,
            "triton_compiles": triton_compile_counts()}


def main(argv=None) -> None:
    args = parse_args(argv)
    write = None
    if not (args.smoke and args.out is None):
        def write(rows, training):
            write_results("attacks", rows, args.out,
                          extra={**_extra(args, training), "complete": False})
    rows, training = run(args, on_progress=write)
    print_table([r for r in rows if "median_ms" in r],
                ["model", "attack", "impl", "median_ms", "speedup_vs_torchattacks",
                 "max_acc_excess_pp_vs_torchattacks", "row_steps", "speedup_vs_plain_loop"])
    for r in rows:
        if "note" in r:
            print(f"{r['model']} {r['attack']} {r['impl']}: {r['note']}")
    if args.smoke and args.out is None:
        print("smoke run: no results file written")
        return
    path = write_results("attacks", rows, args.out, extra={**_extra(args, training),
                                                           "complete": True})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
