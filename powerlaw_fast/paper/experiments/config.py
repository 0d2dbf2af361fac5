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

:data:`PRESETS` holds the three settings ``reproduce --preset`` offers (``paper``: the paper as
written, the default; ``authors``: the values of the authors' code; ``fresh-basis``: the
setting under which the regularised spectrum follows 1/n, issue 15), each with why.

>>> from powerlaw_fast.paper.experiments.config import sweep_configs
>>> [c.name for c in sweep_configs("shallow", seeds=1, betas=[2.0])]
['shallow-vanilla-seed0', 'shallow-specreg-beta2-seed0']
"""

from __future__ import annotations

import dataclasses
import json
import re
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
ACTIVATIONS = ("sigmoid", "tanh", "relu")
BATCH_NORM_POSITIONS = ("pre", "post")
BASIS_UPDATES = ("epoch", "running", "tracked", "random")
SCHEME_PATTERN = r"[a-z0-9]+(-[a-z0-9]+)*"  # RunConfig.scheme: a file-name-safe word

# ``reproduce --preset NAME``: RunConfig fields, and why. ``activation`` and
# ``batch_norm_position`` concern the shallow net (sec. 4.1); the MLP / CNN of sec. 4.2-4.3 are
# tanh networks in every preset (as in the authors' code). Explicit command-line options win.
PRESETS: dict[str, dict] = {
    "paper": {
        "fields": dict(activation="sigmoid", batch_norm_position="pre", lr=1e-4,
                       batch_size=None, epochs=50, basis_update="epoch", convention="paper"),
        "why": "the paper as written (sec. 3.2, 4.1): sigmoid units with batch norm before the "
        "nonlinearity (the sigmoid output is regularised), Adam lr 1e-4, batch 1.5 x the widest "
        "regularised layer, V refreshed once per epoch from the whole training set, 50 epochs. "
        "At full scale (H200, 3 seeds) it gives the robustness gain but not the 1/n spectrum: "
        "1000 steps at lr 1e-4 leave the net undertrained and the regularised spectra lie on the "
        "vanilla one.",
    },
    "authors": {
        "fields": dict(activation="tanh", batch_norm_position="post", lr=1e-3,
                       batch_size=3500, epochs=50, basis_update="epoch", convention="authors"),
        "why": "the values of the authors' code (josuenassar/power_law): their 'sigmoid' network "
        "uses tanh, batch norm comes after the nonlinearity so the regularised representation "
        "is the batch-norm output, Adam lr 1e-3, batch 3500, V refreshed once per epoch from "
        "eval-mode activations, tau 0-indexed with non-positive terms skipped (convention "
        "'authors'). With a basis that stale at lr 1e-3 the spectrum does not follow 1/n.",
    },
    "fresh-basis": {
        "fields": dict(activation="tanh", batch_norm_position="pre", lr=1e-3, batch_size=None,
                       epochs=50, basis_update="tracked", basis_every=1, basis_momentum=0.1,
                       convention="paper"),
        "why": "the setting under which the regularised spectrum follows 1/n (issue 15; "
        "fitted exponent over ranks 10-N 1.06 at width 500 after 10 epochs, 3 seeds, and 1.16 "
        "at width 2000 after 50 epochs, 2 seeds, its penalty still falling): a "
        "basis at most one step old, the eigenbasis of a running average (weight 0.1 on the "
        "newest batch) of the training batches' covariances, followed every step by the "
        "tracked update (issue 26: a few GEMMs instead of an eigendecomposition, with the "
        "same trained spectrum as the exact per-step eigendecomposition, --basis-update "
        "running, which made the numbers above); a basis refreshed once per epoch lets the "
        "net satisfy the penalty by rotating its spectrum, and at lr 1e-3 even a refresh "
        "every 5 steps moves only ranks 10-100. tanh (what the authors' network uses) "
        "reaches 1/n more easily than sigmoid; batch norm before it, the tanh output "
        "regularised; Adam lr 1e-3, batch 1.5 N; at least 10 epochs (the tail still flattens "
        "at 10). It reproduces the spectrum of Fig. 2A, not its robustness: at reduced scale "
        "these nets were less robust than vanilla ones.",
    },
}


def preset_fields(name: str) -> dict:
    """The RunConfig fields of ``reproduce --preset name`` (a copy)."""
    if name not in PRESETS:
        raise ValueError(f"preset: expected one of {tuple(PRESETS)}, got {name!r}")
    return dict(PRESETS[name]["fields"])


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
        activation: ShallowNet's nonlinearity, ``"sigmoid"`` (the paper's), ``"tanh"`` (the
            authors' code) or ``"relu"``; ``None`` = the architecture's own (stored as it):
            sigmoid for ShallowNet; the MLP and CNN are tanh networks and take only ``"tanh"``.
        batch_norm_position: ShallowNet's batch norm ``"pre"`` (between the linear map and the
            nonlinearity, so the nonlinearity's output is regularised; the default) or
            ``"post"`` (after the nonlinearity, the batch-norm output regularised, as in the
            authors' code).
        basis_update: ``"epoch"`` (the paper's refresh at each epoch start, plus every
            ``refresh_every`` steps), ``"running"`` (every ``basis_every`` steps the
            eigenbasis of a running average of the training batches' covariances, weight
            ``basis_momentum`` on the newest; see :class:`~powerlaw_fast.SpectralRegularizer`),
            ``"tracked"`` (the same running average's eigenbasis followed by small rotations
            each step instead of an eigendecomposition) or ``"random"`` (a control, issue 15:
            a fixed random orthogonal V per layer, drawn from the run's seed and never
            refreshed, so the penalty shapes the variances along directions unrelated to the
            representation's eigenvectors). Variants without the
            spectral penalty store the defaults of the basis fields and no ``scheme``.
        limit_train, limit_test: use the first images of each split (``None`` = all).
        fgsm_eps, pgd_eps, noise_sigma: attack grids (an empty grid skips that attack).
        pgd_steps, pgd_step_size: PGD settings (paper: 40 steps of 0.01).
        refresh_every: refresh the eigenbases every this many steps as well as at each epoch
            start (``None``: at each epoch start only, the paper's scheme). Short runs with a
            large learning rate need it: the basis goes stale within an epoch.
        sensitivity_ranks: eigenvalue ranks of the saved sensitivity maps (eq. 9), last hidden
            layer; ranks above its width are dropped.
        eval_batch: rows per evaluation forward pass.
        scheme: the name of a training scheme that sets these runs apart from others of the
            same variant and beta (e.g. ``"fresh-basis"``, the demo's running basis):
            lower-case letters, digits and ``-``; it joins the run's file name and its curve's
            label. ``None``: none.
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
    activation: str | None = None
    batch_norm_position: str = "pre"
    basis_update: str = "epoch"
    basis_every: int = 1
    basis_momentum: float = 0.1
    scheme: str | None = None

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
        if not self.regularised:  # the basis settings mean nothing without the penalty
            self.beta = None
            self.basis_update, self.basis_every, self.basis_momentum = "epoch", 1, 0.1
            self.scheme = None
        if self.activation is not None and self.activation not in ACTIVATIONS:
            raise ValueError(f"activation: expected one of {ACTIVATIONS} or None, got "
                             f"{self.activation!r}")
        if self.arch != "shallow" and self.activation not in (None, "tanh"):
            raise ValueError(f"activation: the {self.arch} is a tanh network, got "
                             f"{self.activation!r}")
        if self.activation is None:  # the architecture's own
            self.activation = "sigmoid" if self.arch == "shallow" else "tanh"
        if self.batch_norm_position not in BATCH_NORM_POSITIONS:
            raise ValueError(f"batch_norm_position: expected one of {BATCH_NORM_POSITIONS}, "
                             f"got {self.batch_norm_position!r}")
        if self.basis_update not in BASIS_UPDATES:
            raise ValueError(f"basis_update: expected one of {BASIS_UPDATES}, got "
                             f"{self.basis_update!r}")
        if self.basis_update != "epoch" and self.refresh_every is not None:
            raise ValueError(f"refresh_every: applies to basis_update='epoch' only, got "
                             f"basis_update={self.basis_update!r}")
        if not (isinstance(self.basis_momentum, (int, float)) and 0 < self.basis_momentum <= 1):
            raise ValueError(f"basis_momentum: expected a number in (0, 1], got "
                             f"{self.basis_momentum!r}")
        if self.scheme is not None and not (
            isinstance(self.scheme, str)
            and re.fullmatch(SCHEME_PATTERN, self.scheme)
        ):
            raise ValueError(f"scheme: expected lower-case letters, digits and '-' (e.g. "
                             f"'fresh-basis') or None, got {self.scheme!r}")
        for name in ("epochs", "pgd_steps", "eval_batch", "basis_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {getattr(self, name)!r}")
        for name in ("fgsm_eps", "pgd_eps", "noise_sigma"):
            setattr(self, name, tuple(_tidy(float(v)) for v in getattr(self, name)))
        self.sensitivity_ranks = tuple(self.sensitivity_ranks)
        for name in ("beta", "lr", "alpha", "beta_jacobian", "pgd_step_size", "basis_momentum"):
            value = getattr(self, name)
            if isinstance(value, float):
                setattr(self, name, _tidy(value))

    @property
    def regularised(self) -> bool:
        return self.variant in SPECREG_VARIANTS

    @property
    def name(self) -> str:
        """File stem of the run, e.g. ``shallow-specreg-beta2-seed0`` (with a scheme:
        ``shallow-specreg-fresh-basis-beta5-seed0``; another architecture:
        ``whitening-mlp-vanilla-seed0``). The architecture is named only when it differs
        from the experiment's name, so the shallow net's runs are not ``shallow-shallow-...``
        (what older versions wrote, :attr:`legacy_name`, is still read on resume)."""
        return self._stem(self.arch != self.experiment)

    @property
    def legacy_name(self) -> str:
        """The file stem older versions wrote, with the architecture always named
        (``shallow-shallow-specreg-beta2-seed0``); :func:`~.sweep.run_sweep` still resumes
        from it. Equal to :attr:`name` where the architecture differs from the experiment."""
        return self._stem(True)

    def _stem(self, with_arch: bool) -> str:
        parts = [self.experiment, *([self.arch] if with_arch else []),
                 self.variant.replace("+", "_")]
        if self.scheme is not None:
            parts.append(self.scheme)
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
