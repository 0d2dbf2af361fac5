"""What defines a run: :class:`RunConfig`, the experiments' variants and :func:`sweep_configs`.

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

>>> from powerlaw_fast.experiments.config import sweep_configs
>>> [c.name for c in sweep_configs("shallow", seeds=1, betas=[2.0])]
['shallow-shallow-vanilla-seed0', 'shallow-shallow-specreg-beta2-seed0']
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field

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


def _tidy(value: float) -> float:
    """``value`` without binary noise: 0.233 * 3 = 0.6990000000000001 becomes 0.699.

    12 significant digits: far below any grid's spacing, far above float64's rounding.
    """
    return float(f"{value:.12g}")


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
        for name in ("fgsm_eps", "pgd_eps", "noise_sigma"):
            setattr(self, name, tuple(_tidy(float(v)) for v in getattr(self, name)))
        self.sensitivity_ranks = tuple(self.sensitivity_ranks)
        for name in ("beta", "lr", "alpha", "beta_jacobian", "pgd_step_size"):
            value = getattr(self, name)
            if isinstance(value, float):
                setattr(self, name, _tidy(value))

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
