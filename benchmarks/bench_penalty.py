"""Forward+backward of the spectral penalty: powerlaw_fast against the baselines, on a GPU.

    python benchmarks/bench_penalty.py                 # full sweep, writes results JSON
    python benchmarks/bench_penalty.py --sizes 1024    # one width
    python benchmarks/bench_penalty.py --smoke         # tiny CPU run of the torch paths, no file
    python benchmarks/bench_penalty.py --dry-run --out DIR  # every path at N = 40 on the
                                                        # CPU (Triton interpreter), writes JSON

Implementations: ``triton`` and ``cuda`` (this library; at N >= 4096 also
``triton_fused_gemm`` and ``triton_cublas_gemm``, the two GEMM routes forced, and for float32
``triton_bf16_compute``), ``torch_projection`` (plain torch, projection form),
``compiled_projection`` (torch.compile of it; N <= 2048), ``torch_covariance`` (Sigma first,
then diag(V^T Sigma V)), ``authors_loop`` (the authors' per-eigenvalue loop; N <= 2048),
``eigvalsh`` (exact per-batch eigenvalues; N <= 2048) and ``gemm_floor`` (the two cuBLAS GEMMs
of the same shapes, the roofline). Each row: eager median, and for ours and plain torch the
CUDA-graph replay median (GPU time alone) and the host enqueue time per call.
Batch B = 1.5 N. Dtypes: float32 at matmul precision "highest" and "high", and bfloat16.
Writes ``benchmarks/results/<gpu-name>/penalty.json`` after every row (``"complete": false``
until the end), so a run cut off by a time budget keeps what it measured. Cases run width by
width in the order of ``SIZES`` (the paper's 1024 and the 4096 target first, the largest last),
all three settings per width; each new (N, B, precision) is an autotune key (4 configs x 2
kernels compiled), and ``triton_compiles`` in the JSON counts what the run compiled.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (  # noqa: E402
    ResultsWriter,
    cuda_backend_available,
    interpreter_for_dry_run,
    median_ms,
    peak_memory_mb,
    print_table,
)

interpreter_for_dry_run(sys.argv)
from powerlaw_fast import spec_penalty  # noqa: E402
from powerlaw_fast.baselines import (  # noqa: E402
    authors_loop_penalty,
    covariance_penalty,
    eigvalsh_penalty,
    projection_penalty,
)

SIZES = (1024, 4096, 2048, 8192, 16384)  # run in this order: the targets first, largest last
DRY_RUN_SIZES = (40,)  # N % 16 != 0, B = 60: every path once (the interpreter: ~0.5 s a call)
SETTINGS = (("float32", "highest"), ("float32", "high"), ("bfloat16", "high"))
TAU = 10
GRAPHED = ("triton", "torch_projection", "triton_bf16_compute")  # also timed as CUDA graphs


def make_inputs(N: int, dtype: torch.dtype, device: str, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    B = (3 * N) // 2
    scales = torch.arange(1, N + 1, device=device, dtype=torch.float32) ** -0.5
    x = (torch.randn(B, N, device=device, generator=g) * scales).to(dtype)
    V, _ = torch.linalg.qr(torch.randn(N, N, device=device, generator=g))
    return x, V.to(dtype)


def implementations(N: int, include_cuda: bool, dtype: torch.dtype, *, dry_run: bool = False):
    """name -> penalty function. ``dry_run``: every path at a tiny N on the CPU (the GEMM routes
    forced at any N, torch.compile through its "eager" backend: no C++ compiler run)."""
    impls = {
        "triton": lambda x, V: spec_penalty(x, V, tau=TAU, backend="triton"),
        "torch_projection": lambda x, V: projection_penalty(x, V, tau=TAU),
        "torch_covariance": lambda x, V: covariance_penalty(x, V, tau=TAU),
    }
    if N >= 4096 or dry_run:  # both GEMM routes where the choice is made (MAX_FUSED_N)
        impls["triton_fused_gemm"] = routed("triton")
        impls["triton_cublas_gemm"] = routed("cublas")
    if dtype == torch.float32:
        impls["triton_bf16_compute"] = lambda x, V: spec_penalty(
            x, V, tau=TAU, backend="triton", compute_dtype=torch.bfloat16
        )
    if include_cuda:
        impls["cuda"] = lambda x, V: spec_penalty(x, V, tau=TAU, backend="cuda")
    if N <= 2048:  # seconds per call above; compiling costs ~10 s per shape
        impls["compiled_projection"] = torch.compile(
            lambda x, V: projection_penalty(x, V, tau=TAU), dynamic=False,
            **({"backend": "eager"} if dry_run else {}),
        )
        impls["authors_loop"] = lambda x, V: authors_loop_penalty(x, V, tau=TAU - 1)
        impls["eigvalsh"] = lambda x, V: eigvalsh_penalty(x, tau=TAU)
    return impls


def routed(route: str):
    def fn(x, V):
        os.environ["POWERLAW_FAST_GEMM"] = route
        try:
            return spec_penalty(x, V, tau=TAU, backend="triton")
        finally:
            os.environ.pop("POWERLAW_FAST_GEMM")

    return fn


def graph_and_enqueue_ms(step, calls: int = 20):
    """(median GPU time of the step replayed from a CUDA graph, host time to enqueue one call).

    The graph removes all host work: what is left is the GPU's. Enqueue time is the host's
    cost per call without waiting for the GPU (the regime of the paper's widths)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        step()
    enqueue = (time.perf_counter() - start) / calls * 1e3
    torch.cuda.synchronize()
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            step()  # warm on the side stream, as torch's capture recipe asks
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        return median_ms(graph.replay, rep=50), enqueue
    except Exception as err:  # not capturable (e.g. a host sync inside): report why
        print(f"  (no CUDA graph: {type(err).__name__}: {str(err)[:80]})")
        return None, enqueue


def forward_backward(fn, x, V):
    leaf = x.detach().requires_grad_(True)

    def run():
        leaf.grad = None
        fn(leaf, V).backward()

    return run


def gemm_floor(x, V):
    """The two GEMMs every implementation needs: Z = x V and grad = Z V^T."""

    def run():
        z = x @ V
        return z @ V.T

    return run


def timed_steps(impls, x, V):
    """(name, step) for each implementation, then the GEMM floor; made one at a time so that
    only one step's gradient is held at once."""
    for name, fn in impls.items():
        yield name, forward_backward(fn, x, V)
    yield "gemm_floor", gemm_floor(x, V)


def run(sizes, settings, device: str, rep: int, *, dry_run: bool = False, on_row=None):
    """Rows for every (N, setting, implementation), N in the order given; ``on_row(row)`` after
    each (the results file is rewritten there)."""
    rows = []
    include_cuda = device == "cuda" and cuda_backend_available()
    for N in sizes:
        for dtype_name, precision in settings:
            dtype = getattr(torch, dtype_name)
            torch.set_float32_matmul_precision(precision)
            x, V = make_inputs(N, dtype, device)
            B = x.shape[0]
            impls = implementations(N, include_cuda, dtype, dry_run=dry_run)
            if device == "cpu" and not dry_run:
                for name in [n for n in impls if n.startswith("triton") or "compiled" in n]:
                    impls.pop(name)
            for name, step in timed_steps(impls, x, V):
                ms = median_ms(step, rep=rep)
                graph_ms = enqueue_ms = None
                if device == "cuda" and name in GRAPHED:
                    graph_ms, enqueue_ms = graph_and_enqueue_ms(step)
                rows.append(
                    dict(
                        op="spec_penalty",
                        mode="fwd+bwd",
                        B=B,
                        N=N,
                        dtype=dtype_name,
                        precision=precision,
                        impl=name,
                        median_ms=ms,
                        graph_ms=graph_ms,
                        enqueue_ms=enqueue_ms,
                        peak_mem_mb=peak_memory_mb(step),
                        tflops=4 * B * N * N / ms / 1e9,
                    )
                )
                print_table(rows[-1:], ["impl", "N", "dtype", "precision", "median_ms"])
                if on_row is not None:
                    on_row(rows[-1])
            del x, V
            if device == "cuda":
                torch.cuda.empty_cache()
    torch.set_float32_matmul_precision("highest")
    return rows


def add_ratios(rows):
    """speedup of ``triton`` over each baseline, same (N, dtype, precision)."""
    ours = {
        (r["N"], r["dtype"], r["precision"]): r["median_ms"] for r in rows if r["impl"] == "triton"
    }
    for r in rows:
        key = (r["N"], r["dtype"], r["precision"])
        if key in ours and r["impl"] != "triton":
            r["triton_speedup"] = r["median_ms"] / ours[key]
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=None,
                        help=f"widths, run in this order (default {' '.join(map(str, SIZES))})")
    parser.add_argument("--rep", type=int, default=100, help="milliseconds of timing per case")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run, writes nothing")
    parser.add_argument("--dry-run", action="store_true",
                        help="every implementation at N = 40 on the CPU (Triton interpreter, "
                             "no CUDA graphs), writes the results file like a GPU run")
    args = parser.parse_args(argv)
    if args.dry_run and args.out is None:  # never over the committed results
        parser.error("--dry-run needs --out DIR")
    if args.smoke:
        rows = run([64], [("float32", "highest")], "cpu", rep=20)
        print_table(rows, ["impl", "N", "median_ms"])
        return rows
    if args.dry_run:
        device, settings, rep = "cpu", (("float32", "highest"), ("bfloat16", "high")), 20
        sizes = args.sizes or list(DRY_RUN_SIZES)
    elif not torch.cuda.is_available():
        raise SystemExit("bench_penalty needs a CUDA GPU (use --smoke or --dry-run on a CPU)")
    else:
        device, settings, rep, sizes = "cuda", SETTINGS, args.rep, args.sizes or list(SIZES)
    writer = ResultsWriter("penalty", args.out, extra={"dry_run": args.dry_run},
                           finalize=add_ratios)
    rows = add_ratios(run(sizes, settings, device, rep, dry_run=args.dry_run,
                          on_row=writer.add))
    print_table(
        rows,
        ["impl", "N", "dtype", "precision", "median_ms", "graph_ms", "enqueue_ms", "tflops",
         "peak_mem_mb", "triton_speedup"],
    )
    path = writer.finish()
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
