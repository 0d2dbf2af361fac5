"""spec_penalty / projected_spectrum / powerlaw_penalty against float64 literal formulas."""

from __future__ import annotations

import math

import pytest
import torch

from powerlaw_fast import powerlaw_penalty, projected_spectrum, spec_penalty
from powerlaw_fast.baselines import literal_penalty, literal_spectrum
from powerlaw_fast.ops import powerlaw_penalty as powerlaw_penalty_module
from powerlaw_fast.ops import spectral_penalty as sp_module
from powerlaw_fast.ops._settings import Settings
from tests.devices import (
    BACKENDS,
    DEVICE,
    TOL,
    raises_validation,
    rel_err,
    skip_unsupported,
    value_and_grad,
)


def make_batch(
    B, N, *, dtype=torch.float32, mean=0.0, std=1.0, decay=0.5, seed=0, device=DEVICE
):
    """Activations with a power-law spectrum (lam_n ~ n^-2*decay) and the exact eigenbasis V."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(N, N, generator=g, dtype=torch.float64))
    scales = torch.arange(1, N + 1, dtype=torch.float64) ** -decay
    x = mean + std * (torch.randn(B, N, generator=g, dtype=torch.float64) * scales) @ q.T
    return x.to(dtype).to(device), q.to(dtype).to(device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "B,N,tau",
    [(2, 10, 10), (2, 12, 3), (37, 100, 10), (300, 257, 10), (100, 37, 5), (12, 12, 12), (5, 3, 1)],
)
def test_float32_matches_float64_literal(backend, B, N, tau):
    x, V = make_batch(B, N)
    ref_v, ref_g = value_and_grad(literal_penalty, x.double(), V.double(), tau=tau, beta=2.0)
    val, grad = value_and_grad(spec_penalty, x, V, tau=tau, beta=2.0, backend=backend)
    assert spec_penalty(x, V, tau=tau, backend=backend).dtype == torch.float32
    assert math.isclose(float(val), float(ref_v), rel_tol=2e-4, abs_tol=1e-7)
    if ref_g.norm() > 0:
        assert rel_err(grad, ref_g) < 2e-4
    else:
        assert float(grad.abs().max()) == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_every_dtype(backend, dtype):
    skip_unsupported(backend, dtype)
    x, V = make_batch(150, 70, dtype=dtype, seed=1)
    # the reference sees the same rounded inputs: input rounding is not the kernel's error
    ref_v, ref_g = value_and_grad(literal_penalty, x.double(), V.double(), tau=10)
    val, grad = value_and_grad(spec_penalty, x, V, tau=10, backend=backend)
    vtol, gtol = TOL[dtype]
    assert math.isclose(float(val), float(ref_v), rel_tol=vtol)
    assert rel_err(grad, ref_g) < gtol
    out = spec_penalty(x, V, backend=backend)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert out.shape == ()


@pytest.mark.parametrize("backend", BACKENDS)
def test_projected_spectrum_matches_diag_of_covariance(backend):
    x, V = make_batch(91, 57, seed=2)
    ref = literal_spectrum(x.double(), V.double())
    lam = projected_spectrum(x, V, backend=backend)
    assert lam.shape == (57,) and lam.dtype == torch.float32
    torch.testing.assert_close(lam.double(), ref, rtol=1e-5, atol=0)
    # gradient of an arbitrary linear functional of the spectrum
    w = torch.randn(57, dtype=torch.float64, device=DEVICE)

    def ref_fn(t):
        return (literal_spectrum(t, V.double()) * w).sum()

    def ours(t):
        return (projected_spectrum(t, V, backend=backend).double() * w).sum()

    _, ref_g = value_and_grad(ref_fn, x.double())
    _, grad = value_and_grad(ours, x)
    assert rel_err(grad, ref_g) < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    base, V = make_batch(120, 2 * 45, seed=3)
    x = base[:, ::2]  # stride 2 along features
    V = V[::2, ::2].contiguous()
    Vt = V.T.contiguous().T  # column-major V
    assert not x.is_contiguous() and not Vt.is_contiguous()
    ref_v, ref_g = value_and_grad(literal_penalty, x.double(), V.double(), tau=7)
    val, grad = value_and_grad(spec_penalty, x, Vt, tau=7, backend=backend)
    assert math.isclose(float(val), float(ref_v), rel_tol=2e-4)
    assert rel_err(grad, ref_g) < 2e-4
    xt = torch.randn(45, 120, device=DEVICE).T  # transposed batch
    _, ref_g = value_and_grad(literal_penalty, xt.double(), V.double(), tau=7)
    _, grad = value_and_grad(spec_penalty, xt, V, tau=7, backend=backend)
    assert rel_err(grad, ref_g) < 2e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_mean_activations(backend):
    # mean 5, spread 0.1: centring must happen before the products
    x, V = make_batch(200, 64, mean=5.0, std=0.1, seed=4)
    ref = literal_spectrum(x.double(), V.double())
    lam = projected_spectrum(x, V, backend=backend)
    assert float(((lam.double() - ref).abs() / ref).max()) < 1e-3
    ref_v, ref_g = value_and_grad(literal_penalty, x.double(), V.double())
    val, grad = value_and_grad(spec_penalty, x, V, backend=backend)
    assert math.isclose(float(val), float(ref_v), rel_tol=1e-3)
    assert rel_err(grad, ref_g) < 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_steep_spectrum_keeps_relative_accuracy_in_the_tail(backend):
    # lam_n ~ n^-3: every value, the smallest included, keeps float32 relative accuracy
    x, V = make_batch(300, 120, decay=1.5, seed=5)
    ref = literal_spectrum(x.double(), V.double())
    lam = projected_spectrum(x, V, backend=backend)
    assert float(ref.min() / ref.max()) < 1e-5
    assert float(((lam.double() - ref).abs() / ref).max()) < 1e-4
    ref_v, ref_g = value_and_grad(literal_penalty, x.double(), V.double())
    val, grad = value_and_grad(spec_penalty, x, V, backend=backend)
    assert math.isclose(float(val), float(ref_v), rel_tol=1e-3)
    assert rel_err(grad, ref_g) < 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_larger_and_smaller_than_width(backend):
    for B, N in [(40, 90), (90, 40)]:
        x, V = make_batch(B, N, seed=B)
        ref_v, ref_g = value_and_grad(literal_penalty, x.double(), V.double(), alpha=1.3, tau=4)
        val, grad = value_and_grad(spec_penalty, x, V, alpha=1.3, tau=4, backend=backend)
        assert math.isclose(float(val), float(ref_v), rel_tol=2e-4)
        assert rel_err(grad, ref_g) < 2e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_shaped_input_is_flattened(backend):
    x4 = torch.randn(30, 2, 3, 4, device=DEVICE)
    V = torch.linalg.qr(torch.randn(24, 24))[0].to(DEVICE)
    a = spec_penalty(x4, V, tau=3, backend=backend)
    b = spec_penalty(x4.reshape(30, 24), V, tau=3, backend=backend)
    assert torch.equal(a, b)
    leaf = x4.clone().requires_grad_()
    spec_penalty(leaf, V, tau=3, backend=backend).backward()
    assert leaf.grad.shape == x4.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_authors_convention_matches_their_loop(backend):
    """Against the oracle (the authors' loop itself is checked against it in
    tests/test_oracle.py), within the bound of float32 rounding: at tau = 48 only the last
    term is left, r_50 - 1 is 3e-3, and a fixed relative tolerance would turn one ulp of
    another CPU's log/exp into a failure (it did, on an AVX2 EPYC)."""
    from tests import bounds

    x, V = make_batch(80, 50, seed=6)
    u32 = bounds.U[torch.float32]
    for tau in (0, 10, 48):
        kw = dict(alpha=1.0, tau=tau, beta=5.0, convention="authors")
        R, dR, G, dG = bounds.expected_penalty(x, V, u_op=u32, u_acc=u32, u_out=u32, **kw)
        val, grad = value_and_grad(spec_penalty, x, V, backend=backend, **kw)
        bounds.assert_within(val, R, dR, f"value at tau = {tau}")
        bounds.assert_within(grad, G, dG, f"gradient at tau = {tau}")
    # on an ordinary batch the authors' tau is the paper's tau - 1
    a = spec_penalty(x, V, tau=10, convention="authors", backend=backend)
    p = spec_penalty(x, V, tau=11, convention="paper", backend=backend)
    torch.testing.assert_close(a, p)


def test_authors_convention_skips_non_positive_values():
    lam = torch.tensor([4.0, 2.0, 1.0, 0.5, 0.0, 0.0], dtype=torch.float64)
    paper = powerlaw_penalty(lam, tau=2, convention="paper")
    authors = powerlaw_penalty(lam, tau=1, convention="authors")
    # the two zero eigenvalues each cost (0 - 1)^2 = 1 in the paper's sum only
    torch.testing.assert_close(paper - authors, torch.tensor(2.0 / 6, dtype=torch.float64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_power_law_costs_nothing_and_anchor_has_no_gradient(backend):
    lam = 3.0 / torch.arange(1, 41, dtype=torch.float32, device=DEVICE) ** 1.7
    assert float(powerlaw_penalty(lam, alpha=1.7, tau=5, backend=backend)) < 1e-6  # float32 eps
    noisy = lam * (1 + 0.3 * torch.rand(40, generator=torch.Generator().manual_seed(3)).to(DEVICE))
    noisy = noisy.sort(descending=True).values.requires_grad_()
    powerlaw_penalty(noisy, alpha=1.7, tau=5, backend=backend).backward()
    assert float(noisy.grad[4]) == 0.0  # the anchor: kappa carries no gradient
    assert float(noisy.grad[:4].abs().max()) == 0.0  # ranks above tau are not penalised
    assert float(noisy.grad[5:].abs().min()) > 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_powerlaw_penalty_matches_literal_on_shuffled_spectrum(backend):
    from powerlaw_fast.baselines import penalty_from_spectrum as literal_penalty_from_spectrum

    g = torch.Generator().manual_seed(7)
    lam = (torch.rand(300, generator=g, dtype=torch.float64) ** 3 + 1e-3).to(DEVICE)
    ref_v, ref_g = value_and_grad(literal_penalty_from_spectrum, lam, alpha=0.8, tau=17, beta=3.0)
    val, grad = value_and_grad(
        powerlaw_penalty, lam.float(), alpha=0.8, tau=17, beta=3.0, backend=backend
    )
    assert math.isclose(float(val), float(ref_v), rel_tol=1e-5)
    assert rel_err(grad, ref_g) < 1e-5


def test_gradcheck_float64_torch_backend():
    # spec_penalty itself is not gradchecked: kappa is held constant by definition, so its
    # gradient is not the finite difference of its value. Its parts are exact derivatives.
    x, V = make_batch(12, 7, dtype=torch.float64, seed=8)
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda t: projected_spectrum(t, V, backend="torch"), (x,))
    lam = (torch.rand(9, dtype=torch.float64) + 0.1).requires_grad_()

    def with_fixed_anchor(t):
        # the anchor (largest, rank 1) is held out of t, so the function has no kappa path
        return powerlaw_penalty(
            torch.cat([torch.tensor([5.0], dtype=t.dtype), t]),
            alpha=1.2,
            tau=1,
            beta=0.7,
            backend="torch",
        )

    assert torch.autograd.gradcheck(with_fixed_anchor, (lam,))


@pytest.mark.parametrize("B,N", [(2, 10), (129, 130), (37, 257)])
def test_triton_outputs_fully_written(poisoned, B, N):
    x, V = make_batch(B, N, seed=9)
    ref_v, ref_g = value_and_grad(spec_penalty, x, V, backend="torch")
    val, grad = value_and_grad(spec_penalty, x, V, backend="triton")
    assert torch.isfinite(grad).all() and torch.isfinite(val)
    assert rel_err(grad, ref_g) < 2e-4
    lam = projected_spectrum(x, V, backend="triton")
    assert torch.isfinite(lam).all()


def test_triton_is_deterministic():
    x, V = make_batch(300, 200, seed=10)
    first = value_and_grad(spec_penalty, x, V, backend="triton")
    second = value_and_grad(spec_penalty, x, V, backend="triton")
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("precision", ["highest", "high"])
@pytest.mark.parametrize(
    "B,N,tau,mean,decay",  # decay 0.5: on the 1/n law (R small); 1.0: away from it
    [(64, 40, 10, 0.0, 0.5), (100, 37, 5, 3.0, 0.5), (300, 257, 10, 0.5, 0.5),
     (64, 40, 10, 0.0, 1.0), (100, 37, 5, 3.0, 1.0)],
)  # fmt: skip
def test_float32_follows_matmul_precision(backend, precision, B, N, tau, mean, decay):
    """Against the independent oracle (tests/oracle.py) on the same float32 inputs, within the
    bound derived from the rounding the precision permits (tests/bounds.py): "highest", GEMM
    operands exact in float32 (u = 2^-24); "high", TF32 or better (u = 2^-11 per operand, on
    any backend and device: the bound is that of the setting, not of this machine's GEMM).
    The bounds are worst-case (tests/bounds.py): at TF32 the gradient's is loose (the tail
    eigenvalues move by a few percent, so the relu's side and the order of close values are
    unknown there); the value's is a few percent away from the 1/n law."""
    from tests import bounds

    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        x, V = make_batch(B, N, mean=mean, decay=decay, seed=11)
        u_op = bounds.U_TF32 if precision == "high" else bounds.U[torch.float32]
        kw = dict(alpha=1.0, tau=tau, beta=1.0, convention="paper")
        R, dR, G, dG = bounds.expected_penalty(
            x, V, u_op=u_op, u_acc=bounds.U[torch.float32], u_out=bounds.U[torch.float32], **kw
        )
        val, grad = value_and_grad(spec_penalty, x, V, tau=tau, backend=backend)
        bounds.assert_within(val, R, dR, f"value at {precision}")
        bounds.assert_within(grad, G, dG, f"gradient at {precision}")
    finally:
        torch.set_float32_matmul_precision(before)


def test_triton_dot_precision_follows_torch():
    from powerlaw_fast.ops._triton_gemm import dot_precision

    before = torch.get_float32_matmul_precision()
    try:
        for precision, expected in (("highest", "ieee"), ("high", "tf32"), ("medium", "tf32")):
            torch.set_float32_matmul_precision(precision)
            assert dot_precision(torch.float32) == expected
            assert sp_module.plan_for(torch.float32, 64).precision == expected
            # float16 is always computed at TF32 (exact for its 10-bit mantissa)
            assert sp_module.plan_for(torch.float16, 64).precision == "tf32"
    finally:
        torch.set_float32_matmul_precision(before)


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------
def _good():
    return make_batch(20, 12, seed=12)


@pytest.mark.parametrize(
    "kwargs,exc,words",
    [
        (dict(x=torch.randn(12)), ValueError, ["x", "2 dims", "(12,)"]),
        (dict(x=torch.randn(1, 12)), ValueError, ["x", "B = 1"]),
        (dict(x=torch.randint(0, 3, (20, 12))), TypeError, ["x", "floating", "int64"]),
        (dict(x=[[1.0]]), TypeError, ["x", "Tensor", "list"]),
        (dict(V=torch.randn(12, 11)), ValueError, ["V", "[12, 12]", "(12, 11)"]),
        (dict(V=torch.randn(12, 12, dtype=torch.float64)), TypeError, ["V", "float32", "float64"]),
        (dict(tau=0), ValueError, ["tau", "1..12", "0"]),
        (dict(tau=13), ValueError, ["tau", "1..12", "13"]),
        (dict(tau=12, convention="authors"), ValueError, ["tau", "0..11", "12"]),
        (dict(tau=2.5), TypeError, ["tau", "integer", "float"]),
        (dict(alpha=0.0), ValueError, ["alpha", "> 0.0", "0.0"]),
        (dict(alpha=-1), ValueError, ["alpha", "-1"]),
        (dict(beta=-0.5), ValueError, ["beta", ">= 0.0", "-0.5"]),
        (dict(convention="nassar"), ValueError, ["convention", "paper", "nassar"]),
        (dict(backend="jax"), ValueError, ["backend", "jax"]),
    ],
)
def test_bad_input_errors_name_argument_expected_and_given(kwargs, exc, words):
    x, V = _good()
    args = dict(x=x, V=V, tau=3)
    args.update(kwargs)
    with pytest.raises(exc) as info:
        spec_penalty(args.pop("x"), args.pop("V"), **args)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_device_mismatch_is_reported():
    x, V = _good()
    with pytest.raises(ValueError, match=f"V: expected device {x.device.type}.*got meta"):
        spec_penalty(x, V.to("meta"))


# the interpreter's numpy warns on the inf/NaN arithmetic these inputs are meant to cause
@pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_activations_raise(backend, bad, deferral):
    x, V = _good()
    x[3, 4] = bad
    with raises_validation("x: expected finite activations"):
        spec_penalty(x, V, tau=3, backend=backend)
    with raises_validation("x: expected finite activations"):
        projected_spectrum(x, V, backend=backend)


@pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")
@pytest.mark.parametrize("backend", BACKENDS)
def test_rank_deficient_batch_raises(backend, deferral):
    # only 3 units vary: with V = I the 4th largest spectrum value is exactly zero
    x = torch.zeros(20, 12, device=DEVICE)
    x[:, :3] = torch.randn(20, 3, device=DEVICE)
    x[:, 3:] = 0.25
    V = torch.eye(12, device=DEVICE)
    with raises_validation("rank-deficient for tau = 4"):
        spec_penalty(x, V, tau=4, backend=backend)
    spec_penalty(x, V, tau=3, backend=backend, validate="immediate")  # the 3rd value is fine
    with raises_validation("rank-deficient"):
        spec_penalty(torch.ones(8, 12, device=DEVICE), V, tau=1, backend=backend)
    # a constant batch whose mean does not round exactly: its spectrum is rounding noise only
    constant = (torch.full((37, 12), 0.1) + torch.arange(12) * 0.3).to(DEVICE)
    g = torch.Generator().manual_seed(0)
    Q = torch.linalg.qr(torch.randn(12, 12, generator=g))[0].to(DEVICE)
    assert float(projected_spectrum(constant, Q, backend=backend).abs().max()) == 0.0
    with raises_validation("rank-deficient"):
        spec_penalty(constant, Q, tau=1, backend=backend)


def test_triton_backend_refuses_float64_clearly():
    x, V = make_batch(20, 12, dtype=torch.float64)
    with pytest.raises(TypeError, match="backend='triton'.*float64"):
        spec_penalty(x, V, backend="triton")


def test_validate_false_skips_the_check():
    x, V = _good()
    x[0, 0] = float("nan")
    assert torch.isnan(spec_penalty(x, V, tau=3, backend="torch", validate=False))


# --------------------------------------------------------------------------------------------
# torch.library registration
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    """Every op family's custom ops (forward and backward) pass torch.library.opcheck."""
    x, V = make_batch(40, 24, seed=13)
    x.requires_grad_()
    settings = Settings(backend=backend, anchor=9, alpha=1.0, beta=1.0, skip_nonpositive=False,
                        validate="immediate", source="x", tau=10)  # fmt: skip
    op = sp_module.SPECTRAL_PENALTY
    torch.library.opcheck(op.custom_op, ([x, V], *settings))
    scratch, z, count = op.custom_op([x.detach(), V], *settings)
    grads = [torch.tensor(0.5, device=DEVICE), torch.randn(24, device=DEVICE)]
    torch.library.opcheck(op.backward_op, (grads, [z, V, scratch, count], [x.detach()],
                                           *settings))  # fmt: skip
    torch.library.opcheck(op.backward_op, ([grads[0], None], [z, V, scratch, count],
                                           [x.detach()], *settings))  # fmt: skip
    lam = projected_spectrum(x.detach(), V).requires_grad_()
    op = powerlaw_penalty_module.POWERLAW_PENALTY
    settings = settings._replace(source="lam")
    torch.library.opcheck(op.custom_op, ([lam], *settings))
    (scratch,) = op.custom_op([lam.detach()], *settings)
    torch.library.opcheck(op.backward_op, ([torch.tensor(2.0, device=DEVICE)], [scratch],
                                           [lam.detach()], *settings))  # fmt: skip


def test_torch_compile_fullgraph_torch_backend():
    x, V = make_batch(64, 32, seed=14)

    def step(t):
        lam = projected_spectrum(t, V, backend="torch")
        return spec_penalty(t, V, tau=5, backend="torch") * 2.0 + lam[3] + powerlaw_penalty(
            lam, tau=4, backend="torch"
        )

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    val, grad = value_and_grad(compiled, x)
    ref_v, ref_g = value_and_grad(step, x)
    torch.testing.assert_close(val, ref_v)
    torch.testing.assert_close(grad, ref_g)
