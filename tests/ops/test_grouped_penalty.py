"""The grouped penalty over several layers against the float64 oracle (tests/oracle.py) within
the bounds of its rounding (tests/bounds.py), as its per-layer twin is."""

from __future__ import annotations

import pytest
import torch

from powerlaw_fast.ops.grouped_penalty import grouped_penalty_torch, grouped_penalty_triton
from tests import bounds
from tests.devices import DEVICE, raises_validation
from tests.ops.oracle_checks import expected_penalty, roundoffs
from tests.ops.test_spec_penalty import make_batch
from tests.ops.test_spec_penalty_host import CountingMode, triton_launches  # noqa: F401

pytest.importorskip("triton")

WIDTHS = [37, 130, 64]
SETTINGS = dict(alphas=[1.0, 1.3, 0.8], anchors=[4, 9, 0], betas=[1.0, 2.0, 0.5])


def layers(widths, B=150, dtype=torch.float32, seed=0):
    batches = [make_batch(B, n, seed=seed + i, mean=0.5 * i, dtype=dtype) for i, n in
               enumerate(widths)]  # fmt: skip
    return [x for x, _ in batches], [V for _, V in batches]


def check_against_the_oracle(xs, Vs, settings, run, *, backend="triton", compute_dtype=None):
    """``run(leaves) -> (total, lams)`` for layers ``xs``, ``Vs``: the total, each layer's
    spectrum and each layer's gradient within the oracle's bounds; the total's
    bound is the sum of the layers' plus the rounding of the L-term float32 sum."""
    leaves = [x.detach().clone().requires_grad_() for x in xs]
    total, lams = run(leaves)
    total.backward()
    want, bound = 0.0, 0.0
    for i, (x, V) in enumerate(zip(xs, Vs, strict=True)):
        kw = dict(alpha=settings["alphas"][i], tau=settings["anchors"][i] + 1,
                  beta=settings["betas"][i], convention="paper")  # fmt: skip
        R, dR, G, dG = expected_penalty(x, V, backend=backend, compute_dtype=compute_dtype, **kw)
        want, bound = want + float(R), bound + dR
        u = roundoffs(x.dtype, backend, compute_dtype)
        spec = bounds.spectrum_bound(x.double().cpu(), V.double().cpu(), **u)
        lam_bound = spec.dlam + bounds.U[torch.float32] * spec.lam.abs()
        bounds.assert_within(lams[i], spec.lam, lam_bound, f"layer {i} spectrum")
        assert leaves[i].grad.dtype == x.dtype
        bounds.assert_within(leaves[i].grad, G, dG, f"layer {i} gradient",
                             floor=bounds.subnormal_spacing(x.dtype))  # fmt: skip
    bound += bounds.gamma(len(xs), bounds.U[torch.float32]) * abs(want)
    bounds.assert_within(total.detach(), torch.tensor(want), bound, "the layers' total")
    return total


def test_matches_the_oracle_as_does_the_per_layer_twin(poisoned):
    xs, Vs = layers(WIDTHS)
    check_against_the_oracle(xs, Vs, SETTINGS, lambda leaves: grouped_penalty_triton(
        leaves, Vs, **SETTINGS, convention="paper"))  # fmt: skip
    check_against_the_oracle(xs, Vs, SETTINGS, lambda leaves: grouped_penalty_torch(
        leaves, Vs, **SETTINGS, convention="paper"), backend="torch")  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sixteen_bit_layers(dtype):
    xs, Vs = layers([40, 72], dtype=dtype, seed=5)
    settings = dict(alphas=[1.0, 1.0], anchors=[9, 9], betas=[1.0, 1.0])
    check_against_the_oracle(xs, Vs, settings, lambda leaves: grouped_penalty_triton(
        leaves, Vs, **settings, convention="paper"))  # fmt: skip


def test_bfloat16_compute_for_float32_layers():
    xs, Vs = layers([40, 72], seed=6)
    settings = dict(alphas=[1.0, 1.0], anchors=[9, 9], betas=[1.0, 1.0])
    Vs = [V.bfloat16() for V in Vs]  # the oracle sees the bases the GEMMs read
    check_against_the_oracle(xs, Vs, settings, lambda leaves: grouped_penalty_triton(
        leaves, Vs, **settings, convention="paper", compute_dtype=torch.bfloat16),
        compute_dtype=torch.bfloat16)  # fmt: skip


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
    settings = dict(alphas=[1.0, 1.0], anchors=[2, 2], betas=[1.0, 1.0])
    check_against_the_oracle(xs, views, settings, lambda leaves: grouped_penalty_triton(
        leaves, views, **settings, convention="paper"))  # fmt: skip
