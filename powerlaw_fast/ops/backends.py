"""One table of implementations for every op: ``(stage, backend) -> function``.

A leaf: it imports nothing of the package. Each op family file registers, for every stage it
owns, its plain-torch twin, its Triton launcher (kernels imported on the first launch) and its
CUDA C++ row (the wrappers of :mod:`powerlaw_fast.cuda`, imported on first use), so importing
the package needs neither triton, CuPy nor a GPU.
Resolving the user's ``backend=`` argument to one of these names is
:func:`powerlaw_fast._backend.resolve_backend`.

Stages (shapes for a batch ``x [B, N]``):

=====================  ==========================================================================
``column_mean``        ``x -> mean [N]`` float32 (float64 for float64 x)
``centred_projection`` ``(x, V, mean, plan) -> (moments [2, M, N], Z [B, N])``: column sums of Z
                       and of Z * Z over M row-blocks, ``Z = (x - mean) V``
``spectrum_penalty``   ``(moments or lam, count, penalty settings) -> scratch`` (the layout of
                       :mod:`powerlaw_fast.ops._layout`; :mod:`powerlaw_fast.ops.powerlaw_penalty`)
``backprojection``     ``(Z, coef, grad_out, V, scale, out_dtype, plan) -> grad_x [B, N]``
``centred_gram``       ``(x, mean, scale) -> scale (x - mean)^T (x - mean)`` ``[N, N]``
``layers_penalty``     ``(xs, Vs, per-layer settings) -> (sum of the layers' penalties, [lam_l])``:
                       the grouped kernels or the per-layer loop
                       (:mod:`powerlaw_fast.ops.grouped_penalty`)
``pgd_update``         ``(x_adv, x_nat, grad, eps_rows, step, lo, hi, out) -> out``: one fused
                       PGD/FGSM step (:mod:`powerlaw_fast.ops.attack_step`)
``block_eigh``         ``A [K, b, b] -> (values [K, b], vectors [K, b, b])``, b <= 64: small
                       symmetric eigendecompositions (:mod:`powerlaw_fast.ops.block_eigh`)
=====================  ==========================================================================

Example::

    >>> from powerlaw_fast.ops import backends
    >>> import powerlaw_fast.ops.spectral_penalty  # registers its stages
    >>> backends.implementation("column_mean", "torch").__name__
    'column_mean_torch'
"""

from __future__ import annotations

from collections.abc import Callable

_TABLE: dict[tuple[str, str], Callable] = {}


def register(stage: str, backend: str):
    """Decorator: ``fn`` implements ``stage`` for ``backend``."""

    def add(fn: Callable) -> Callable:
        _TABLE[(stage, backend)] = fn
        return fn

    return add


def implementation(stage: str, backend: str) -> Callable:
    """The function that runs ``stage`` on ``backend`` (an already resolved name)."""
    fn = _TABLE.get((stage, backend))
    if fn is None:
        raise NotImplementedError(f"backend={backend!r} has no implementation of {stage!r}")
    return fn
