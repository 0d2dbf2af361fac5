"""The experiments of Nassar et al. (2020), section 4: one run = train, evaluate, write one JSON.

A run is described by a :class:`RunConfig` (architecture, variant, seed, hyperparameters, the
attack grids). :func:`run_experiment` builds the model, trains it (optionally with the spectral
regulariser, the Jacobian penalty or a whitened layer), evaluates clean accuracy and FGSM / PGD /
white-noise robustness over the epsilon grids, measures the eigenspectra of the hidden layers and
a few sensitivity maps, and writes everything to one JSON file atomically (a temporary file in
the same folder, then ``os.replace``), so a results file is either complete or absent.

:func:`run_sweep` runs a list of configs into a folder and skips every run whose JSON already
exists, is complete and has the same config: an interrupted sweep resumes where it stopped.
Under ``torchrun`` (``WORLD_SIZE > 1``) there are two modes (:func:`run_sweep`'s ``parallel``):

- ``"runs"``: the runs of a sweep are divided among the processes, each run training on its own
  device (``cuda:LOCAL_RANK``); exact, and the most efficient for a many-run sweep.
- ``"data"``: every run is trained data-parallel over all processes
  (``DistributedDataParallel``; each rank takes its share of every global batch; the spectral
  regulariser gets the process group, so its refresh and per-batch spectrum are those of the
  global batch). Batch norm becomes ``SyncBatchNorm`` (CUDA only); the whitening variants are
  refused (their per-batch statistics would be per rank). Rank 0 evaluates and writes the JSON.

The variants (sec. 4.1 - 4.3):

===============  =========================================================================
experiment       variants
===============  =========================================================================
``shallow``      ``vanilla``, ``specreg`` (784-2000-10 sigmoid + batch norm, sec. 4.1)
``whitening``    ``vanilla``, ``whiten`` (2nd hidden layer whitened, eq. 10),
                 ``specreg-last`` (last hidden layer regularised), ``whiten+specreg-last``
``all-layers``   ``vanilla``, ``specreg-all`` (every hidden layer), ``jacobian`` (eq. 11)
===============  =========================================================================

Spectrally regularised variants get one run per beta; the others ignore beta.

Example (a tiny run on the shipped MNIST subset)::

    >>> from powerlaw_fast.experiments import RunConfig, load_data, run_experiment
    >>> cfg = RunConfig("shallow", "shallow", "specreg", seed=0, beta=1.0, epochs=1, width=32,
    ...                 limit_train=300, limit_test=100, fgsm_eps=(0.0, 0.1), pgd_eps=(0.1,),
    ...                 noise_sigma=(0.2,), pgd_steps=2)
    >>> result = run_experiment(cfg, load_data(None, 300, 100), progress=False)
    >>> result["status"], sorted(result["robustness"])
    ('complete', ['fgsm', 'noise', 'pgd'])
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .attacks import robustness_curve
from .datasets import load_mnist
from .jacobian import jacobian_penalty
from .models import CNN, MLP, ShallowNet
from .regularizer import SpectralRegularizer
from .sensitivity import sensitivity_maps
from .spectra import effective_dimension, fit_power_law, layer_spectrum

RESULT_FORMAT = 1
EXPERIMENTS = {
    "shallow": ("vanilla", "specreg"),
    "whitening": ("vanilla", "whiten", "specreg-last", "whiten+specreg-last"),
    "all-layers": ("vanilla", "specreg-all", "jacobian"),
}
ARCHS = ("shallow", "mlp", "cnn")
SPECREG_VARIANTS = ("specreg", "specreg-last", "whiten+specreg-last", "specreg-all")
# Paper defaults (sec. 4): eps up to 0.3 as in the authors' code; noise sigma for the appendix.
DEFAULT_EPS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3)
DEFAULT_NOISE = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
DEFAULT_RANKS = (1, 2, 5, 10, 20, 50, 100, 500)


@dataclass
class RunConfig:
    """Everything that defines one run (stored in its JSON; a resumed sweep compares it).

    Args:
        experiment: ``"shallow"``, ``"whitening"`` or ``"all-layers"``.
        arch: ``"shallow"`` (ShallowNet), ``"mlp"`` or ``"cnn"``.
        variant: one of ``EXPERIMENTS[experiment]``.
        seed: seeds the weights, the batch order and the noise.
        beta: spectral penalty strength (spectrally regularised variants; else ignored).
        epochs: training epochs (the authors' scripts default to 50).
        lr: Adam learning rate (paper: 1e-4).
        batch_size: training batch; ``None`` = ceil(1.5 x the widest hidden layer) (paper's rule).
        alpha, tau, convention: power-law exponent, anchor rank and tau convention.
        beta_jacobian: beta_j of eq. (11) (paper: 0.01).
        width: hidden width of ShallowNet (paper 2000), of each MLP layer (1000) or of the CNN's
            fc layer (1000); ``None`` = the paper's.
        batch_norm: batch norm in ShallowNet (paper: yes).
        limit_train, limit_test: use the first images of each split (``None`` = all).
        fgsm_eps, pgd_eps, noise_sigma: attack grids (an empty grid skips that attack).
        pgd_steps, pgd_step_size: PGD settings (paper: 40 steps of 0.01).
        refresh_every: refresh the eigenbases every this many steps as well as at each epoch
            start (``None``: at each epoch start only, the paper's scheme). Short runs with a
            large learning rate need it: the basis goes stale within an epoch.
        sensitivity_ranks: eigenvalue ranks of the saved sensitivity maps (eq. 9), last hidden
            layer; ranks above its width are dropped.
        eval_batch: rows per evaluation forward pass.
    """

    experiment: str
    arch: str
    variant: str
    seed: int = 0
    beta: float | None = None
    epochs: int = 50
    lr: float = 1e-4
    batch_size: int | None = None
    alpha: float = 1.0
    tau: int = 10
    convention: str = "paper"
    beta_jacobian: float = 0.01
    width: int | None = None
    batch_norm: bool = True
    limit_train: int | None = None
    limit_test: int | None = None
    fgsm_eps: tuple[float, ...] = DEFAULT_EPS
    pgd_eps: tuple[float, ...] = DEFAULT_EPS
    noise_sigma: tuple[float, ...] = DEFAULT_NOISE
    pgd_steps: int = 40
    pgd_step_size: float = 0.01
    refresh_every: int | None = None
    sensitivity_ranks: tuple[int, ...] = DEFAULT_RANKS
    eval_batch: int = 1000
    notes: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.experiment not in EXPERIMENTS:
            raise ValueError(
                f"experiment: expected one of {tuple(EXPERIMENTS)}, got {self.experiment!r}"
            )
        if self.arch not in ARCHS:
            raise ValueError(f"arch: expected one of {ARCHS}, got {self.arch!r}")
        if self.variant not in EXPERIMENTS[self.experiment]:
            raise ValueError(
                f"variant: expected one of {EXPERIMENTS[self.experiment]} for experiment "
                f"{self.experiment!r}, got {self.variant!r}"
            )
        if self.experiment == "shallow" and self.arch != "shallow":
            raise ValueError(f"arch: the shallow experiment uses arch 'shallow', got {self.arch!r}")
        if self.experiment != "shallow" and self.arch == "shallow":
            raise ValueError(f"arch: experiment {self.experiment!r} needs 'mlp' or 'cnn'")
        if self.regularised and (self.beta is None or not self.beta >= 0):
            raise ValueError(f"beta: expected a number >= 0 for {self.variant!r}, got {self.beta}")
        if not self.regularised:
            self.beta = None
        for name in ("epochs", "pgd_steps", "eval_batch"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {getattr(self, name)!r}")
        for name in ("fgsm_eps", "pgd_eps", "noise_sigma", "sensitivity_ranks"):
            setattr(self, name, tuple(getattr(self, name)))

    @property
    def regularised(self) -> bool:
        return self.variant in SPECREG_VARIANTS

    @property
    def name(self) -> str:
        """File stem of the run, e.g. ``shallow-shallow-specreg-beta2-seed0``."""
        parts = [self.experiment, self.arch, self.variant.replace("+", "_")]
        if self.beta is not None:
            parts.append(f"beta{self.beta:g}")
        parts.append(f"seed{self.seed}")
        return "-".join(parts)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def sweep_configs(
    experiment: str,
    *,
    arch: str | None = None,
    seeds: int = 3,
    betas: Sequence[float] = (1.0, 2.0, 5.0),
    **overrides,
) -> list[RunConfig]:
    """Every run of one experiment: seeds x variants (x betas for the regularised ones).

    Seed-major order, so a sweep interrupted part-way has whole seeds done.
    """
    if experiment not in EXPERIMENTS:
        raise ValueError(f"experiment: expected one of {tuple(EXPERIMENTS)}, got {experiment!r}")
    arch = "shallow" if experiment == "shallow" else (arch or "mlp")
    if not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds: expected an integer >= 1, got {seeds!r}")
    betas = [float(b) for b in betas]
    if not betas:
        raise ValueError("betas: expected at least one beta")
    configs = []
    for seed in range(seeds):
        for variant in EXPERIMENTS[experiment]:
            for beta in betas if variant in SPECREG_VARIANTS else [None]:
                configs.append(
                    RunConfig(experiment, arch, variant, seed=seed, beta=beta, **overrides)
                )
    return configs


# ------------------------------------------------------------------------------------------------
# Data, models


@dataclass
class Data:
    """In-memory MNIST: images ``[n, 1, 28, 28]`` float32 in [0, 1], labels int64 ``[n]``."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    source: str


def load_data(root=None, limit_train: int | None = None, limit_test: int | None = None) -> Data:
    """Both MNIST splits (see :func:`~powerlaw_fast.datasets.load_mnist` for ``root``).

    Raises the loader's ``FileNotFoundError`` / ``MNISTFileError`` for a missing or corrupt
    folder (the command line turns them into a one-line message).
    """
    train_x, train_y = load_mnist(root, train=True, limit=limit_train)
    test_x, test_y = load_mnist(root, train=False, limit=limit_test)
    if root is None:
        env = os.environ.get("POWERLAW_FAST_DATA", "")
        source = env if env else "shipped subset of real MNIST (6000 train / 1000 test)"
    else:
        source = str(root)
    return Data(train_x, train_y, test_x, test_y, source)


@dataclass
class DataParallel:
    """The process group of a data-parallel run: ``world`` ranks, this one ``rank``."""

    group: object
    rank: int
    world: int

    @classmethod
    def initialise(cls, device: torch.device) -> DataParallel:
        """Join (or reuse) the default process group (torchrun's environment): NCCL on CUDA,
        gloo on the CPU."""
        import torch.distributed as dist

        if not dist.is_available():
            raise RuntimeError("data-parallel runs need torch.distributed, which is unavailable")
        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group(backend)
        return cls(dist.group.WORLD, dist.get_rank(), dist.get_world_size())

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier(group=self.group)


def build_model(cfg: RunConfig) -> tuple[nn.Module, list[str]]:
    """The network of ``cfg`` and the names of its spectrally regularised layers."""
    whiten = cfg.variant in ("whiten", "whiten+specreg-last")
    if cfg.arch == "shallow":
        model = ShallowNet(hidden=cfg.width or 2000, activation="sigmoid",
                           batch_norm=cfg.batch_norm)
    elif cfg.arch == "mlp":
        width = cfg.width or 1000
        # Running statistics in eval mode: the attacks put rows for several epsilons in one
        # forward pass, which batch statistics would couple.
        model = MLP(widths=(width,) * 3, whiten_layer=2 if whiten else None,
                    whiten_eval_mode="running")
    else:
        model = CNN(whiten=whiten, whiten_eval_mode="running", fc_width=cfg.width or 1000)
    names = list(model.hidden_layers())
    if cfg.variant == "specreg-all":
        layers = names
    elif cfg.regularised:
        layers = names[-1:]
    else:
        layers = []
    return model, layers


def batch_size_for(cfg: RunConfig, model: nn.Module) -> int:
    """``cfg.batch_size`` or the paper's rule: 1.5 x the widest hidden layer."""
    if cfg.batch_size is not None:
        return int(cfg.batch_size)
    return math.ceil(1.5 * max(model.hidden_widths().values()))


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ------------------------------------------------------------------------------------------------
# Training


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int) -> float:
    was_training = model.training
    model.eval()
    correct = 0
    with torch.no_grad():
        for xb, yb in zip(x.split(batch), y.split(batch), strict=True):
            correct += int((model(xb).argmax(1) == yb).sum())
    model.train(was_training)
    return correct / max(1, x.shape[0])


def train_model(
    model: nn.Module,
    cfg: RunConfig,
    data: Data,
    layers: list[str],
    device: torch.device,
    *,
    progress: bool = True,
    parallel: DataParallel | None = None,
) -> tuple[list[dict], SpectralRegularizer | None]:
    """Adam on cross entropy (+ spectral penalty or Jacobian penalty); one dict per epoch.

    With ``parallel``, ``model`` is trained data-parallel: every rank draws the same batch
    order, takes rows ``rank::world`` of each global batch, and DistributedDataParallel averages
    the gradients; the spectral penalty is scaled by ``world`` so that the average is the
    single-process gradient.
    """
    rank, world = (parallel.rank, parallel.world) if parallel is not None else (0, 1)
    trained = model
    if parallel is not None:
        trained = _data_parallel_model(model, cfg, device)
    train_x, train_y = data.train_x.to(device), data.train_y.to(device)
    test_x, test_y = data.test_x.to(device), data.test_y.to(device)
    n = train_x.shape[0]
    batch = batch_size_for(cfg, model)
    if batch > n:
        warnings.warn(f"batch size {batch} exceeds the {n} training images; using {n}",
                      stacklevel=2)
        batch = n
    steps_per_epoch = n // batch  # drop the partial last batch: it would be rank-deficient
    optimiser = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    reg = None
    if layers:
        reg = SpectralRegularizer(model, layers, alpha=cfg.alpha, tau=cfg.tau, beta=cfg.beta,
                                  convention=cfg.convention, progress=False,
                                  process_group=parallel.group if parallel is not None else None)
    # each rank refreshes on its share of the training set; the regulariser merges the moments
    refresh_x = train_x[rank::world]
    order = torch.Generator().manual_seed(cfg.seed)
    # ranks draw their own projections for their own rows
    jac_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1 + 7919 * rank)
    history = []
    step = 0
    bar = tqdm(range(cfg.epochs), desc=cfg.name, unit="epoch", disable=not progress or rank != 0,
               leave=False)
    for epoch in bar:
        start = time.perf_counter()
        model.train()
        perm = torch.randperm(n, generator=order).to(device)
        # summed on the device, read once per epoch: no host synchronisation per step
        running = torch.zeros(3, dtype=torch.float64, device=device)
        for i in range(steps_per_epoch):
            if reg is not None and (
                i == 0 or (cfg.refresh_every is not None and step % cfg.refresh_every == 0)
            ):
                reg.refresh(refresh_x, batch_size=cfg.eval_batch)
            idx = perm[i * batch : (i + 1) * batch][rank::world]
            xb, yb = train_x[idx], train_y[idx]
            if cfg.variant == "jacobian":
                xb = xb.detach().requires_grad_(True)
            logits = trained(xb)
            ce = nn.functional.cross_entropy(logits, yb)
            if reg is not None:
                penalty = reg.penalty()  # of the global batch, identical on every rank
                # DDP averages the ranks' gradients; the global penalty's must not be divided
                loss = ce + (penalty * world if world > 1 else penalty)
            elif cfg.variant == "jacobian":
                penalty = jacobian_penalty(xb, logits, beta=cfg.beta_jacobian, generator=jac_gen)
                loss = ce + penalty
            else:
                penalty = ce.new_zeros(())
                loss = ce
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            loss = ce + penalty  # logged: the single-process value
            optimiser.step()
            step += 1
            running += torch.stack([t.detach().to(torch.float64) for t in (loss, ce, penalty)])
        sums = dict(zip(("loss", "cross_entropy", "penalty"), running.tolist(), strict=True))
        if world > 1:
            sums = _mean_over_ranks(sums, parallel, device)
        record = {k: v / max(1, steps_per_epoch) for k, v in sums.items()}
        record.update(
            epoch=epoch + 1,
            steps=steps_per_epoch,
            train_accuracy=_accuracy(model, train_x, train_y, cfg.eval_batch),
            test_accuracy=_accuracy(model, test_x, test_y, cfg.eval_batch),
            seconds=time.perf_counter() - start,
        )
        history.append(record)
        bar.set_postfix(loss=f"{record['loss']:.3f}", test=f"{record['test_accuracy']:.3f}")
        if not math.isfinite(record["loss"]):
            raise FloatingPointError(
                f"{cfg.name}: the training loss became non-finite in epoch {epoch + 1}"
            )
    bar.close()
    return history, reg


def check_data_parallel(cfg: RunConfig, device: torch.device) -> None:
    """Raise ValueError when ``cfg`` cannot be trained data-parallel on ``device``."""
    if cfg.variant in ("whiten", "whiten+specreg-last"):
        raise ValueError(
            f"variant {cfg.variant!r}: data-parallel training is not supported for the whitening "
            f"variants (each rank would whiten with its own batch statistics); use "
            f"--parallel runs"
        )
    if cfg.arch == "shallow" and cfg.batch_norm and device.type != "cuda":
        raise ValueError(
            "batch norm under data-parallel training needs SyncBatchNorm, which needs CUDA; "
            "use --parallel runs on the CPU"
        )


def _data_parallel_model(model: nn.Module, cfg: RunConfig, device: torch.device) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    check_data_parallel(cfg, device)
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        # in place: the blocks keep their names, so the regulariser's hooks still find them
        for name, block in list(model.blocks.items()):
            model.blocks[name] = nn.SyncBatchNorm.convert_sync_batchnorm(block)
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def _mean_over_ranks(sums: dict, parallel: DataParallel, device: torch.device) -> dict:
    import torch.distributed as dist

    keys = sorted(sums)
    t = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t, group=parallel.group)
    return {k: float(v) / parallel.world for k, v in zip(keys, t.tolist(), strict=True)}


# ------------------------------------------------------------------------------------------------
# Evaluation


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
        "maps": [[_round(row, 4) for row in m.tolist()] for m in maps],
    }


# ------------------------------------------------------------------------------------------------
# One run, a sweep


def write_json_atomic(path, obj) -> None:
    """Write ``obj`` as JSON to ``path`` via a temporary file in the same folder + os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as fh:
            json.dump(obj, fh, allow_nan=False)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def read_result(path) -> dict | None:
    """The result in ``path`` if it is a complete run's JSON, else None (missing, partial)."""
    try:
        with open(path) as fh:
            result = json.load(fh)
    except (OSError, ValueError):
        return None
    if not isinstance(result, dict) or result.get("status") != "complete":
        return None
    if result.get("format") != RESULT_FORMAT or "config" not in result:
        return None
    return result


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
        "test_accuracy": _accuracy(model, data.test_x.to(device), data.test_y.to(device),
                                   cfg.eval_batch),
        "robustness": evaluate_robustness(model, cfg, data, device, progress=progress),
        "spectra": measure_spectra(model, cfg, data, device),
        "sensitivity": measure_sensitivity(model, cfg, data, device),
    }
    result["wall_seconds"] = time.time() - started
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


def distributed_shard() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) outside torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    rank = int(os.environ.get("RANK", "0") or 0)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} / WORLD_SIZE={world}: expected 0 <= RANK < WORLD_SIZE")
    return rank, world


def sweep_device(device: torch.device | str | None) -> torch.device:
    """The device of this process: under torchrun with CUDA, ``cuda:LOCAL_RANK``."""
    device = torch.device(device) if device is not None else default_device()
    _, world = distributed_shard()
    if world > 1 and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0") or 0))
    return device


def run_sweep(
    configs: Sequence[RunConfig],
    out_dir,
    data: Data,
    *,
    device: torch.device | str | None = None,
    progress: bool = True,
    parallel: str = "runs",
) -> list[tuple[str, str]]:
    """Run every config into ``out_dir/<name>.json``, skipping the complete ones.

    A run is skipped when its JSON exists, is complete and was made with the same config; a
    partial temporary file or a JSON from a different config is replaced. Under torchrun
    (``WORLD_SIZE > 1``), ``parallel="runs"`` makes this process run the configs ``i`` with
    ``i % WORLD_SIZE == RANK``; ``parallel="data"`` trains every run over all processes
    (rank 0 decides what to skip and writes the results; ``out_dir`` must be shared).

    Returns ``[(name, "ran" | "skipped"), ...]`` for this process's runs.
    """
    if parallel not in ("runs", "data"):
        raise ValueError(f"parallel: expected 'runs' or 'data', got {parallel!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rank, world = distributed_shard()
    device = sweep_device(device)
    data_parallel = None
    if world > 1 and parallel == "data":
        for cfg in configs:
            check_data_parallel(cfg, device)
        data_parallel = DataParallel.initialise(device)
        mine = list(configs)
    else:
        mine = [cfg for i, cfg in enumerate(configs) if i % world == rank]
    outcome = []
    bar = tqdm(mine, desc=f"runs (rank {rank}/{world})" if world > 1 else "runs", unit="run",
               disable=not progress or (data_parallel is not None and rank != 0))
    for cfg in bar:
        path = out_dir / f"{cfg.name}.json"
        done = read_result(path)
        skip = done is not None and done["config"] == cfg.to_dict()
        if data_parallel is not None:
            import torch.distributed as dist

            decision = [skip]
            dist.broadcast_object_list(decision, src=0, group=data_parallel.group)
            skip = bool(decision[0])
        if skip:
            outcome.append((cfg.name, "skipped"))
            continue
        bar.set_postfix_str(cfg.name)
        run_experiment(cfg, data, device=device, out_path=path, progress=progress,
                       parallel=data_parallel)
        outcome.append((cfg.name, "ran"))
    bar.close()
    return outcome


def load_results(results_dir) -> list[dict]:
    """Every complete run JSON under ``results_dir`` (recursively), sorted by name."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise FileNotFoundError(f"results_dir: {results_dir} is not a folder")
    found = []
    for path in sorted(results_dir.rglob("*.json")):
        result = read_result(path)
        if result is not None:
            found.append(result)
    return found
