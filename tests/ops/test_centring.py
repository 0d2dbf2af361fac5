"""ops/centring.py: column means, the centring pass and column moments, each launcher against
its plain-torch twin and a float64 evaluation, on odd shapes, strided inputs, large means and
every supported dtype, with every launcher output NaN-poisoned before the launch."""

from __future__ import annotations

import math

import pytest
import torch

from powerlaw_fast.ops import centring
from tests.conftest import record_launches
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


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_column_moments_are_summed_in_the_accumulation_dtype(poisoned, dtype):
    """float32 sums for 16/32-bit z (float64 for float64 z, torch twin): never in z's own
    16-bit dtype, whose 8 or 11 bits would lose most of a 300-term sum."""
    B, N = 300, 7
    z = _batch(B, N, dtype, mean=0.5)
    z64 = z.double().cpu()  # the same rounded inputs
    for fn in _fns("column_moments"):
        if dtype == torch.float64 and fn is not centring.column_moments_torch:
            continue  # float64 runs on the torch backend
        moments = fn(z)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        assert moments.dtype == acc, fn
        s1, s2 = moments.double().sum(1).cpu()
        u = 2.0**-53 if dtype == torch.float64 else 2.0**-24
        bound = 2 * B * u  # gamma_B, twice for the second-order terms
        assert torch.allclose(s1, z64.sum(0), rtol=0, atol=bound * float(z64.abs().sum(0).max()))
        assert torch.allclose(s2, (z64 * z64).sum(0), rtol=bound, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_centre_columns_subtracts_in_float32_whatever_the_mean_dtype(poisoned, dtype):
    """A 16-bit mean is subtracted in float32 too: the float32 difference of two 16-bit numbers
    rounded once to the float32 result, not first to the 16-bit dtype."""
    x = _batch(37, 5, dtype)
    mean = x.float().mean(0).to(dtype)
    exact = (x.double() - mean.double()).float()  # exact in float64, rounded once
    assert not torch.equal(exact, exact.to(dtype).float())  # a 16-bit difference would differ
    for fn in _fns("centre_columns"):
        got = fn(x, mean, torch.float32)
        assert got.dtype == torch.float32 and torch.equal(got.cpu(), exact.cpu()), fn


def test_centre_columns_torch_keeps_float64_in_float64():
    x = _batch(37, 5, torch.float64, mean=3.0).cpu()
    mean = x.mean(0)
    got = centring.centre_columns_torch(x, mean, torch.float64)
    assert got.dtype == torch.float64 and torch.equal(got, x - mean)


@pytest.fixture
def launches(monkeypatch):
    """The centring kernels recorded instead of run (tests/conftest.py)."""
    names = ("_column_mean_kernel", "_centre_columns_kernel", "_column_moments_kernel")
    return record_launches(monkeypatch, centring, names)


@pytest.mark.parametrize("N", [1, 300, 4096, 8447, 8448, 16384, 32768, 33023, 33024, 100_000])
def test_column_mean_launch_takes_about_256_column_blocks(launches, N):
    """The column block of column_mean's kernel: the power of two at or above N // 256 columns
    (about 256 programs on a wide layer), within 16..128 (a power of two, as tl.arange needs),
    and the grid covers every column. The launch is recorded, not run."""
    centring.column_mean_triton(torch.zeros(1, N).expand(3, N))  # stride 0: no memory behind it
    ((_, grid, _, kwargs),) = launches
    block = kwargs["BLOCK_N"]
    per_256 = 2 ** math.ceil(math.log2(max(1, N // 256)))
    assert block == min(128, max(16, per_256)), (N, block)
    assert grid == (-(-N // block),)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_launchers_allocate_their_outputs_on_the_input_device(launches, dtype):
    """On the meta device (launches recorded, no data): each launcher's output is made on its
    input's device, with the documented shape and dtype, and is the buffer the kernel writes."""
    B, N = 1000, 70
    x = torch.empty(B, N, dtype=dtype, device="meta")
    mean = torch.empty(N, device="meta")
    outputs = [centring.column_mean_triton(x), centring.centre_columns_triton(x, mean, dtype),
               centring.column_moments_triton(x)]
    expected = [((N,), torch.float32), ((B, N), dtype), ((2, 2, N), torch.float32)]
    checks = zip(outputs, expected, launches, strict=True)  # one launch per launcher
    for out, (shape, out_dtype), (name, _, args, _) in checks:
        assert out.device.type == "meta", name
        assert out.shape == shape and out.dtype == out_dtype, name
        assert any(a is out for a in args), name
