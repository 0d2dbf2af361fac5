"""The attacks' shared pieces (powerlaw_fast/attacks/_common.py): argument checks, rows per
pass, the private RNG, gradient precision and the fp32 verification.

Found by `nox -s mutants -- attacks/_common.py` (issue 28): each test fails for a one-line
change of _common.py that the attack tests let through."""

import math

import numpy as np
import pytest
import torch
from attack_helpers import make_data, make_mlp

from powerlaw_fast.attacks import _common, pgd, robustness_curve
from powerlaw_fast.attacks._common import (
    AttackResult,
    check_bounds,
    check_eps,
    check_inputs,
    check_labels,
    check_max_batch,
    check_precision,
    draw,
    gradient_precision,
    in_ball_and_bounds,
    input_gradient,
    make_generator,
    misclassified,
    needs_verification,
    rows_per_pass,
)

CPU = torch.device("cpu")


class Recording(torch.nn.Module):
    """Records every forward: rows, requires_grad, autocast on, float32 matmul precision."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, []

    def forward(self, x):
        self.calls.append((x.shape[0], x.requires_grad, torch.is_autocast_enabled("cpu"),
                           torch.get_float32_matmul_precision()))
        return self.inner(x)


# ----------------------------------------------------------------------------- bounds, eps
@pytest.mark.parametrize("bounds", [(-1.0, 1.0), [0, 255], (-3, -2.5)])
def test_check_bounds_returns_the_pair_as_floats(bounds):
    lo, hi = check_bounds(bounds)
    assert (lo, hi) == (float(bounds[0]), float(bounds[1]))
    assert type(lo) is float and type(hi) is float


@pytest.mark.parametrize(
    "bounds,exc,match",
    [
        ((0.0,), ValueError, r"bounds: expected a pair \(lo, hi\)"),
        ((0.0, 1.0, 2.0), ValueError, r"bounds: expected a pair"),
        ("01", ValueError, r"bounds: expected a pair"),
        (None, ValueError, r"bounds: expected a pair"),
        ((1.0, 1.0), ValueError, r"bounds: expected lo < hi"),
        ((2.0, 1.0), ValueError, r"bounds: expected lo < hi"),
        ((-math.inf, 1.0), ValueError, r"^bounds\[0\]: expected a finite number > -inf"),
        ((0.0, math.inf), ValueError, r"^bounds\[1\]: expected a finite number > -inf"),
        ((math.nan, 1.0), ValueError, r"^bounds\[0\]: expected a finite"),
        (("0", 1.0), TypeError, r"^bounds\[0\]: expected a real number"),
        ((0.0, True), TypeError, r"^bounds\[1\]: expected a real number"),
    ],
)
def test_check_bounds_refuses(bounds, exc, match):
    with pytest.raises(exc, match=match):
        check_bounds(bounds)


def test_check_eps_forms():
    assert check_eps(0.1) == ([0.1], True)
    assert check_eps(0) == ([0.0], True)
    assert check_eps([0.0, 0.2]) == ([0.0, 0.2], False)
    assert check_eps((0.3,)) == ([0.3], False)
    assert check_eps(np.float64(0.25)) == ([0.25], True)
    assert check_eps(torch.tensor(0.5)) == ([0.5], True)
    assert check_eps(torch.tensor([0.5, 0.25])) == ([0.5, 0.25], False)
    values, single = check_eps(torch.tensor([0.5]))
    assert values == [0.5] and single is False


@pytest.mark.parametrize(
    "eps,name,exc,match",
    [
        (torch.zeros(2, 2), "eps", ValueError, r"eps: expected a float or a 1-D sequence, got "
                                               r"shape \(2, 2\)"),
        (True, "eps", TypeError, r"eps: expected a float or a sequence of floats, got bool"),
        ("0.1", "sigma", TypeError, r"sigma: expected a float or a sequence of floats, got str"),
        (None, "eps", TypeError, r"eps: .*got NoneType"),
        ([], "sigma", ValueError, r"sigma: expected at least one value"),
        (-0.5, "sigma", ValueError, r"sigma: expected a finite number >= 0.0"),
        ([0.1, -0.5], "eps", ValueError, r"eps\[1\]: expected a finite number >= 0.0"),
        ([0.1, math.inf], "eps", ValueError, r"eps\[1\]"),
    ],
)
def test_check_eps_refuses(eps, name, exc, match):
    with pytest.raises(exc, match=match):
        check_eps(eps, name)


# ----------------------------------------------------------------------------- inputs, labels
def _xy(n=4):
    return torch.rand(n, 3), torch.zeros(n, dtype=torch.long)


@pytest.mark.parametrize(
    "x,y,bounds,exc,match",
    [
        (torch.rand(4), torch.zeros(4, dtype=torch.long), None, ValueError,
         r"x: expected a batch \[n, \*\] with at least 2 dims, got shape \(4,\)"),
        (torch.rand(0, 3), torch.zeros(0, dtype=torch.long), None, ValueError,
         "x: expected at least one sample, got n = 0"),
        (torch.rand(4, 3), torch.zeros(4, 1, dtype=torch.long), None, ValueError,
         r"y: expected labels of shape \[n\] = \[4\]"),
        (torch.rand(4, 3), torch.zeros(3, dtype=torch.long), None, ValueError,
         r"y: expected labels of shape \[n\] = \[4\] \(one per row of x\), got \(3,\)"),
        (torch.rand(4, 3), torch.zeros(4), None, TypeError, "y: expected integer class labels"),
        (torch.rand(4, 3), torch.zeros(4, dtype=torch.bool), None, TypeError, "y: expected int"),
        (torch.rand(4, 3), torch.zeros(4, dtype=torch.complex64), None, TypeError, "y: expec"),
        (torch.rand(4, 3), torch.tensor([0, 1, -1, 2]), None, ValueError,
         r"y: expected class labels in \[0, classes\), got min -1"),
        (torch.linspace(-0.5, 1.5, 12).view(4, 3), torch.zeros(4, dtype=torch.long),
         (0.0, 1.0), ValueError,
         r"x: expected every value within bounds \[0.0, 1.0\] \(and no NaN\), got 6 values "
         r"outside \(min -0\.5, max 1\.5\)"),
    ],
)
def test_check_inputs_refuses(x, y, bounds, exc, match):
    with pytest.raises(exc, match=match):
        check_inputs(x, y, bounds)


def test_check_inputs_names_the_argument_that_is_not_a_float_tensor():
    x, y = _xy()
    with pytest.raises(TypeError, match=r"^x: expected a torch.Tensor, got list"):
        check_inputs(x.tolist(), y, None)
    with pytest.raises(TypeError, match=r"^y: expected a torch.Tensor, got list"):
        check_inputs(x, y.tolist(), None)
    with pytest.raises(TypeError, match=r"^x: expected a floating dtype"):
        check_inputs(torch.zeros(4, 3, dtype=torch.long), y, None)


def test_check_finite():
    from powerlaw_fast.attacks._common import check_finite

    check_finite(torch.tensor([0.0, -1e300], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"^x: expected finite values, got 2 NaN or inf"):
        check_finite(torch.tensor([math.nan, 0.0, -math.inf]))
    with pytest.raises(ValueError, match=r"^z: expected finite values, got 1 NaN or inf"):
        check_finite(torch.tensor([math.inf]), "z")


def test_check_inputs_bounds_are_inclusive_and_count_nan():
    x = torch.tensor([[-1.0, 1.0], [0.0, 0.5]])
    y = torch.zeros(2, dtype=torch.long)
    check_inputs(x, y, (-1.0, 1.0))  # both edges allowed
    check_inputs(x + 5, y, None)  # no bounds: nothing checked
    with pytest.raises(ValueError, match="got 1 values outside"):
        check_inputs(x, y, (-1.0, 0.75))
    with pytest.raises(ValueError, match="got 1 values outside"):
        check_inputs(x, y, (-0.75, 1.0))
    x[1, 1] = math.nan
    with pytest.raises(ValueError, match="got 1 values outside"):
        check_inputs(x, y, (-1.0, 1.0))


def test_check_labels_returns_the_classes_and_refuses_bad_models():
    model = torch.nn.Linear(3, 5)
    x = torch.rand(4, 3)
    assert check_labels(model, x, torch.tensor([0, 4, 2, 1])) == 5
    with pytest.raises(ValueError, match=r"y: expected class labels in \[0, 5\) for a model with "
                                         r"5 outputs, got min 0, max 5"):
        check_labels(model, x, torch.tensor([0, 5, 2, 1]))
    with pytest.raises(ValueError, match=r"got min -2, max 1"):
        check_labels(model, x, torch.tensor([0, -2, 1, 1]))
    with pytest.raises(ValueError, match=r"model: expected logits \[n, classes\] .* got \(1, 5, "
                                         r"1\) for an input of 1 row"):
        check_labels(lambda t: model(t)[..., None], x, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"got \(2, 5\)"):
        check_labels(lambda t: model(t).repeat(2, 1), x, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"got tuple"):
        check_labels(lambda t: (model(t),), x, torch.zeros(4, dtype=torch.long))


def test_check_max_batch():
    assert check_max_batch(None) is None
    assert check_max_batch(1) == 1 and check_max_batch(2**62) == 2**62
    with pytest.raises(ValueError, match=r"max_batch: expected an integer in 1\.\.\d+ \(rows per "
                                         r"forward pass\), got 0"):
        check_max_batch(0)
    with pytest.raises(ValueError, match="max_batch"):
        check_max_batch(2**62 + 1)
    with pytest.raises(TypeError, match="max_batch"):
        check_max_batch(2.0)


# ----------------------------------------------------------------------------- RNG
def test_make_generator_forms():
    g = torch.Generator().manual_seed(3)
    assert make_generator(g, CPU) is g
    expect0 = torch.rand(4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.rand(4, generator=make_generator(None, CPU)), expect0)
    expect7 = torch.rand(4, generator=torch.Generator().manual_seed(7))
    assert torch.equal(torch.rand(4, generator=make_generator(7, CPU)), expect7)
    assert torch.equal(torch.rand(4, generator=make_generator(np.int64(7), CPU)), expect7)
    assert make_generator(7, CPU).device == CPU
    for bad in (True, 1.5, "7"):
        with pytest.raises(TypeError, match=r"generator: expected a torch.Generator, an int seed "
                                             r"or None, got " + type(bad).__name__):
            make_generator(bad, CPU)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_draw_uniform_and_normal(dtype):
    like = torch.zeros(1, dtype=dtype)
    u = draw((2000,), "uniform", torch.Generator().manual_seed(1), like)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    expect = torch.rand((2000,), generator=torch.Generator().manual_seed(1), dtype=acc)
    assert u.dtype == dtype and torch.equal(u, expect.to(dtype))
    z = draw((2000,), "normal", torch.Generator().manual_seed(1), like)
    expect = torch.randn((2000,), generator=torch.Generator().manual_seed(1), dtype=acc)
    assert z.dtype == dtype and torch.equal(z, expect.to(dtype))
    assert z.min() < -1 and u.min() >= 0  # normal, not uniform


# ----------------------------------------------------------------------------- gradient
def test_input_gradient_is_the_summed_cross_entropy_per_sample():
    model = make_mlp()
    x, y = make_data(n=5)
    x_leaf = x.clone().requires_grad_(True)
    with torch.no_grad():  # the attacks call it inside no_grad
        g = input_gradient(model, x_leaf, y)
    for i in range(5):  # a sample's gradient does not depend on the batch around it
        xi = x[i : i + 1].clone().requires_grad_(True)
        (gi,) = torch.autograd.grad(torch.nn.functional.cross_entropy(model(xi), y[i : i + 1]),
                                    xi)
        torch.testing.assert_close(g[i : i + 1], gi, rtol=1e-12, atol=0)
    assert all(p.grad is None for p in model.parameters())


# ----------------------------------------------------------------------------- rows per pass
def test_rows_per_pass_on_the_cpu_is_the_default_and_caps_every_forward():
    model, x, y = torch.nn.Linear(2, 2).double(), torch.rand(4097, 2).double(), None
    y = torch.zeros(4097, dtype=torch.long)
    assert rows_per_pass(model, x, y, None) == _common.CPU_DEFAULT_ROWS == 4096
    assert rows_per_pass(model, x, y, 10, cuda_graph=False) == 4096  # the budget is for CUDA
    rec = Recording(model)
    pgd(rec, x, y, [0.1], steps=1, final_iterate=True)
    assert max(c[0] for c in rec.calls) == 4096 and sum(c[0] for c in rec.calls if c[1]) == 4097
    rec.calls.clear()
    robustness_curve(rec, (x, y), [0.1], steps=1, final_iterate=True, batch_size=5000,
                     progress=False)
    assert max(c[0] for c in rec.calls) == 4096


@pytest.mark.parametrize("max_batch,n", [(None, 7), (3, 7), (7, 7), (2, 1)])
def test_misclassified_in_passes_of_at_most_max_batch_rows(max_batch, n):
    model = Recording(make_mlp())
    x, y = make_data(n=n)
    with torch.no_grad():
        got = misclassified(model, x, y, max_batch)
        expect = model.inner(x).argmax(1) != y
    assert torch.equal(got, expect)
    sizes = [c[0] for c in model.calls]
    step = n if max_batch is None else max_batch
    assert sizes == [min(step, n - i) for i in range(0, n, step)]


# ----------------------------------------------------------------------------- precision
def test_check_precision():
    assert check_precision(None) == "fp32"
    for p in ("fp32", "tf32", "bf16"):
        assert check_precision(p) == p
    with pytest.raises(ValueError, match=r"precision: expected one of \('fp32', 'tf32', 'bf16'\) "
                                         r"or None, got 'fp16'"):
        check_precision("fp16")


@pytest.fixture
def matmul_state():
    old = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
    yield
    torch.set_float32_matmul_precision(old[0])
    torch.backends.cudnn.allow_tf32 = old[1]


def test_tf32_gradient_precision_sets_and_restores_the_matmul_flags(matmul_state):
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    with gradient_precision("tf32", CPU):
        inside = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
    assert inside == ("high", True)
    assert torch.get_float32_matmul_precision() == "highest"
    assert torch.backends.cudnn.allow_tf32 is False
    with pytest.raises(RuntimeError, match="inside"):  # restored on an exception as well
        with gradient_precision("tf32", CPU):
            raise RuntimeError("inside")
    assert torch.get_float32_matmul_precision() == "highest"
    assert torch.backends.cudnn.allow_tf32 is False
    for precision in ("fp32", "bf16"):
        with gradient_precision(precision, CPU):
            assert torch.get_float32_matmul_precision() == "highest"
            assert torch.backends.cudnn.allow_tf32 is False


def test_bf16_gradient_precision_is_autocast_and_fp32_is_untouched():
    with gradient_precision("bf16", CPU):
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
        out = torch.nn.functional.linear(torch.rand(2, 3), torch.rand(4, 3))
        assert out.dtype == torch.bfloat16
    for precision in ("fp32", "tf32"):
        with gradient_precision(precision, CPU):
            assert not torch.is_autocast_enabled("cpu")


def test_tf32_attack_passes_run_with_tf32_and_verdicts_with_the_callers_setting(matmul_state):
    torch.set_float32_matmul_precision("highest")
    model, x = make_mlp(torch.float32), make_data(n=8, dtype=torch.float32)[0]
    with torch.no_grad():
        y = model(x).argmax(1)
    rec = Recording(model)
    pgd(rec, x, y, [0.05], steps=2, precision="tf32", details=True)
    grads = [c[3] for c in rec.calls if c[1]]
    others = [c[3] for c in rec.calls if not c[1] and c[0] > 1]
    assert grads and set(grads) == {"high"}
    assert "highest" in others and torch.get_float32_matmul_precision() == "highest"


def test_needs_verification():
    assert not needs_verification("fp32", CPU)
    assert needs_verification("bf16", CPU) and needs_verification("tf32", CPU)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert needs_verification("fp32", CPU)


def test_verdicts_are_fp32_under_the_callers_autocast():
    """A caller's autocast is switched off for every verdict (the clean pass and the final
    check): the success mask is the fp32 model's."""
    model, (x, y) = make_mlp(torch.float32), make_data(n=12, dtype=torch.float32)
    rec = Recording(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        c = robustness_curve(rec, (x, y), [0.0], attack="fgsm", progress=False)
        f = robustness_curve(rec, (x, y), [0.0], attack="noise", progress=False)
    with torch.no_grad():
        clean_wrong = model(x).argmax(1) != y
    assert torch.equal(c.success[0], clean_wrong) and torch.equal(f.success[0], clean_wrong)
    assert not any(c[2] for c in rec.calls)


# ----------------------------------------------------------------------------- verification
def test_in_ball_and_bounds_edges_inclusive_with_custom_bounds():
    x = torch.tensor([[0.0, -0.5], [0.5, 0.5], [0.9, -0.9]], dtype=torch.float64)
    eps = torch.tensor([0.25, 0.5, 0.125], dtype=torch.float64)
    bounds = (-1.0, 1.0)
    on_edges = torch.tensor([[0.25, -0.75], [1.0, 0.0], [1.0, -1.0]], dtype=torch.float64)
    assert in_ball_and_bounds(on_edges, x, eps, bounds).tolist() == [True, True, True]
    outside = on_edges.clone()
    outside[0, 0] = 0.25 + 2**-40  # past the ball (+)
    outside[1, 1] = -2**-40  # past the ball (-)
    outside[2, 0] = 1.0 + 2**-40  # past hi, inside the ball
    assert in_ball_and_bounds(outside, x, eps, bounds).tolist() == [False, False, False]
    low = torch.tensor([[0.0, -0.5], [0.5, 0.5], [0.9, -1.0 - 2**-40]], dtype=torch.float64)
    assert in_ball_and_bounds(low, x, eps, bounds).tolist() == [True, True, False]
    assert in_ball_and_bounds(x, x, eps, (0.0, 1.0)).tolist() == [False, True, False]


def test_in_ball_and_bounds_uses_the_kernels_float32_edges():
    """float32 inputs: the ball's edges are x +- eps in float32 (as the step kernel clamps),
    so an iterate clamped to the edge passes though it is a rounding outside in float64."""
    x = torch.tensor([[0.7]], dtype=torch.float32)
    eps = torch.tensor([0.05], dtype=torch.float64)  # the final check's radii are float64
    eps32 = eps.float()
    for edge in (x + eps32, x - eps32):  # float32 roundings, each outside the ball in float64
        assert float((edge.double() - x.double()).abs()) > float(eps)
        assert in_ball_and_bounds(edge, x, eps, (0.0, 1.0)).tolist() == [True]


def test_attack_result_work():
    r = AttackResult(None, torch.zeros(1, 1, dtype=torch.bool), torch.zeros(1, 1),
                     torch.zeros(1, 1), row_steps=3, row_forwards=5, unverified=2)
    assert r.work() == {"row_steps": 3, "row_forwards": 5, "unverified": 2}
    assert AttackResult(None, None, None, None).work() == {"row_steps": 0, "row_forwards": 0,
                                                         "unverified": 0}

