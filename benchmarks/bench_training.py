"""Training-step and eigenbasis-refresh time of the spectral regulariser (GPU).

Rows (median ms and peak memory, same device and run):

- ``train_step``: one Adam step (lr 1e-4) with cross-entropy of ``model`` = ``mlp`` (the paper's
  784-1000-1000-1000-10 tanh, B = 1500), ``cnn`` (the paper's CNN, B = 1500) or ``wide_mlp``
  (3 x 4096, B = 6144); ``mode`` = ``vanilla`` (no penalty), ``specreg``
  (:class:`powerlaw_fast.SpectralRegularizer` on every hidden layer, backend "auto", with
  ``penalty_dtype`` "model" or "bfloat16") and, for the MLP, ``authors``
  (:func:`powerlaw_fast.baselines.authors_loop_penalty` on each hidden layer, the per-eigenvalue
  loop of josuenassar/power_law's ``eigen_val_regulate``: covariance first, 0-indexed tau = 10,
  one host synchronisation per eigenvalue, V copied from the host every step); ``dtype``
  float32 or bfloat16 autocast; ``execution`` ``eager`` or ``graphed`` (the whole step captured
  in one CUDA graph and replayed); ``x_vanilla``: the time over vanilla's in the same model,
  dtype and execution.
- ``refresh``: :meth:`SpectralRegularizer.refresh` over the 60 000 MNIST training images (already
  on the GPU, batches of 2000) for the MLP (3 layers of 1000) and the CNN (2704, 800, 1000).
  Real MNIST from ``--data`` or ``$POWERLAW_FAST_DATA`` (torchvision's layout); when neither is
  given, uniform random images of the same shape (the JSON's ``data`` field says which).

``peak_mem_mb`` is the device memory a call needs beyond what is allocated before it (model,
optimiser state and data excluded). Writes ``benchmarks/results/<gpu name>/training.json`` after
every row (``"complete": false`` until the end: a run cut off by its time budget keeps what it
measured) and prints a table. Order: the MLP's steps, its refresh, the CNN's steps, its
refresh, then the wide MLP (the most compiles) last::

    python benchmarks/bench_training.py --data /path/to/mnist   # GPU
    python benchmarks/bench_training.py --smoke                 # tiny CPU run, writes nothing
    python benchmarks/bench_training.py --dry-run --out DIR     # tiny CPU run of the MLP rows
                                                                # on the Triton path (interpreter)
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (  # noqa: E402
    ResultsWriter,
    interpreter_for_dry_run,
    median_ms,
    peak_memory_mb,
    print_table,
)

interpreter_for_dry_run(sys.argv)

from powerlaw_fast.baselines import authors_loop_penalty  # noqa: E402
from powerlaw_fast.paper.datasets import ENV_VAR, load_mnist  # noqa: E402
from powerlaw_fast.paper.models import CNN, MLP  # noqa: E402
from powerlaw_fast.training.regulariser import SpectralRegularizer  # noqa: E402

AUTHORS_TAU = 10  # the authors' default, 0-indexed: anchors on the 11th largest eigenvalue
SLOPE = 1.0
BETA = 1.0


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
# Benchmarks


def _timing(args, slow: bool) -> dict:
    """median_ms's warm-up and timing budget (ms): a few calls in a smoke run; on the GPU ~3 s
    for the slow cases (the authors' loop, a full refresh) so that they get several calls."""
    if args.smoke or args.dry_run:
        return {"warmup": 1, "rep": 1}
    return {"warmup": 1, "rep": 2000} if slow else {"warmup": 5, "rep": 300}


def _load_images(args, device, count):
    if args.smoke or args.dry_run:
        images = torch.rand(count, 1, 28, 28, device=device)
        label = "random (dry run)" if args.dry_run else "random (smoke)"
        return images, torch.randint(0, 10, (count,), device=device), label
    if args.data is not None or os.environ.get(ENV_VAR):
        images, labels = load_mnist(args.data, train=True)
        source = args.data if args.data is not None else f"${ENV_VAR}"
        return images.to(device), labels.to(device), f"MNIST train ({source})"
    print(f"no --data and no ${ENV_VAR}: using random images of MNIST's shape")
    g = torch.Generator().manual_seed(0)
    images = torch.rand(count, 1, 28, 28, generator=g)
    labels = torch.randint(0, 10, (count,), generator=g)
    return images.to(device), labels.to(device), f"random uniform [{count}, 1, 28, 28]"


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
                    # their eigenvectors live on the host and are copied every step
                    loss = loss + authors_loop_penalty(
                        capture.outputs[name], V.to(x.device), tau=AUTHORS_TAU, alpha=SLOPE,
                        beta=BETA,
                    )
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()

    return step


def _graphed(step, optimiser):
    """The whole step captured once in a CUDA graph (torch's whole-network recipe: warm-up on
    a side stream, grads set to None before the capture, Adam(capturable=True)); returns the
    replay. A refresh outside the graph updates V in place, so the graph stays valid."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    optimiser.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        step()
    return graph.replay


# (model label, regularised layers' widths for the label, batch): the paper's MLP and CNN, and a
# wide MLP where the penalty's GEMMs dominate
MODELS = {
    "mlp": (lambda: MLP(widths=(1000, 1000, 1000), activation="tanh"), 1500),
    "cnn": (lambda: CNN(activation="tanh"), 1500),
    "wide_mlp": (lambda: MLP(widths=(4096, 4096, 4096), activation="tanh"), 6144),
}


def bench_train_steps(args, device, images, labels, models=None, on_row=None):
    """Step rows for each model: every execution, dtype and mode, then the authors' loop
    (MLP only); ``on_row(row)`` after each."""
    rows = []
    precision = torch.get_float32_matmul_precision()
    if models is None:
        models = {"mlp": (lambda: MLP(widths=(64, 64, 64), activation="tanh"), 96)} \
            if args.smoke or args.dry_run else MODELS  # fmt: skip
    executions = ["eager", "graphed"] if device.type == "cuda" else ["eager"]
    for label, (make_model, B) in models.items():
        x, y = images[:B], labels[:B]
        cases = [("vanilla", None), ("specreg", None), ("specreg", torch.bfloat16)]
        dtypes = [torch.float32] + ([torch.bfloat16] if device.type == "cuda" else [])
        for execution in executions:
            for dtype in dtypes:
                for mode, penalty_dtype in cases:
                    rows.append(_train_row(args, device, label, make_model, images, x, y, dtype,
                                           mode, penalty_dtype, execution, precision))  # fmt: skip
                    if on_row is not None:
                        on_row(rows[-1])
        if label == "mlp":
            rows.append(_train_row(args, device, label, make_model, images, x, y, torch.float32,
                                   "authors", None, "eager", precision))  # fmt: skip
            if on_row is not None:
                on_row(rows[-1])
    _add_ratios(rows)
    return rows


def _train_row(args, device, label, make_model, images, x, y, dtype, mode, penalty_dtype,
               execution, precision):  # fmt: skip
    torch.manual_seed(0)
    model = make_model().to(device)
    model.train()
    graphed = execution == "graphed"
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-4, capturable=graphed)
    reg = capture = V_host = None
    hidden = model.hidden_layers()
    names = list(hidden)
    B = x.shape[0]
    if mode == "specreg":
        reg = SpectralRegularizer(model, names, tau=10, beta=BETA, progress=False,
                                  penalty_dtype=penalty_dtype, backend=_backend(args))
        reg.refresh(images[: 4 * B], batch_size=2000)
        impl = "powerlaw_fast.SpectralRegularizer"
    elif mode == "authors":
        seed_reg = SpectralRegularizer(model, names, tau=10, progress=False)
        seed_reg.refresh(images[: 4 * B], batch_size=2000)
        V_host = {n: seed_reg.basis(n).cpu() for n in names}
        seed_reg.remove()
        capture = _HiddenCapture(hidden)
        impl = "authors' per-eigenvalue loop (baselines.authors_loop_penalty)"
    else:
        impl = "no penalty"
    step = _make_step(model, optimiser, x, y, dtype, reg, capture, V_host)
    if graphed:
        step = _graphed(step, optimiser)
    ms = median_ms(step, **_timing(args, slow=mode == "authors"))
    row = {
        "op": "train_step", "model": label, "mode": mode, "execution": execution, "B": B,
        "N": max(model.hidden_widths().values()), "widths": list(model.hidden_widths().values()),
        "dtype": str(dtype).replace("torch.", ""), "precision": precision,
        "penalty_dtype": str(penalty_dtype or "model").replace("torch.", ""), "impl": impl,
        "median_ms": ms, "peak_mem_mb": peak_memory_mb(step),
    }
    if reg is not None:
        reg.remove()
    if capture is not None:
        capture.remove()
    return row


def _backend(args) -> str:
    """The regulariser's backend: "auto" (Triton on a GPU); a dry run forces the Triton path,
    which runs under the interpreter on the CPU."""
    return "triton" if args.dry_run else "auto"


def _add_ratios(rows):
    """x_vanilla: each step's time over vanilla's, same model, dtype and execution."""
    vanilla = {
        (r["model"], r["dtype"], r["execution"]): r["median_ms"]
        for r in rows if r["op"] == "train_step" and r["mode"] == "vanilla"
    }  # fmt: skip
    for r in rows:
        key = (r.get("model"), r["dtype"], r.get("execution"))
        if r["op"] == "train_step" and key in vanilla:
            r["x_vanilla"] = r["median_ms"] / vanilla[key]
    return rows


def bench_refresh(args, device, images, labels=None, on_row=None):
    rows = []
    count = images.shape[0]
    tiny = args.smoke or args.dry_run
    models = {
        "mlp": lambda: MLP(widths=(64, 64, 64) if tiny else (1000, 1000, 1000)),
        "cnn": lambda: CNN(fc_width=64 if tiny else 1000),
    }
    if labels is not None:
        models = {k: v for k, v in models.items() if k in labels}
    batch = 100 if tiny else 2000
    for label, make_model in models.items():
        model = make_model().to(device)
        # a smoke run keeps only the narrow layers: conv1's float64 eigh (N = 2704) alone takes
        # ~1 min on a CPU
        hidden = {n: w for n, w in model.hidden_widths().items() if not tiny or w <= 64}
        names, widths = list(hidden), list(hidden.values())
        reg = SpectralRegularizer(model, names, tau=10, progress=False, backend=_backend(args))

        def refresh(reg=reg):
            reg.refresh(images, batch_size=batch)

        ms = median_ms(refresh, **_timing(args, slow=True))
        rows.append({
            "op": "refresh", "mode": label, "B": count, "N": max(widths), "widths": widths,
            "dtype": "float32", "precision": "float64 accumulation + float64 eigh",
            "impl": f"SpectralRegularizer.refresh (batches of {batch})",
            "median_ms": ms, "peak_mem_mb": peak_memory_mb(refresh),
        })
        if on_row is not None:
            on_row(rows[-1])
        reg.remove()
    return rows


def run(args, device, images, labels, on_row=None):
    """The MLP's steps and refresh, then the CNN's, then the wide MLP: the paper's models
    first, so a run cut off by its budget has them."""
    if args.smoke or args.dry_run:
        models = {"mlp": (lambda: MLP(widths=(64, 64, 64), activation="tanh"), 96)}
        steps = bench_train_steps(args, device, images, labels, models, on_row)
        return steps + bench_refresh(args, device, images, ["mlp", "cnn"], on_row)
    rows = []
    for label in MODELS:
        rows += bench_train_steps(args, device, images, labels, {label: MODELS[label]}, on_row)
        if label in ("mlp", "cnn"):
            rows += bench_refresh(args, device, images, [label], on_row)
    return rows


def _print_rows(rows):
    print_table(
        rows,
        ["op", "model", "mode", "execution", "dtype", "penalty_dtype", "B", "N", "median_ms",
         "x_vanilla", "peak_mem_mb"],
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run, writes nothing")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny CPU run of the MLP rows on the Triton path (interpreter), "
                             "writes the results file like a GPU run")
    parser.add_argument("--data", default=None,
                        help=f"MNIST folder in torchvision's layout (default: ${ENV_VAR}, else "
                             "random images of the same shape)")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    if args.dry_run and args.out is None:  # never over the committed results
        parser.error("--dry-run needs --out DIR")

    if args.smoke or args.dry_run:
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        raise SystemExit("bench_training.py needs a CUDA GPU (use --smoke or --dry-run on a CPU)")
    else:
        device = torch.device("cuda")
    count = 600 if args.smoke or args.dry_run else 60000
    images, labels, data_note = _load_images(args, device, count)
    print(f"data: {data_note}")
    writer = None
    if not args.smoke:
        extra = {"python": platform.python_version(), "data": data_note,
                 "dry_run": args.dry_run}
        writer = ResultsWriter("training", args.out, extra=extra, finalize=_add_ratios)
    rows = run(args, device, images, labels, on_row=writer.add if writer else None)
    _add_ratios(rows)
    _print_rows(rows)
    if writer is None:
        print("smoke run: no results file written")
        return rows
    path = writer.finish()
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
