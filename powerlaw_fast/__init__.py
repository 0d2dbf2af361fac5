"""powerlaw_fast: fused GPU ops for the 1/n spectral regulariser of Nassar et al. (NeurIPS 2020).

>>> import torch
>>> from powerlaw_fast import spec_penalty
>>> x = torch.randn(256, 64, requires_grad=True)
>>> V = torch.linalg.eigh(torch.cov(x.detach().T))[1].flip(1)
>>> spec_penalty(x, V).backward()
"""

from powerlaw_fast._version import __version__ as __version__
from powerlaw_fast.attacks import RobustnessCurve, fgsm, pgd, robustness_curve, white_noise
from powerlaw_fast.ops.attack_step import pgd_update
from powerlaw_fast.ops.covariance import batch_covariance
from powerlaw_fast.ops.powerlaw_penalty import powerlaw_penalty
from powerlaw_fast.ops.spectral_penalty import projected_spectrum, spec_penalty
from powerlaw_fast.ops.status import raise_pending_errors
from powerlaw_fast.paper.datasets import MNISTFileError, load_mnist, mnist_loaders
from powerlaw_fast.paper.experiments import RunConfig, run_experiment, run_sweep, sweep_configs
from powerlaw_fast.paper.jacobian import jacobian_penalty
from powerlaw_fast.paper.models import CNN, MLP, ShallowNet
from powerlaw_fast.paper.sensitivity import sensitivity_maps
from powerlaw_fast.paper.whitening import Whiten
from powerlaw_fast.training import (
    CovarianceAccumulator,
    SpectralRegularizer,
    effective_dimension,
    fit_power_law,
    layer_spectrum,
)

__all__ = [
    "CNN",
    "MLP",
    "CovarianceAccumulator",
    "MNISTFileError",
    "RobustnessCurve",
    "RunConfig",
    "ShallowNet",
    "SpectralRegularizer",
    "Whiten",
    "batch_covariance",
    "effective_dimension",
    "fgsm",
    "fit_power_law",
    "jacobian_penalty",
    "layer_spectrum",
    "load_mnist",
    "mnist_loaders",
    "pgd",
    "pgd_update",
    "powerlaw_penalty",
    "projected_spectrum",
    "raise_pending_errors",
    "robustness_curve",
    "run_experiment",
    "run_sweep",
    "sensitivity_maps",
    "spec_penalty",
    "sweep_configs",
    "white_noise",
]
