"""spec_penalty / projected_spectrum / powerlaw_penalty against the float64 oracle (tests/oracle.py)
within the bounds of their rounding (tests/bounds.py), and their host behaviour."""

from __future__ import annotations

import pytest
import torch

from powerlaw_fast import powerlaw_penalty, projected_spectrum, raise_pending_errors, spec_penalty
from powerlaw_fast.ops import powerlaw_penalty as powerlaw_penalty_module
from powerlaw_fast.ops import spectral_penalty as sp_module
from powerlaw_fast.ops import status
from powerlaw_fast.ops._settings import Settings
from powerlaw_fast.ops.spectral_penalty import penalty_and_spectrum
from tests import bounds
from tests.devices import (
    BACKENDS,
    DEVICE,
    raises_validation,
    skip_unsupported,
    value_and_grad,
)
from tests.ops.oracle_checks import (
    check_penalty,
    check_powerlaw,
    check_spectrum,
    expected_penalty,
    expected_weighted_gradient,
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
    _, grad = check_penalty(x, V, backend=backend, tau=tau, beta=2.0)
    if tau == N:  # the anchor's own term only: identically 0 in value and slope
        assert float(grad.abs().max()) == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_every_dtype(backend, dtype):
    skip_unsupported(backend, dtype)
    x, V = make_batch(150, 70, dtype=dtype, seed=1)
    # the oracle sees the same rounded inputs: input rounding is not the kernel's error;
    # the value's dtype (float32, float64 for float64) and the gradient's (x's) are checked too
    check_penalty(x, V, backend=backend, tau=10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_projected_spectrum_matches_diag_of_covariance(backend):
    x, V = make_batch(91, 57, seed=2)
    # values, and the gradient of an arbitrary linear functional of the spectrum
    w = torch.randn(57, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    check_spectrum(x, V, backend=backend, weights=w)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    dense, V = make_batch(120, 45, seed=3)
    wide = torch.zeros(120, 2 * 45, device=DEVICE)
    wide[:, ::2] = dense
    x = wide[:, ::2]  # stride 2 along features
    Vt = V.T.contiguous().T  # column-major V
    assert not x.is_contiguous() and not Vt.is_contiguous()
    check_penalty(x, Vt, backend=backend, tau=7)
    xt = torch.randn(45, 120, device=DEVICE).T  # transposed batch
    check_penalty(xt, V, backend=backend, tau=7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_mean_activations(backend):
    # mean 5, spread 0.1: centring must happen before the products
    x, V = make_batch(200, 64, mean=5.0, std=0.1, seed=4)
    check_spectrum(x, V, backend=backend)
    check_penalty(x, V, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_steep_spectrum_keeps_relative_accuracy_in_the_tail(backend):
    # lam_n ~ n^-3: every value, the smallest included, keeps float32 relative accuracy
    x, V = make_batch(300, 120, decay=1.5, seed=5)
    lam = check_spectrum(x, V, backend=backend)
    assert float(lam.min() / lam.max()) < 1e-5
    check_penalty(x, V, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_larger_and_smaller_than_width(backend):
    for B, N in [(40, 90), (90, 40)]:
        x, V = make_batch(B, N, seed=B)
        check_penalty(x, V, backend=backend, alpha=1.3, tau=4)


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
    g = torch.Generator().manual_seed(7)
    lam = (torch.rand(300, generator=g, dtype=torch.float64) ** 3 + 1e-3).float()
    check_powerlaw(lam, backend=backend, alpha=0.8, tau=17, beta=3.0)


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
    # every buffer starts as NaN: an element a kernel skips fails the oracle's comparison
    x, V = make_batch(B, N, seed=9)
    check_penalty(x, V, backend="triton")
    check_spectrum(x, V, backend="triton")


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


# --------------------------------------------------------------------------------------------
# Gradients of a loss that weighs the penalty and uses the spectrum
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_the_gradient_carries_the_losss_weight_on_the_penalty(backend, op_path):
    """dLoss/dR reaches the backprojection (eagerly it scales there: no extra launch)."""
    x, V = make_batch(60, 20, seed=21)
    G, dG = expected_weighted_gradient(x, V, backend=backend, weight_R=-2.5, tau=4)
    leaf = x.clone().requires_grad_()
    (-2.5 * spec_penalty(leaf, V, tau=4, backend=backend)).backward()
    bounds.assert_within(leaf.grad, G, dG, "gradient of -2.5 R")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_loss_of_the_penalty_and_the_spectrum_together(backend, op_path):
    """Both outputs of one call in one loss: dLoss/dlam and dLoss/dR folded into one
    coefficient per column, one backprojection."""
    x, V = make_batch(60, 20, seed=22)
    _, _, settings = sp_module._settings(
        x, V, alpha=1.0, tau=4, beta=2.0, convention="paper", backend=backend,
        validate="immediate", process_group=None, compute_dtype=None, source="x",
    )  # fmt: skip
    w = torch.linspace(-1.0, 1.0, 20, dtype=torch.float64)
    leaf = x.clone().requires_grad_()
    R, lam = sp_module.SPECTRAL_PENALTY([leaf, V], settings)
    (1.5 * R + (lam.double() * w.to(DEVICE)).sum()).backward()
    G, dG = expected_weighted_gradient(x, V, backend=backend, weight_R=1.5, weights_lam=w,
                                       tau=4, beta=2.0)  # fmt: skip
    bounds.assert_within(leaf.grad, G, dG, "gradient of 1.5 R + w . lam")


@pytest.mark.parametrize("backend", BACKENDS)
def test_penalty_and_spectrum_gives_both_from_one_call(backend):
    x, V = make_batch(50, 16, seed=23)
    leaf = x.clone().requires_grad_()
    R, lam = penalty_and_spectrum(leaf, V, tau=3, backend=backend)
    assert R.requires_grad and not lam.requires_grad  # the spectrum is for logging
    assert torch.equal(R.detach(), spec_penalty(x, V, tau=3, backend=backend))
    assert torch.equal(lam, projected_spectrum(x, V, backend=backend))
    R.backward()
    _, _, G, dG = expected_penalty(x, V, backend=backend, tau=3)
    bounds.assert_within(leaf.grad, G, dG, "penalty_and_spectrum gradient")
    defaults = penalty_and_spectrum(x, V)  # tau 10, the device's default backend
    assert torch.equal(defaults[0], spec_penalty(x, V))
    # a penalty's checks, not a spectrum's: a zero anchor is an error
    flat = x.clone()
    flat[:, 1:] = flat[:1, 1:]  # one direction of variance: rank 1
    with pytest.raises(ValueError, match="x: the batch is rank-deficient for tau = 3"):
        penalty_and_spectrum(flat, torch.eye(16, device=DEVICE), tau=3, backend=backend,
                             validate="immediate")  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_gemms_run_in_the_compute_dtype_both_ways(backend, monkeypatch):
    """``compute_dtype=torch.bfloat16``: the projection and the backprojection get the
    bfloat16 plan (the backward is not silently done in float32)."""
    from powerlaw_fast.ops import backends

    seen = []
    for stage in ("centred_projection", "backprojection"):
        original = backends.implementation(stage, backend)

        def recording(*args, _stage=stage, _original=original):
            seen.append((_stage, args[-1].operand))
            return _original(*args)

        monkeypatch.setitem(backends._TABLE, (stage, backend), recording)
    x, V = make_batch(50, 16, seed=24)
    leaf = x.clone().requires_grad_()
    spec_penalty(leaf, V.bfloat16(), tau=3, backend=backend,
                 compute_dtype=torch.bfloat16).backward()  # fmt: skip
    assert seen == [("centred_projection", torch.bfloat16), ("backprojection", torch.bfloat16)]
    seen.clear()
    check_spectrum(x, V.bfloat16(), backend=backend, compute_dtype=torch.bfloat16)
    assert seen == [("centred_projection", torch.bfloat16), ("backprojection", torch.bfloat16)]


@pytest.mark.parametrize(
    "x_dtype,compute_dtype",
    [(torch.float16, None), (torch.bfloat16, None), (torch.float32, torch.bfloat16)],
)
def test_opcheck_in_every_operand_dtype(x_dtype, compute_dtype):
    """The fake results (Z's dtype: float32 for float16 input, the compute dtype) match."""
    x, V = make_batch(40, 24, seed=13)
    x = x.to(x_dtype).requires_grad_()
    V = V.to(compute_dtype or x_dtype)
    _, _, settings = sp_module._settings(
        x, V, alpha=1.0, tau=10, beta=1.0, convention="paper", backend="torch",
        validate="immediate", process_group=None, compute_dtype=compute_dtype, source="x",
    )  # fmt: skip
    torch.library.opcheck(sp_module.SPECTRAL_PENALTY.custom_op, ([x, V], *settings))


# --------------------------------------------------------------------------------------------
# Checks that depend on the settings
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_immediate_validation_also_checks_that_v_is_orthonormal(backend):
    x, V = make_batch(30, 8, seed=25)
    skewed = V.clone()
    skewed[:, 0] *= 1.01  # one column 1% too long
    with pytest.raises(ValueError, match=r"V: expected orthonormal columns .* 0\.02"):
        spec_penalty(x, skewed, tau=2, backend=backend, validate="immediate")
    spec_penalty(x, skewed, tau=2, backend=backend, validate="off")  # no sync, no check


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_authors_convention_skips_directions_without_variance(backend):
    """Columns of x that are exactly zero give lam_n = 0 exactly in V = I: the paper's sum
    counts each as (0 - 1)^2 = 1, the authors' skips them (the oracle's bound is exact here)."""
    x = torch.zeros(40, 12)
    x[:, :7] = make_batch(40, 7, seed=26, device="cpu")[0]
    x, V = x.to(DEVICE), torch.eye(12, device=DEVICE)
    check_penalty(x, V, backend=backend, tau=2, convention="authors")
    check_penalty(x, V, backend=backend, tau=3, convention="paper")
    # the case's premise, in the oracle: the five zero values cost beta / N each in the paper's
    # sum only (so a backend that stopped skipping them is far outside the authors' bound)
    authors = expected_penalty(x, V, backend=backend, tau=2, convention="authors")[0]
    paper = expected_penalty(x, V, backend=backend, tau=3, convention="paper")[0]
    assert abs(float(paper - authors) - 5 / 12) < 1e-12


def test_float64_decides_the_relu_at_float64_rounding():
    """Every r_n = 1 + 1e-9 beyond the anchor: far outside float64's rounding of r (so each
    term has the relu's slope), deep inside float32's (where 0 would be taken)."""
    g = torch.Generator().manual_seed(27)
    B, N, tau = 40, 8, 2
    n = torch.arange(1, N + 1, dtype=torch.float64)
    lam = (1.0 + 1e-9 * (n > tau).double()) / n
    W = torch.randn(B, N, generator=g, dtype=torch.float64)
    W = torch.linalg.qr(W - W.mean(0))[0]  # centred orthonormal columns: covariance diag(lam)
    x = (W * ((B - 1) * lam).sqrt()).to(DEVICE)
    V = torch.eye(N, dtype=torch.float64, device=DEVICE)
    _, grad = check_penalty(x, V, backend="torch", tau=tau)
    # the relu's slope beta / (N gam_n) per term reaches x; without it only 2 (r - 1) ~ 1e-9 would
    assert float(grad.abs().max()) > 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_deferred_error_names_the_call_it_came_from(backend):
    x, V = make_batch(20, 8, seed=28)
    x[0, 0] = float("nan")
    for op, call in (("spec_penalty", lambda: spec_penalty(x, V, tau=2, backend=backend)),
                     ("projected_spectrum", lambda: projected_spectrum(x, V, backend=backend))):
        with status.simulate_deferral(0):
            call()
            with pytest.raises(status.DeferredValidationError,
                               match=rf"deferred check of call #\d+ \({op}\)"):
                raise_pending_errors()


@pytest.mark.parametrize("op", ["spec_penalty", "projected_spectrum"])
def test_a_float16_gradient_overflow_names_the_backward_of_its_op(op):
    """The backward's own check (float16 gradients beyond 65504) names the op it belongs to."""
    x = (100.0 * torch.randn(4, 8, generator=torch.Generator().manual_seed(29))).half()
    leaf = x.to(DEVICE).requires_grad_()
    V = torch.eye(8, device=DEVICE, dtype=torch.float16)
    with status.simulate_deferral(0):
        if op == "spec_penalty":
            (1e9 * spec_penalty(leaf, V, tau=2, backend="torch")).backward()
        else:
            (1e6 * projected_spectrum(leaf, V, backend="torch")).sum().backward()
        with pytest.raises(status.DeferredValidationError,
                           match=rf"overflows float16.*\({op} \(backward\)\)"):
            raise_pending_errors()


@pytest.mark.parametrize("call", ["spec_penalty", "projected_spectrum", "penalty_and_spectrum"])
def test_a_batch_that_is_not_a_batch_is_refused_naming_x(call):
    op = {"spec_penalty": spec_penalty, "projected_spectrum": projected_spectrum,
          "penalty_and_spectrum": penalty_and_spectrum}[call]  # fmt: skip
    V = torch.eye(4, device=DEVICE)
    with pytest.raises(ValueError, match=r"^x: expected at least 2 dims \[B, N\]"):
        op(torch.randn(4, device=DEVICE), V)
    # one row has no covariance (a rank of a process group may hold one: the global batch)
    with pytest.raises(ValueError, match=r"^x: expected a batch of at least 2 rows.*B = 1"):
        op(torch.randn(1, 4, device=DEVICE), V)
