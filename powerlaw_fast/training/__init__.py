"""Training with the 1/n spectral regulariser, and the spectrum tools it and the paper share.

- :mod:`.regulariser`: :class:`SpectralRegularizer` (forward hooks on the chosen layers, the
  eigenbasis refresh over a data set, the per-layer penalty through :mod:`powerlaw_fast.ops`)
- :mod:`.accumulator`: :class:`CovarianceAccumulator`, a layer's covariance over a data set in
  streaming float64 sums, and its descending eigendecomposition
- :mod:`.capture`: running a model up to one layer (:func:`layer_spectrum`)
- :mod:`.fits`: the power-law exponent and the effective dimension of a spectrum
"""

from .accumulator import CovarianceAccumulator
from .capture import layer_spectrum
from .fits import effective_dimension, fit_power_law
from .regulariser import SpectralRegularizer

__all__ = [
    "CovarianceAccumulator",
    "SpectralRegularizer",
    "effective_dimension",
    "fit_power_law",
    "layer_spectrum",
]
