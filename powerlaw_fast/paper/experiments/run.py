"""One run: build the model, train it, evaluate it, write its JSON (:func:`run_experiment`)."""

from __future__ import annotations

import math
import platform
import time

import torch

from .build import Data, batch_size_for, build_model, default_device
from .config import RunConfig
from .evaluation import accuracy, evaluate_robustness, measure_sensitivity, measure_spectra
from .parallel import DataParallel
from .results import RESULT_FORMAT, write_json_atomic
from .training import train_model


def run_environment(device: torch.device) -> dict:
    """Versions and the device a run's numbers came from (stored in its JSON)."""
    from ..._version import __version__

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    return {"powerlaw_fast": __version__, "torch": torch.__version__,
            "python": platform.python_version(), "device_name": name or platform.machine(),
            "date": time.strftime("%Y-%m-%d", time.gmtime())}


def summarise(result: dict, cfg: RunConfig) -> dict:
    """The numbers issue 15 compares runs by, for the regularised (else the last hidden) layer:
    the fitted power-law exponent over ranks tau..N and over the decade tau..10 tau, the
    90%-variance dimension, and the penalty per epoch (mean over its steps; also per unit beta,
    comparable across betas) with its first step's value."""
    layers = result["model"]["regularised_layers"] or list(result["model"]["hidden_widths"])
    layer = layers[-1]
    spec = result["spectra"].get(layer, {})
    history = result["history"]
    per_epoch = [h.get("penalty") for h in history] if cfg.regularised else None
    beta = cfg.beta if cfg.regularised else None
    return {
        "layer": layer,
        "alpha_tau_to_n": spec.get("alpha_fit"),
        "alpha_tau_to_n_window": spec.get("window_fit"),
        "alpha_decade": spec.get("alpha_fit_decade"),
        "alpha_decade_window": spec.get("window_fit_decade"),
        "effective_dimension": spec.get("effective_dimension"),
        "penalty_first_step": history[0].get("penalty_first_step") if per_epoch else None,
        "penalty_per_epoch": per_epoch,
        "penalty_per_epoch_per_beta": (
            [p / beta if p is not None and beta else None for p in per_epoch]
            if per_epoch else None
        ),
        "basis_update": cfg.basis_update,
    }


def run_experiment(
    cfg: RunConfig,
    data: Data,
    *,
    device: torch.device | str | None = None,
    out_path=None,
    progress: bool = True,
    parallel: DataParallel | None = None,
) -> dict | None:
    """Train and evaluate one run; return its result dict (and write it to ``out_path``).

    With ``parallel`` (a data-parallel run) every rank trains; rank 0 evaluates, writes the
    JSON and returns the result, the other ranks return None once it is written.
    """
    device = torch.device(device) if device is not None else default_device()
    started = time.time()
    torch.manual_seed(cfg.seed)
    model, layers = build_model(cfg)
    model.to(device)
    history, reg = train_model(model, cfg, data, layers, device, progress=progress,
                               parallel=parallel)
    if reg is not None:
        reg.remove()
    model.eval()
    if parallel is not None and parallel.rank != 0:
        parallel.barrier()  # rank 0 evaluates and writes
        return None
    result = {
        "format": RESULT_FORMAT,
        "status": "complete",
        "name": cfg.name,
        "config": cfg.to_dict(),
        "seed": cfg.seed,
        "device": str(device),
        "environment": run_environment(device),
        "data": {"source": data.source, "n_train": int(data.train_x.shape[0]),
                 "n_test": int(data.test_x.shape[0])},
        "model": {
            "class": type(model).__name__,
            "hidden_widths": dict(model.hidden_widths()),
            "regularised_layers": layers,
            "batch_size": min(batch_size_for(cfg, model), int(data.train_x.shape[0])),
        },
        "history": history,
        "test_accuracy": accuracy(model, data.test_x.to(device), data.test_y.to(device),
                                   cfg.eval_batch),
        "robustness": evaluate_robustness(model, cfg, data, device, progress=progress),
        "spectra": measure_spectra(model, cfg, data, device),
        "sensitivity": measure_sensitivity(model, cfg, data, device),
    }
    result["summary"] = summarise(result, cfg)
    result["wall_seconds"] = round(time.time() - started, 2)
    result["history"] = [
        {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in h.items()}
        for h in history
    ]
    result["parallel"] = {"mode": "data" if parallel is not None else "none",
                          "world_size": parallel.world if parallel is not None else 1}
    if out_path is not None:
        write_json_atomic(out_path, result)
    if parallel is not None:
        parallel.barrier()
    return result
