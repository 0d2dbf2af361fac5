"""powerlaw_fast: fused GPU ops for the 1/n spectral regulariser of Nassar et al. (NeurIPS 2020).

>>> import torch
>>> from powerlaw_fast import spec_penalty
>>> x = torch.randn(256, 64, requires_grad=True)
>>> V = torch.linalg.eigh(torch.cov(x.detach().T))[1].flip(1)
>>> spec_penalty(x, V).backward()
"""

from powerlaw_fast.ops.covariance import batch_covariance
from powerlaw_fast.ops.spec_penalty import powerlaw_penalty, projected_spectrum, spec_penalty

__version__ = "0.1.0"

__all__ = [
    "batch_covariance",
    "powerlaw_penalty",
    "projected_spectrum",
    "spec_penalty",
]
