"""A rough duration of a sweep, before it starts: counted flops over this machine's GEMM speed.

Used by the command line to warn before an hours-long ``reproduce`` on a CPU. The count covers
what dominates: training (forward + backward, 3x the forward's multiply-adds per image), the
spectral penalty's two GEMMs per step and its per-epoch refresh (covariance and a float64
eigendecomposition), the per-epoch accuracy passes, and the evaluation (FGSM: one gradient;
PGD: ``steps`` gradients per non-zero epsilon, an upper bound since fooled rows retire; white
noise: forward passes). The speed is a timed float32 GEMM on the device; small layers and the
eigendecompositions run below it, while PGD stops early on fooled rows, so read the result as
an order of magnitude: for the demo's two runs on a shared 2-core CPU it said 34 s (3.1 TFLOP at
90 GFLOP/s) where they took 22 s.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import torch
from torch import nn

from .build import batch_size_for, build_model
from .config import RunConfig


def forward_macs(model: nn.Module) -> int:
    """Multiply-adds of one image's forward pass through the linear and conv layers."""
    total = 0

    def count(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Linear):
            total += module.in_features * module.out_features
        elif isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            total += output[0].numel() * (module.in_channels // module.groups) * k

    hooks = [m.register_forward_hook(count) for m in model.modules()
             if isinstance(m, nn.Linear | nn.Conv2d)]
    try:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 1, 28, 28))
        model.train(was_training)
    finally:
        for h in hooks:
            h.remove()
    return total


def run_flops(cfg: RunConfig, n_train: int, n_test: int) -> float:
    """Approximate floating-point operations of one run (see the module docstring)."""
    model, layers = build_model(cfg)
    macs = forward_macs(model)
    widths = model.hidden_widths()
    batch = min(batch_size_for(cfg, model), n_train)
    steps = max(1, n_train // batch) * cfg.epochs
    fwd = 2.0 * macs
    flops = steps * batch * 3 * fwd  # forward + backward
    if cfg.variant == "jacobian":
        flops += steps * batch * 3 * fwd  # one more backward through the network
    refreshes = cfg.epochs
    if cfg.refresh_every is not None:
        refreshes += steps // cfg.refresh_every
    running = cfg.basis_update == "running"
    for name in layers:
        n = widths[name]
        flops += steps * batch * 4.0 * n * n  # Z = (x - mu) V and its backward
        if running:
            # float64 batch moments every step (~4x float32's cost), eigh every basis_every
            flops += steps * 4 * batch * n * n + (steps // cfg.basis_every + 1) * 90.0 * n**3
            continue
        if cfg.basis_update == "tracked":
            # on a CPU: Z and Z^T Z (2 B N^2 each), a float32 eigh of M (~half the float64
            # one's ~90 N^3-equivalent) and V Q (2 N^3); one float64 eigh first
            flops += steps * (4.0 * batch * n * n + 47.0 * n**3) + 90.0 * n**3
            continue
        if cfg.basis_update == "random":  # one QR, never refreshed
            flops += 90.0 * n**3
            continue
        # refresh: a forward pass, float64 moments (~4x float32's cost), eigh (~9 N^3, ~10x)
        flops += refreshes * (n_train * fwd + 4 * n_train * n * n + 90.0 * n**3)
    flops += cfg.epochs * (n_train + n_test) * fwd  # accuracy after each epoch
    nonzero = sum(1 for e in cfg.pgd_eps if e > 0)
    flops += n_test * (3 * fwd + len(cfg.fgsm_eps) * fwd)  # FGSM: one gradient
    flops += nonzero * n_test * cfg.pgd_steps * 3 * fwd + len(cfg.pgd_eps) * n_test * fwd
    flops += len(cfg.noise_sigma) * n_test * fwd
    flops += n_train * fwd + sum(90.0 * n**3 + 4 * n_train * n * n for n in widths.values())
    return flops


def gemm_flops_per_second(device: torch.device, size: int = 1024, repeats: int = 3) -> float:
    """Measured float32 GEMM speed of ``device`` (best of ``repeats``, after a warm-up)."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    best = float("inf")
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / max(best, 1e-9)


def estimate_seconds(configs: Sequence[RunConfig], n_train: int, n_test: int,
                     device: torch.device) -> tuple[float, float]:
    """(estimated seconds for all ``configs``, measured GEMM flop/s of ``device``)."""
    speed = gemm_flops_per_second(torch.device(device))
    cache: dict = {}
    total = 0.0
    for cfg in configs:
        key = repr(dataclasses.replace(cfg, seed=0, notes={}))  # the seed changes no count
        if key not in cache:
            cache[key] = run_flops(cfg, n_train, n_test)
        total += cache[key]
    return total / speed, speed


def format_duration(seconds: float) -> str:
    if seconds < 1:
        return "under 1 s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
