"""FusedOp, the one way an op family becomes an op: an eager autograd node and torch.library
custom ops (forward and backward) from one forward and one backward."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from powerlaw_fast.ops import covariance, grouped_penalty, powerlaw_penalty, spectral_penalty
from powerlaw_fast.ops._autograd import FusedOp
from tests.devices import DEVICE

ROOT = Path(__file__).resolve().parents[2]
FAMILIES = [spectral_penalty.SPECTRAL_PENALTY, powerlaw_penalty.POWERLAW_PENALTY,
            covariance.BATCH_COVARIANCE, grouped_penalty.GROUPED_PENALTY]  # fmt: skip


class _Weights(NamedTuple):
    factor: float
    names: tuple[str, ...]


def _forward(inputs, settings):
    x, w = inputs
    # a host number, and an input returned as is (a custom op must copy it)
    return [x * w * settings.factor, w, x.shape[0]]


def _backward(grads, saved, inputs, settings):
    w, rows = saved
    assert rows == inputs[0].shape[0] or float(rows) == inputs[0].shape[0]
    return [grads[0] * w * settings.factor]


SCALED = FusedOp(
    "test_scaled", _Weights, label=lambda settings: "test_scaled",
    forward=_forward,
    fake=lambda inputs, s: [torch.empty_like(inputs[0]), torch.empty_like(inputs[1]),
                            inputs[0].new_empty((), dtype=torch.float64)],
    outputs=lambda results: (results[0], results[1]),
    save=lambda inputs, results: [inputs[1], results[2]],
    backward=_backward, nondifferentiable=(1,),
)  # fmt: skip


def _scaled_loss(x, w):
    out, weights = SCALED([x, w], _Weights(factor=3.0, names=("a", "b")))
    assert not weights.requires_grad
    return (out * torch.arange(1.0, 1.0 + x.numel()).view(x.shape)).sum() + weights.sum()


@pytest.mark.parametrize("compiled", [False, True])
def test_a_fused_op_has_the_same_gradient_eagerly_and_compiled(compiled):
    x = torch.randn(4, 3, requires_grad=True)
    w = torch.randn(3)
    loss = torch.compile(_scaled_loss, fullgraph=True, backend="aot_eager") if compiled else (
        _scaled_loss)
    loss(x, w).backward()
    expected = torch.arange(1.0, 13.0).view(4, 3) * w * 3.0
    torch.testing.assert_close(x.grad, expected, rtol=0, atol=1e-5)


def test_its_custom_ops_pass_opcheck_and_return_no_alias():
    x, w = torch.randn(4, 3, requires_grad=True), torch.randn(3)
    settings = _Weights(factor=2.0, names=("a",))
    torch.library.opcheck(SCALED.custom_op, ([x, w], *settings))
    out, weights, rows = SCALED.custom_op([x.detach(), w], *settings)
    assert weights.untyped_storage().data_ptr() != w.untyped_storage().data_ptr()
    assert rows.dtype == torch.float64 and float(rows) == 4.0
    grads = [torch.randn(4, 3), None]
    torch.library.opcheck(SCALED.backward_op, (grads, [w, rows], [x.detach()], *settings))


def test_its_gradient_is_not_differentiated_again():
    x = torch.randn(4, 3, requires_grad=True)
    (grad,) = torch.autograd.grad(_scaled_loss(x, torch.randn(3)), x, create_graph=True)
    with pytest.raises(RuntimeError, match="test_scaled: its gradient is not differentiable"):
        grad.sum().backward()


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
