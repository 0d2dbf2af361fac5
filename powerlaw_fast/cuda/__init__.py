"""The CUDA C++ backend (``backend="cuda"``): kernels in csrc/*.cu, compiled by NVRTC via CuPy.

Importing this package needs neither CuPy nor a GPU; each kernel file is compiled at its first
launch (then cached in memory and in CuPy's on-disk cache). Install CuPy with
``pip install powerlaw-fast[cuda12]`` or ``powerlaw-fast[cuda13]``.

The kernels cover what cuBLAS does not fuse: column means and sums of squares (deterministic,
no atomics), centring, the g-scaling of the backward, the power-law penalty over the sorted
spectrum, and the fused PGD step. The GEMMs are torch.matmul (cuBLAS). Tensors cross as raw
pointers with their strides (zero copy) and every launch goes on torch's current stream.

Example (needs a CUDA device and CuPy)::

    >>> import torch
    >>> from powerlaw_fast import spec_penalty
    >>> x = torch.randn(512, 256, device="cuda", requires_grad=True)
    >>> V = torch.linalg.eigh(torch.cov(x.detach().T))[1].flip(1)
    >>> spec_penalty(x, V, backend="cuda").backward()
"""

from powerlaw_fast.cuda._requirements import (
    CudaBackendUnavailable,
    CupyNotInstalled,
    cupy_available,
    require_cuda_backend,
)
from powerlaw_fast.cuda.ops import (
    batch_covariance_cuda,
    centred_gram_cuda,
    centred_projection_cuda,
    column_mean_cuda,
    pgd_update_cuda,
    powerlaw_penalty_cuda,
    projected_spectrum_cuda,
    spectrum_backward_cuda,
)

__all__ = [
    "CudaBackendUnavailable",
    "CupyNotInstalled",
    "batch_covariance_cuda",
    "centred_gram_cuda",
    "centred_projection_cuda",
    "column_mean_cuda",
    "cupy_available",
    "pgd_update_cuda",
    "powerlaw_penalty_cuda",
    "projected_spectrum_cuda",
    "require_cuda_backend",
    "spectrum_backward_cuda",
]
