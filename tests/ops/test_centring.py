"""ops/centring.py: column means, the centring pass and column moments, each launcher against
its plain-torch twin and a float64 evaluation, on odd shapes, strided inputs, large means and
every supported dtype, with every launcher output NaN-poisoned before the launch."""

from __future__ import annotations

import pytest
import torch

from powerlaw_fast.ops import centring
from tests.devices import BACKENDS, DEVICE

SHAPES = [(1, 1), (2, 3), (37, 5), (130, 257), (513, 40)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EPS = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def _batch(B, N, dtype, *, mean=0.0, strided=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = mean + torch.randn(B, N, generator=g, dtype=torch.float64)
    if strided:  # every other column of a wider buffer, and column-major
        x = torch.cat([x, x], dim=1)[:, ::2].T.contiguous().T
    return x.to(dtype).to(DEVICE)


def _fns(name):
    return [getattr(centring, f"{name}_{b}") for b in BACKENDS if b in ("torch", "triton")]


@pytest.mark.parametrize("B,N", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("strided", [False, True])
def test_column_mean(poisoned, B, N, dtype, strided):
    x = _batch(B, N, dtype, mean=5.0, strided=strided)
    exact = x.double().mean(0)
    for fn in _fns("column_mean"):
        got = fn(x)
        assert got.dtype == torch.float32 and got.shape == (N,)
        # float32 sums of B values: at most ~ B eps_32 relative to the sum of |x| (a bound
        # far wider than the usual sqrt(B); a wrong mean, e.g. / (B - 1), misses it by 1 / B)
        bound = 2 * B * 2.0**-24 * x.double().abs().mean(0) + 2.0**-24 * exact.abs()
        assert bool(((got.double().cpu() - exact.cpu()).abs() <= bound.cpu()).all()), fn


@pytest.mark.parametrize("B,N", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_centre_columns_rounds_once_to_the_operand_dtype(poisoned, B, N, dtype):
    x = _batch(B, N, dtype, mean=100.0, strided=True)
    mean = x.float().mean(0)
    exact = (x.double() - mean.double()).to(dtype)  # the float32 difference, rounded once
    for fn in _fns("centre_columns"):
        got = fn(x, mean, dtype)
        assert got.dtype == dtype and got.is_contiguous()
        if fn is centring.centre_columns_triton and DEVICE.type == "cpu" and (
            dtype == torch.bfloat16
        ):
            # Triton's interpreter casts float32 to bfloat16 by truncation (triton 3.9's
            # _convert_float, no rounding mode); compiled kernels round to nearest even
            ulp = exact.double().abs() * 2.0**-7
            assert bool(((got.double() - exact.double()).abs() <= ulp).all().cpu()), fn
            assert bool((got.double().abs() <= exact.double().abs()).all().cpu()), fn
            continue
        assert torch.equal(got.cpu(), exact.cpu()), fn


@pytest.mark.parametrize("B,N", SHAPES)
def test_column_moments(poisoned, B, N):
    z = _batch(B, N, torch.float32, mean=0.5, strided=True)
    for fn in _fns("column_moments"):
        moments = fn(z)
        assert moments.dtype == torch.float32 and moments.shape[0] == 2 and moments.shape[2] == N
        s1, s2 = moments.double().sum(1).cpu()
        z64 = z.double().cpu()
        bound = 2 * B * 2.0**-24
        assert torch.allclose(s1, z64.sum(0), rtol=0, atol=bound * float(z64.abs().sum(0).max()))
        assert torch.allclose(s2, (z64 * z64).sum(0), rtol=bound, atol=0)
