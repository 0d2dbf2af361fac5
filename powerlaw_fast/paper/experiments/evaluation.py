"""What a trained run is measured by: accuracy, attack curves, eigenspectra, sensitivity maps."""

from __future__ import annotations

import math

import torch
from torch import nn

from ...attacks import robustness_curve
from ...training.capture import layer_spectrum
from ...training.fits import effective_dimension, fit_power_law
from ..sensitivity import sensitivity_maps
from .build import Data
from .config import RunConfig


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int) -> float:
    was_training = model.training
    model.eval()
    correct = 0
    with torch.no_grad():
        for xb, yb in zip(x.split(batch), y.split(batch), strict=True):
            correct += int((model(xb).argmax(1) == yb).sum())
    model.train(was_training)
    return correct / max(1, x.shape[0])



def _round(values, digits: int = 6) -> list[float | None]:
    return [float(f"{v:.{digits}g}") if math.isfinite(v) else None for v in values]


def evaluate_robustness(
    model: nn.Module, cfg: RunConfig, data: Data, device: torch.device, *, progress: bool = True
) -> dict:
    """FGSM, PGD and white-noise accuracy curves over the config's grids."""
    pair = (data.test_x.to(device), data.test_y.to(device))
    curves = {}
    grids = {"fgsm": cfg.fgsm_eps, "pgd": cfg.pgd_eps, "noise": cfg.noise_sigma}
    for attack, grid in grids.items():
        if not grid:
            continue
        kwargs = {}
        if attack == "pgd":
            kwargs = {"steps": cfg.pgd_steps, "step_size": cfg.pgd_step_size}
        elif attack == "noise":
            kwargs = {"generator": cfg.seed}
        curve = robustness_curve(model, pair, list(grid), attack=attack,
                                 batch_size=cfg.eval_batch, progress=progress, **kwargs)
        d = curve.to_dict()
        d.pop("success")  # per-sample outcomes: large and not needed for the figures
        curves[attack] = d
    return curves


def measure_spectra(model: nn.Module, cfg: RunConfig, data: Data, device: torch.device) -> dict:
    """Data-set eigenspectrum of every hidden layer (training images), with summaries."""
    out = {}
    x = data.train_x.to(device)
    for name in model.hidden_layers():
        lam = layer_spectrum(model, name, x, batch_size=cfg.eval_batch)
        entry = {"eigenvalues": _round(lam.tolist()), "width": int(lam.numel())}
        try:
            entry["effective_dimension"] = effective_dimension(lam)
        except ValueError:
            entry["effective_dimension"] = None
        # Two fits: over every regularised rank (tau..N, dominated by the long tail, which a
        # finite data set and a short run leave below the line) and over the first decade
        # tau..10 tau, where the figures show whether the spectrum follows n^-alpha.
        start = min(cfg.tau, lam.numel() - 1)
        for key, stop in (("alpha_fit", None), ("alpha_fit_decade", min(10 * start, lam.numel()))):
            try:
                a, _, window = fit_power_law(lam, start=start, stop=stop)
                entry[key], entry[key.replace("alpha", "window")] = a, list(window)
            except ValueError:
                entry[key], entry[key.replace("alpha", "window")] = None, None
        out[name] = entry
    return out


def measure_sensitivity(model: nn.Module, cfg: RunConfig, data: Data,
                        device: torch.device) -> dict | None:
    """A few sensitivity maps (eq. 9) of the last hidden layer for training image 0."""
    layer = list(model.hidden_layers())[-1]
    width = model.hidden_widths()[layer]
    ranks = [r for r in cfg.sensitivity_ranks if 1 <= r <= width]
    if not ranks or data.train_x.shape[0] < 2:
        return None
    maps = sensitivity_maps(model, layer, data.train_x.to(device), ranks, sample=0,
                            batch_size=cfg.eval_batch)
    return {
        "layer": layer,
        "sample": 0,
        "ranks": ranks,
        "image": [_round(row, 4) for row in data.train_x[0].reshape(28, 28).tolist()],
        "maps": [[_round(row, 4) for row in m.tolist()] for m in maps],
    }
