"""FusedOp, the one way an op family becomes an op: an eager autograd node and torch.library
custom ops (forward and backward) from one forward and one backward.

The compiled path is reached two ways: through torch.compile, and by making (tests/conftest.py)
``torch.compiler.is_compiling()`` true in eager mode, which sends a call through the custom
ops and their registered autograd exactly as a compiled graph does, minus the tracing (so the
mutation tests, whose trampolines torch.compile cannot trace, see that path too)."""

from __future__ import annotations

import ast
import itertools
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from powerlaw_fast import batch_covariance, powerlaw_penalty
from powerlaw_fast.ops import covariance, grouped_penalty, spectral_penalty
from powerlaw_fast.ops import powerlaw_penalty as pp_module
from powerlaw_fast.ops._autograd import FusedOp, refuse_second_order
from tests.conftest import as_if_compiling
from tests.devices import DEVICE

ROOT = Path(__file__).resolve().parents[2]
FAMILIES = [spectral_penalty.SPECTRAL_PENALTY, pp_module.POWERLAW_PENALTY,
            covariance.BATCH_COVARIANCE, grouped_penalty.GROUPED_PENALTY]  # fmt: skip
_NAMES = itertools.count()


class _Weights(NamedTuple):
    factor: float
    names: tuple[str, ...]


def _scaled_op(*, settings_dependent: bool = False, produced: list | None = None,
               extra_gradients: int = 0) -> FusedOp:
    """A toy op ``(x [R, C], w [C]) -> (3 x w, w)``, ``w`` not differentiable: it returns a host
    number (the row count) and an input as is, as the real families do. Built in the test
    (a fresh name each time), so that building is tested too."""

    def forward(inputs, settings):
        x, w = inputs
        results = [x * w * settings.factor, w, x.shape[0]]
        if produced is not None:
            produced[:] = results
        return results

    def backward(grads, saved, inputs, settings):
        assert grads[1] is None  # the non-differentiable output's, on both paths
        w, rows = saved
        assert float(rows) == inputs[0].shape[0]
        return [grads[0] * w * settings.factor] * (1 + extra_gradients)

    return FusedOp(
        f"test_scaled_{next(_NAMES)}", _Weights, label=lambda settings: "test_scaled",
        forward=forward,
        fake=lambda inputs, s: [torch.empty_like(inputs[0]), torch.empty_like(inputs[1]),
                                inputs[0].new_empty((), dtype=torch.float64)],
        outputs=lambda results: (results[0], results[1]),
        save=lambda inputs, results: [inputs[1], results[2]],
        backward=backward, nondifferentiable=(1,),
        differentiable=(lambda settings: (0,) if settings.names else ()) if settings_dependent
        else (0,),
    )  # fmt: skip


SETTINGS = _Weights(factor=3.0, names=("a", "b"))


def _loss(op, x, w):
    out, weights = op([x, w], SETTINGS)
    assert not weights.requires_grad
    return (out * torch.arange(1.0, 1.0 + x.numel()).view(x.shape)).sum() + weights.sum()


def _expected_grad(w):
    return torch.arange(1.0, 13.0).view(4, 3) * w * 3.0


@pytest.mark.parametrize("settings_dependent", [False, True])
def test_a_fused_op_gives_the_same_gradient_on_both_paths(op_path, settings_dependent):
    op = _scaled_op(settings_dependent=settings_dependent)
    x, w = torch.randn(4, 3, requires_grad=True), torch.randn(3)
    _loss(op, x, w).backward()
    torch.testing.assert_close(x.grad, _expected_grad(w), rtol=0, atol=1e-5)


def test_a_backward_with_a_gradient_too_many_is_an_error(op_path):
    op = _scaled_op(extra_gradients=1)
    x, w = torch.randn(4, 3, requires_grad=True), torch.randn(3)
    with pytest.raises(ValueError, match="zip"):
        _loss(op, x, w).backward()


def test_under_torch_compile_too():
    op = _scaled_op()
    x, w = torch.randn(4, 3, requires_grad=True), torch.randn(3)
    torch.compile(lambda x, w: _loss(op, x, w), fullgraph=True, backend="aot_eager")(
        x, w).backward()
    torch.testing.assert_close(x.grad, _expected_grad(w), rtol=0, atol=1e-5)


def test_its_custom_ops_pass_opcheck_and_copy_only_what_aliases():
    produced = []
    op = _scaled_op(produced=produced)
    x = torch.randn(4, 3, device=DEVICE, requires_grad=True)
    w = torch.randn(3, device=DEVICE)
    settings = _Weights(factor=2.0, names=("a",))
    torch.library.opcheck(op.custom_op, ([x, w], *settings))
    out, weights, rows = op.custom_op([x.detach(), w], *settings)
    # the input returned as is is copied (a custom op may not alias), the fresh result is not
    assert weights.untyped_storage().data_ptr() != w.untyped_storage().data_ptr()
    assert out.untyped_storage().data_ptr() == produced[0].untyped_storage().data_ptr()
    torch.testing.assert_close(out, x.detach() * w * 2.0)
    assert rows.dtype == torch.float64 and rows.device == x.device and float(rows) == 4.0
    # the backward's gradient is contiguous whatever x's layout
    strided = torch.randn(3, 4, device=DEVICE).t()
    grads = [torch.randn(4, 3, device=DEVICE), None]
    torch.library.opcheck(op.backward_op, (grads, [w, rows], [strided], *settings))
    (grad,) = op.backward_op(grads, [w, rows], [strided], *settings)
    torch.testing.assert_close(grad, grads[0] * w * 2.0)


def test_its_gradient_is_not_differentiated_again():
    op = _scaled_op()
    x = torch.randn(4, 3, requires_grad=True)
    (grad,) = torch.autograd.grad(_loss(op, x, torch.randn(3)), x, create_graph=True)
    with pytest.raises(RuntimeError, match="test_scaled: its gradient is not differentiable"):
        torch.autograd.grad(grad.sum(), x)


def test_the_second_order_guard_leaves_first_order_gradients_alone():
    g, x = torch.randn(3), torch.randn(3, requires_grad=True)
    assert refuse_second_order(g, torch.zeros(3), "op") is g  # the input needs no gradient
    with torch.no_grad():
        assert refuse_second_order(g, x, "op") is g
    guarded = refuse_second_order(g, x, "op")
    assert torch.equal(guarded, g) and guarded.requires_grad


def _grads(fn, *tensors):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    fn(*leaves).backward()
    return [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("backend", ["torch"])
def test_every_family_has_the_eager_gradient_through_its_custom_ops(monkeypatch, backend):
    """The real ops through their custom ops and registered autograd (what torch.compile runs)
    against their eager nodes: spectral penalty and spectrum, powerlaw penalty, covariance."""
    torch.manual_seed(0)
    x = torch.randn(60, 12, device=DEVICE) + 0.5
    V = torch.linalg.eigh(torch.cov(x.T))[1].flip(1).contiguous()
    weights = torch.randn(12, device=DEVICE)

    def loss(x):
        R = spectral_penalty.spec_penalty(x, V, tau=3, backend=backend)
        lam = spectral_penalty.projected_spectrum(x, V, backend=backend)
        sigma = batch_covariance(x, backend=backend)
        return (R + (lam * weights).sum() + powerlaw_penalty(lam, tau=2, backend=backend)
                + (sigma * sigma).sum())  # fmt: skip

    eager = _grads(loss, x)
    as_if_compiling(monkeypatch)
    through_ops = _grads(loss, x)
    torch.testing.assert_close(through_ops, eager, rtol=1e-6, atol=1e-7)


def test_the_grouped_op_through_its_custom_ops(monkeypatch):
    pytest.importorskip("triton")
    torch.manual_seed(1)
    xs = [torch.randn(40, n, device=DEVICE) for n in (12, 20)]
    Vs = [torch.linalg.qr(torch.randn(n, n, device=DEVICE))[0] for n in (12, 20)]
    settings = dict(alphas=[1.0, 1.2], anchors=[2, 3], betas=[1.0, 0.5], convention="paper")

    def loss(a, b):
        total, lams = grouped_penalty.grouped_penalty_triton([a, b], Vs, **settings)
        assert not any(lam.requires_grad for lam in lams)
        return total

    eager = _grads(loss, *xs)
    as_if_compiling(monkeypatch)
    torch.testing.assert_close(_grads(loss, *xs), eager, rtol=1e-6, atol=1e-8)


def test_every_op_family_is_a_fused_op_with_both_custom_ops():
    for op in FAMILIES:
        for name in (op.name, f"{op.name}_backward"):
            assert hasattr(torch.ops.powerlaw_fast, name), name


def test_nothing_else_in_the_package_makes_an_op():
    """No autograd.Function or custom op outside ops/_autograd.py: one way to make an op."""
    makers = {"custom_op", "define", "Library", "custom_autograd", "triton_op"}
    found = []
    for path in sorted((ROOT / "powerlaw_fast").rglob("*.py")):
        if path.name == "_autograd.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(
                ast.unparse(base).endswith("autograd.Function") for base in node.bases
            ):
                found.append(f"{path.name}: class {node.name}")
            if isinstance(node, ast.Attribute) and node.attr in makers and ast.unparse(
                node.value
            ).endswith("library"):
                found.append(f"{path.name}: {ast.unparse(node)}")
    assert found == []


def test_the_grouped_op_passes_opcheck():
    pytest.importorskip("triton")
    xs = [torch.randn(40, n, device=DEVICE) for n in (12, 20)]
    Vs = [torch.linalg.qr(torch.randn(n, n, device=DEVICE))[0] for n in (12, 20)]
    settings = grouped_penalty.GroupedSettings(
        anchors=(2, 3), alphas=(1.0, 1.2), betas=(1.0, 0.5), skip_nonpositive=False,
        validate="immediate", names=("a", "b"), taus=(3, 4),
    )  # fmt: skip
    inputs = [x.requires_grad_() for x in xs] + Vs
    torch.library.opcheck(grouped_penalty.GROUPED_PENALTY.custom_op, (inputs, *settings))
