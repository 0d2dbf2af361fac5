"""Training-step and eigenbasis-refresh time of the spectral regulariser (GPU).

Rows (median ms and peak memory, same device and run):

- ``train_step``: one Adam step (lr 1e-4) of the paper's MLP 784-1000-1000-1000-10 (tanh) on a
  batch of 1500 with cross-entropy, ``mode`` =
  ``vanilla`` (no penalty), ``specreg`` (:class:`powerlaw_fast.SpectralRegularizer` on all three
  hidden layers, backend "auto") and ``authors`` (a re-implementation of the per-eigenvalue loop
  of josuenassar/power_law's ``eigen_val_regulate``: covariance first, ``diag(V^T Sigma V)``,
  sort, ``kappa`` from the 0-indexed ``eigs[tau] * (tau + 1)^slope`` under no_grad, a Python loop
  over n with ``if eigs[n] > 0`` (one host synchronisation per eigenvalue), division by the
  width, V copied from the host every step). float32 rows, plus bfloat16 autocast rows for
  ``vanilla`` and ``specreg``.
- ``refresh``: :meth:`SpectralRegularizer.refresh` over the 60 000 MNIST training images (already
  on the GPU, batches of 2000) for the MLP (3 layers of 1000) and the CNN (2704, 800, 1000).
  Real MNIST when found (``--data``, default ``../shared/data/mnist`` next to the repository),
  otherwise uniform random images of the same shape (the JSON's ``data`` field says which).

Writes ``benchmarks/results/<gpu name>/training.json`` and prints a table::

    python benchmarks/bench_training.py            # GPU
    python benchmarks/bench_training.py --smoke    # tiny CPU run, writes nothing
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch
from torch import nn

from powerlaw_fast.models import CNN, MLP
from powerlaw_fast.regularizer import SpectralRegularizer

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "mnist"


# --------------------------------------------------------------------------------------------
# The authors' per-eigenvalue loop, re-implemented from its description (not their code)


def authors_layer_penalty(x, V_host, *, tau=10, slope=1.0, beta=1.0):
    """josuenassar/power_law's eigen_val_regulate: tau 0-indexed, skip eigs <= 0, / width."""
    device = x.device
    v = V_host.to(device)  # their eigenvectors live on the host and are copied every step
    width = x.shape[1]
    xt = x - torch.mean(x, 0)
    cov = xt.transpose(1, 0) @ xt / (x.shape[0] - 1)
    cov = (cov + cov.transpose(1, 0)) / 2
    eig = torch.diag(v.transpose(1, 0) @ cov @ v)
    eigs = torch.sort(eig, descending=True)[0]
    with torch.no_grad():
        kappa = eigs[tau] * (tau + 1) ** slope
    regul = torch.zeros(1, device=device)
    for n in range(tau, width):
        if eigs[n] > 0:  # one device-to-host synchronisation per eigenvalue
            gamma = kappa * (n + 1) ** -slope
            ratio = eigs[n] / gamma
            regul = regul + (ratio - 1) ** 2 + torch.relu(ratio - 1)
    return beta * regul / width


class _HiddenCapture:
    """Forward hooks that keep the latest hidden outputs (for the authors' baseline)."""

    def __init__(self, modules):
        self.outputs = {}
        self.handles = [
            m.register_forward_hook(lambda mod, a, out, k=k: self.outputs.__setitem__(k, out))
            for k, m in modules.items()
        ]

    def remove(self):
        for h in self.handles:
            h.remove()


# --------------------------------------------------------------------------------------------
# Timing


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(fn, device, *, warmup: int, repeats: int) -> float:
    if device.type == "cuda" and repeats > 3:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup, rep=max(repeats, 1) * 10,
                                             return_mode="median"))
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _peak_mem_mb(fn, device) -> float | None:
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    _sync(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


# --------------------------------------------------------------------------------------------
# Benchmarks


def _load_images(args, device, count):
    if args.smoke:
        images = torch.rand(count, 1, 28, 28, device=device)
        return images, torch.randint(0, 10, (count,), device=device), "random (smoke)"
    try:
        from powerlaw_fast.datasets import load_mnist

        images, labels = load_mnist(args.data, train=True)
        return images.to(device), labels.to(device), f"MNIST train ({args.data})"
    except (FileNotFoundError, ValueError, ImportError) as err:
        print(f"MNIST not available ({err}); using random images of the same shape")
        g = torch.Generator().manual_seed(0)
        images = torch.rand(count, 1, 28, 28, generator=g)
        labels = torch.randint(0, 10, (count,), generator=g)
        return images.to(device), labels.to(device), "random uniform [60000, 1, 28, 28]"


def _make_step(model, optimiser, x, y, dtype, reg, capture, V_host):
    """One training step: forward, cross-entropy (+ penalty), backward, Adam."""
    autocast = dtype != torch.float32

    def step():
        with torch.autocast(x.device.type, dtype=dtype, enabled=autocast):
            loss = nn.functional.cross_entropy(model(x), y)
            if reg is not None:
                loss = loss + reg.penalty()
            elif capture is not None:
                for name, V in V_host.items():
                    loss = loss + authors_layer_penalty(capture.outputs[name], V)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()

    return step


def bench_train_steps(args, device, images, labels):
    widths = (64, 64, 64) if args.smoke else (1000, 1000, 1000)
    B = 96 if args.smoke else 1500
    rows = []
    names = ["hidden1", "hidden2", "hidden3"]
    x, y = images[:B], labels[:B]
    precision = torch.get_float32_matmul_precision()
    cases = [("vanilla", torch.float32), ("specreg", torch.float32), ("authors", torch.float32)]
    if device.type == "cuda":
        cases += [("vanilla", torch.bfloat16), ("specreg", torch.bfloat16)]
    for mode, dtype in cases:
        torch.manual_seed(0)
        model = MLP(widths=widths, activation="tanh").to(device)
        model.train()
        optimiser = torch.optim.Adam(model.parameters(), lr=1e-4)
        reg = capture = V_host = None
        hidden = model.hidden_layers()
        if mode == "specreg":
            reg = SpectralRegularizer(model, names, tau=10, beta=1.0, progress=False)
            reg.refresh(images[: 4 * B], batch_size=2000)
            impl = "powerlaw_fast.SpectralRegularizer"
        elif mode == "authors":
            seed_reg = SpectralRegularizer(model, names, tau=10, progress=False)
            seed_reg.refresh(images[: 4 * B], batch_size=2000)
            V_host = {n: seed_reg.basis(n).cpu() for n in names}
            seed_reg.remove()
            capture = _HiddenCapture(hidden)
            impl = "authors' per-eigenvalue loop (re-implemented)"
        else:
            impl = "no penalty"
        step = _make_step(model, optimiser, x, y, dtype, reg, capture, V_host if capture else None)
        warmup, repeats = (1, 3) if mode == "authors" or args.smoke else (5, 50)
        ms = _median_ms(step, device, warmup=warmup, repeats=repeats)
        peak = _peak_mem_mb(step, device)
        rows.append({
            "op": "train_step", "mode": mode, "B": B, "N": widths[0],
            "dtype": str(dtype).replace("torch.", ""), "precision": precision, "impl": impl,
            "median_ms": ms, "peak_mem_mb": peak,
        })
        if reg is not None:
            reg.remove()
        if capture is not None:
            capture.remove()
    return rows


def bench_refresh(args, device, images):
    rows = []
    count = images.shape[0]
    models = {
        "mlp": (MLP(widths=(64, 64, 64) if args.smoke else (1000, 1000, 1000)), None),
        "cnn": (CNN(fc_width=64 if args.smoke else 1000), None),
    }
    batch = 100 if args.smoke else 2000
    for label, (model, _) in models.items():
        model = model.to(device)
        names = list(model.hidden_layers())
        widths = list(model.hidden_widths().values())
        reg = SpectralRegularizer(model, names, tau=10, progress=False)

        def refresh(reg=reg):
            reg.refresh(images, batch_size=batch)

        warmup, repeats = (0, 1) if args.smoke else (1, 3)
        ms = _median_ms(refresh, device, warmup=warmup, repeats=repeats)
        peak = _peak_mem_mb(refresh, device)
        rows.append({
            "op": "refresh", "mode": label, "B": count, "N": max(widths), "widths": widths,
            "dtype": "float32", "precision": "float64 accumulation + float64 eigh",
            "impl": f"SpectralRegularizer.refresh (batches of {batch})",
            "median_ms": ms, "peak_mem_mb": peak,
        })
        reg.remove()
    return rows


def _print_table(rows):
    header = (f"{'op':<11}{'mode':<9}{'B':>7}{'N':>6}  {'dtype':<9}{'median ms':>11}"
              f"{'peak MB':>10}  impl")
    print(header)
    print("-" * len(header))
    vanilla = {r["dtype"]: r["median_ms"] for r in rows if r["mode"] == "vanilla"}
    for r in rows:
        peak = "-" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.0f}"
        extra = ""
        if r["op"] == "train_step" and r["mode"] != "vanilla" and r["dtype"] in vanilla:
            extra = f"  ({r['median_ms'] / vanilla[r['dtype']]:.2f}x vanilla)"
        print(f"{r['op']:<11}{r['mode']:<9}{r['B']:>7}{r['N']:>6}  {r['dtype']:<9}"
              f"{r['median_ms']:>11.3f}{peak:>10}  {r['impl']}{extra}")


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run, writes nothing")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="MNIST root folder")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default: benchmarks/results/<gpu>/training.json)")
    args = parser.parse_args(argv)

    if args.smoke:
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        raise SystemExit("bench_training.py needs a CUDA GPU (use --smoke for a CPU check)")
    else:
        device = torch.device("cuda")
    count = 600 if args.smoke else 60000
    images, labels, data_note = _load_images(args, device, count)
    print(f"data: {data_note}")
    rows = bench_train_steps(args, device, images, labels) + bench_refresh(args, device, images)
    _print_table(rows)
    if args.smoke:
        return

    import triton

    gpu = torch.cuda.get_device_name(device)
    out = args.out or REPO / "benchmarks" / "results" / gpu.replace(" ", "_") / "training.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "device": gpu, "torch": torch.__version__, "triton": triton.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": _commit(), "data": data_note, "rows": rows,
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
