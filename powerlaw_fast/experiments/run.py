"""One run: build the model, train it, evaluate it, write its JSON (:func:`run_experiment`)."""

from __future__ import annotations

import math
import time

import torch

from .building import batch_size_for, build_model, default_device
from .config import RunConfig
from .data import Data
from .evaluation import accuracy, evaluate_robustness, measure_sensitivity, measure_spectra
from .parallel import DataParallel
from .results import RESULT_FORMAT, write_json_atomic
from .training import train_model


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
