"""The grouped penalty over several layers against the per-layer op and float64."""

from __future__ import annotations

import math

import pytest
import torch

from powerlaw_fast.baselines import literal_penalty
from powerlaw_fast.ops.grouped_penalty import grouped_penalty_torch, grouped_penalty_triton
from tests.devices import DEVICE, raises_validation, rel_err
from tests.ops.test_spec_penalty import make_batch
from tests.ops.test_spec_penalty_host import CountingMode, triton_launches  # noqa: F401

pytest.importorskip("triton")

WIDTHS = [37, 130, 64]
SETTINGS = dict(alphas=[1.0, 1.3, 0.8], anchors=[4, 9, 0], betas=[1.0, 2.0, 0.5])


def layers(widths, B=150, dtype=torch.float32, seed=0):
    batches = [make_batch(B, n, seed=seed + i, mean=0.5 * i, dtype=dtype) for i, n in
               enumerate(widths)]  # fmt: skip
    return [x for x, _ in batches], [V for _, V in batches]


def test_matches_float64_and_the_per_layer_twin(poisoned):
    xs, Vs = layers(WIDTHS)
    leaves = [x.clone().requires_grad_() for x in xs]
    total, lams = grouped_penalty_triton(leaves, Vs, **SETTINGS, convention="paper")
    total.backward()
    twins = [x.clone().requires_grad_() for x in xs]
    t_total, t_lams = grouped_penalty_torch(twins, Vs, **SETTINGS, convention="paper")
    t_total.backward()
    ref = 0.0
    for i, (x, V) in enumerate(zip(xs, Vs, strict=True)):
        leaf = x.double().requires_grad_()
        value = literal_penalty(leaf, V.double(), alpha=SETTINGS["alphas"][i],
                                tau=SETTINGS["anchors"][i] + 1, beta=SETTINGS["betas"][i])
        value.backward()
        ref += float(value)
        assert rel_err(leaves[i].grad, leaf.grad) < 2e-4
        assert rel_err(lams[i], t_lams[i]) < 1e-5
    assert math.isclose(float(total), ref, rel_tol=2e-4)
    assert math.isclose(float(total), float(t_total), rel_tol=2e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sixteen_bit_layers(dtype):
    xs, Vs = layers([40, 72], dtype=dtype, seed=5)
    Vs = [V.float() if dtype == torch.float16 else V for V in Vs]
    settings = dict(alphas=[1.0, 1.0], anchors=[9, 9], betas=[1.0, 1.0])
    total, _ = grouped_penalty_triton(xs, [V.to(dtype) for V in Vs], **settings,
                                      convention="paper")  # fmt: skip
    pairs = zip(xs, Vs, strict=True)
    ref = sum(float(literal_penalty(x.double(), V.to(dtype).double())) for x, V in pairs)
    assert math.isclose(float(total), ref, rel_tol=3e-2)


def test_bfloat16_compute_for_float32_layers():
    xs, Vs = layers([40, 72], seed=6)
    settings = dict(alphas=[1.0, 1.0], anchors=[9, 9], betas=[1.0, 1.0])
    exact, _ = grouped_penalty_triton(xs, Vs, **settings, convention="paper")
    fast, _ = grouped_penalty_triton(xs, [V.bfloat16() for V in Vs], **settings,
                                     convention="paper", compute_dtype=torch.bfloat16)
    assert abs(float(fast) / float(exact) - 1) < 0.05


def test_errors_name_the_layer(deferral):
    xs, Vs = layers([20, 30], seed=7)
    xs[1] = xs[1].clone()
    xs[1][0, 0] = float("nan")
    with raises_validation("layer 'second': x: expected finite activations"):
        grouped_penalty_triton(xs, Vs, alphas=[1.0, 1.0], anchors=[2, 2], betas=[1.0, 1.0],
                               convention="paper", names=["first", "second"])  # fmt: skip


@pytest.mark.skipif(DEVICE.type != "cpu", reason="counts under the CPU interpreter")
@pytest.mark.parametrize("L", [1, 3, 6])
def test_launches_do_not_grow_with_the_number_of_layers(triton_launches, L):  # noqa: F811
    xs, Vs = layers([24 + 8 * i for i in range(L)], B=64, seed=8)
    flat = torch.cat([V.reshape(-1) for V in Vs])  # bases as views of one buffer: no copy
    views, offset = [], 0
    for V in Vs:
        views.append(flat[offset : offset + V.numel()].view(V.shape))
        offset += V.numel()
    settings = dict(alphas=[1.0] * L, anchors=[2] * L, betas=[1.0] * L)
    leaves = [x.clone().requires_grad_() for x in xs]
    grouped_penalty_triton(leaves, views, **settings, convention="paper")[0].backward()  # warm
    triton_launches.clear()
    with CountingMode() as mode:
        total, _ = grouped_penalty_triton(leaves, views, **settings, convention="paper",
                                          validate="off")  # fmt: skip
        total.backward()
    assert sum(triton_launches.values()) == 4, triton_launches
    # besides the kernels: one cat of the activations, one sum of the layers' penalties
    assert mode.ops["cat"] == 1 and mode.ops["sum"] == 1, mode.ops
    assert "copy_" not in mode.ops and "fill_" not in mode.ops, mode.ops


def test_float16_bases_are_read_without_a_cast_per_call():
    from powerlaw_fast.ops.grouped_penalty import flat_bases

    xs, Vs = layers([24, 40], dtype=torch.float16, seed=9)
    flat = torch.cat([V.reshape(-1) for V in Vs])
    views = [flat[: 24 * 24].view(24, 24), flat[24 * 24 :].view(40, 40)]
    assert flat_bases(views).data_ptr() == flat.data_ptr()  # the buffer itself, float16
    total, _ = grouped_penalty_triton(xs, views, alphas=[1.0, 1.0], anchors=[2, 2],
                                      betas=[1.0, 1.0], convention="paper")  # fmt: skip
    pairs = zip(xs, Vs, strict=True)
    ref = sum(float(literal_penalty(x.double(), V.double(), tau=3)) for x, V in pairs)
    assert math.isclose(float(total), ref, rel_tol=3e-2)
