"""backend="cuda" (csrc kernels via CuPy) against the torch backend, on a GPU.

Values and gradients against the float64 oracle (tests/oracle.py, on the same rounded inputs)
within the bounds of their rounding (tests/bounds.py), as every backend is checked in tests/ops;
the PGD step must agree with the torch reference bit for bit. Skipped without a CUDA device;
skipped with the reason when CuPy is missing there.
"""

from __future__ import annotations

import pytest
import torch

from powerlaw_fast import powerlaw_penalty
from tests.devices import raises_validation
from tests.ops.oracle_checks import (
    check_column_mean,
    check_covariance,
    check_covariance_gradient,
    check_penalty,
    check_powerlaw,
    check_spectrum,
)

pytestmark = pytest.mark.gpu

SHAPES = [(2, 10), (300, 257), (37, 100), (100, 37), (1500, 64)]  # 1500 > 512: chunked sums
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def cuda_backend(poisoned):
    from powerlaw_fast.cuda import CupyNotInstalled, require_cuda_backend

    try:
        require_cuda_backend(torch.device("cuda"), torch.float32)
    except CupyNotInstalled as err:
        pytest.skip(str(err))
    # Exact float32 GEMMs on both sides, so the comparison measures the kernels; every buffer
    # a launcher allocates starts as NaN (the shared `poisoned` fixture).
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")

    yield
    torch.set_float32_matmul_precision(previous)


def make_batch(B, N, dtype, *, transpose=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(N, N, generator=g, dtype=torch.float64))
    scales = torch.arange(1, N + 1, dtype=torch.float64) ** -0.5
    x = 3.0 + (torch.randn(B, N, generator=g, dtype=torch.float64) * scales) @ q.T
    x = x.to("cuda", dtype)
    if transpose:  # same values, column-major storage
        x = x.T.contiguous().T
    return x, q.to("cuda", dtype)


@pytest.mark.parametrize("transpose", [False, True], ids=["rowmajor", "colmajor"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,N", SHAPES)
def test_projected_spectrum_and_penalty(B, N, dtype, transpose):
    x, V = make_batch(B, N, dtype, transpose=transpose)
    check_spectrum(x, V, backend="cuda")
    check_penalty(x, V, backend="cuda", tau=min(10, B - 1))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_slice(dtype):
    full, _ = make_batch(64, 90, dtype)
    x = full[:, ::3]  # [64, 30], stride (90, 3)
    V = torch.linalg.qr(torch.randn(30, 30, dtype=torch.float64))[0].to("cuda", dtype)
    check_spectrum(x, V, backend="cuda", what="spectrum of a strided view")


@pytest.mark.parametrize("convention", ["paper", "authors"])
@pytest.mark.parametrize("N", [10, 257, 3000])
def test_powerlaw_penalty_kernel(N, convention):
    g = torch.Generator().manual_seed(N)
    lam = (torch.rand(N, generator=g, dtype=torch.float64) + 0.1) / torch.arange(1, N + 1)
    lam = lam[torch.randperm(N, generator=g)].to("cuda", torch.float32)
    if convention == "authors":
        lam[-3:] = torch.tensor([0.0, -1e-3, 1e-40])  # skipped terms, a subnormal one included
    tau = 9 if convention == "paper" else 8
    check_powerlaw(lam, backend="cuda", tau=tau, beta=2.0, convention=convention)


def test_penalty_status_errors():
    lam = torch.rand(50, device="cuda") + 0.5
    bad = lam.clone()
    bad[7] = float("nan")
    with raises_validation("non-finite"):  # deferred on a GPU: raised by the next call
        powerlaw_penalty(bad, backend="cuda")
    with pytest.raises(ValueError, match="non-finite"):
        powerlaw_penalty(bad, backend="cuda", validate="immediate")
    zeros = lam.clone()
    zeros[torch.argsort(lam)[:45]] = 0.0  # the 10th largest value is 0
    with raises_validation("rank-deficient"):
        powerlaw_penalty(zeros, tau=10, backend="cuda")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,N", SHAPES)
def test_batch_covariance(B, N, dtype):
    x, _ = make_batch(B, N, dtype, transpose=True)
    check_covariance(x, backend="cuda")
    weight = torch.randn(N, N, device="cuda", dtype=torch.float64)
    check_covariance_gradient(x, weight, backend="cuda")


def test_column_sums_are_deterministic():
    from powerlaw_fast.cuda import column_mean_cuda

    x = torch.randn(20000, 300, device="cuda") * 5 + 2
    first = column_mean_cuda(x)
    for _ in range(3):
        assert torch.equal(column_mean_cuda(x), first)
    check_column_mean(first, x)


# --------------------------------------------------------------------------------------------
# The fused PGD step: bit for bit the torch reference
# --------------------------------------------------------------------------------------------
def _bits(t):
    view = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
    return t.view(view[t.dtype])


def assert_same_bits(a, b):
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    assert torch.equal(nan_a, nan_b)
    assert torch.equal(_bits(a)[~nan_a], _bits(b)[~nan_b])


def pgd_inputs(R, S, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x_nat = torch.rand((S, D), generator=g)
    x_adv = (x_nat.repeat(R // S, 1) + 0.3 * torch.randn((R, D), generator=g)).clamp(0, 1)
    grad = torch.randn((R, D), generator=g)
    grad[grad.abs() < 0.3] = 0.0
    grad[0, :4] = torch.tensor([1e-40, -1e-40, -0.0, float("nan")])  # subnormals, -0, NaN
    x_adv[1, :3] = torch.tensor([float("nan"), 1e-39, -0.0])
    x_nat[0, 5] = float("nan")  # a NaN ball bound
    eps = torch.rand((R,), generator=g) * 0.2
    eps[0] = 0.0
    return [t.to("cuda") for t in (x_adv.to(dtype), x_nat.to(dtype), grad.to(dtype))] + [
        eps.to("cuda")
    ]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("R,S,D", [(12, 4, 37), (6, 6, 784), (300, 100, 33)])
def test_pgd_update_bit_exact(R, S, D, dtype):
    from powerlaw_fast.ops.attack_step import pgd_update, pgd_update_reference

    x_adv, x_nat, grad, eps = pgd_inputs(R, S, D, dtype)
    for bounds, (lo, hi) in (((0.0, 1.0), (0.0, 1.0)), (None, (-float("inf"), float("inf")))):
        ref = pgd_update_reference(x_adv, x_nat, grad, eps, 0.0123, lo, hi)
        got = pgd_update(x_adv, x_nat, grad, eps, 0.0123, bounds, backend="cuda")
        assert_same_bits(got, ref)
        # FGSM layout: one shared gradient and natural image per sample, cycled over R rows
        ref = pgd_update_reference(x_nat, x_nat, grad[:S], eps, 0.0123, lo, hi)
        got = pgd_update(x_nat, x_nat, grad[:S], eps, 0.0123, bounds, backend="cuda")
        assert_same_bits(got, ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pgd_update_strided_and_in_place(dtype):
    from powerlaw_fast.ops.attack_step import pgd_update, pgd_update_reference

    x_adv, x_nat, grad, eps = pgd_inputs(20, 20, 50, dtype, seed=1)
    grad_t = grad.T.contiguous().T  # column-major
    x_nat_s = torch.cat([x_nat, x_nat], 1)[:, ::2]  # strided view
    ref = pgd_update_reference(x_adv, x_nat_s, grad_t, eps, 0.05, 0.0, 1.0)
    pgd_update(x_adv, x_nat_s, grad_t, eps, 0.05, (0.0, 1.0), backend="cuda", out=x_adv)
    assert_same_bits(x_adv, ref)


def test_pgd_update_in_a_cuda_graph():
    from powerlaw_fast.cuda import pgd_update_cuda
    from powerlaw_fast.ops.attack_step import pgd_update_reference

    x_adv, x_nat, grad, eps = pgd_inputs(64, 64, 100, torch.float32)
    x_adv = torch.nan_to_num(x_adv)
    out = torch.empty_like(x_adv)
    pgd_update_cuda(x_adv, x_nat, grad, eps, 0.01, 0.0, 1.0, out)  # compile outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        pgd_update_cuda(x_adv, x_nat, grad, eps, 0.01, 0.0, 1.0, out)
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert_same_bits(out, pgd_update_reference(x_adv, x_nat, grad, eps, 0.01, 0.0, 1.0))
