"""The grouped penalty over several layers against the float64 oracle (tests/oracle.py) within
the bounds of its rounding (tests/bounds.py), as its per-layer twin is."""

from __future__ import annotations

import pytest
import torch

from powerlaw_fast.ops import status
from powerlaw_fast.ops.grouped_penalty import grouped_penalty_torch, grouped_penalty_triton
from tests import bounds
from tests.conftest import record_launches
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
    convention = settings.get("convention", "paper")
    for i, (x, V) in enumerate(zip(xs, Vs, strict=True)):
        tau = settings["anchors"][i] + (1 if convention == "paper" else 0)
        kw = dict(alpha=settings["alphas"][i], tau=tau, beta=settings["betas"][i],
                  convention=convention)  # fmt: skip
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


@pytest.mark.parametrize("convention", ["paper", "authors"])
def test_zeros_in_a_spectrum_are_skipped_by_the_authors_convention_only(convention):
    """A layer that varies in 6 of its 16 basis directions: its 10 zero values add to the
    penalty in the "paper" convention and are left out in the "authors" one (within the
    oracle's bounds of each)."""
    xs, Vs = layers([12], B=40, seed=16)
    g = torch.Generator().manual_seed(17)
    sparse = torch.zeros(40, 16)
    sparse[:, :6] = torch.randn(40, 6, generator=g) * torch.arange(1.0, 7.0) ** -0.5
    xs, Vs = [xs[0], sparse.to(DEVICE)], [Vs[0], torch.eye(16, device=DEVICE)]
    settings = dict(alphas=[1.0, 1.0], anchors=[2, 2], betas=[1.0, 1.0])
    check_against_the_oracle(xs, Vs, settings | dict(convention=convention),
                             lambda leaves: grouped_penalty_triton(
                                 leaves, Vs, **settings, convention=convention))  # fmt: skip


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


# --------------------------------------------------------------------------------------------
# When the grouped kernels apply, and the flat buffer of the bases
# --------------------------------------------------------------------------------------------
def test_can_group_takes_one_batch_size_dtype_and_device_and_widths_up_to_the_fused_limit():
    from powerlaw_fast.ops.grouped_penalty import can_group

    def x(B, N, dtype=torch.float32, device="cpu"):
        return torch.zeros(1, N, dtype=dtype, device=device).expand(B, N)  # no memory behind

    assert can_group([x(8, 5)])  # one layer (B != N)
    assert can_group([x(8, 5), x(8, 7), x(8, 8)])
    assert can_group([x(3, 4096), x(3, 1)])  # the widest fused layer, MAX_FUSED_N
    assert not can_group([x(3, 4097), x(3, 1)])
    assert not can_group([x(8, 5), x(9, 5)])  # batch sizes differ
    assert not can_group([x(5, 8), x(8, 8)])  # the first batch size is another's width
    assert not can_group([x(8, 5, torch.float64)])  # float64 takes the per-layer loop
    assert not can_group([x(8, 5), x(8, 5, torch.bfloat16)])
    assert not can_group([x(8, 5), x(8, 5, device="meta")])


def test_flat_bases_reads_views_of_one_buffer_in_place_and_copies_anything_else():
    from powerlaw_fast.ops.grouped_penalty import flat_bases

    buffer = torch.arange(1.0, 46.0)  # 4 + 9 + 25 in the views, a spare head and tail
    views = [buffer[4:8].view(2, 2), buffer[8:17].view(3, 3), buffer[17:42].view(5, 5)]
    flat = flat_bases(views)
    assert flat.data_ptr() == buffer[4:].data_ptr() and flat.shape == (38,)
    assert torch.equal(flat, buffer[4:42])
    one = flat_bases(views[1:2])  # a single basis is its own flat buffer
    assert one.data_ptr() == views[1].data_ptr() and torch.equal(one, buffer[8:17])
    # not consecutive, or not contiguous: one cat, row-major, in the first basis' dtype
    gap = [views[0], views[2]]
    assert torch.equal(flat_bases(gap), torch.cat([buffer[4:8], buffer[17:42]]))
    turned = [views[0], views[1].T]
    assert torch.equal(flat_bases(turned), torch.cat([buffer[4:8], views[1].T.reshape(-1)]))
    mixed = flat_bases([views[0].half(), views[1]])
    assert mixed.dtype == torch.float16 and torch.equal(mixed, buffer[4:17].half())


def test_flat_bases_does_not_read_past_the_end_of_the_storage():
    """Two bases that happen to sit end to end in memory but in separate storages are not one
    buffer: the flat view would run past the first storage."""
    from powerlaw_fast.ops.grouped_penalty import flat_bases

    buffer = torch.arange(8.0)
    exact = [buffer[:4].view(2, 2), buffer[4:].view(2, 2)]  # up to the storage's last byte
    assert flat_bases(exact).data_ptr() == buffer.data_ptr()

    class Adjacent:  # the second basis as if allocated right after the first
        def __init__(self, t, ptr):
            self.t, self.ptr = t, ptr

        def __getattr__(self, name):
            return getattr(self.t, name)

        def data_ptr(self):
            return self.ptr

    first = torch.arange(4.0)
    second = Adjacent(torch.arange(4.0, 8.0), first.data_ptr() + 4 * first.element_size())
    out = flat_bases([first, second])
    assert out.data_ptr() != first.data_ptr() and torch.equal(out, torch.arange(8.0))


# --------------------------------------------------------------------------------------------
# The launches as the host code makes them (recorded, not run)
# --------------------------------------------------------------------------------------------
@pytest.fixture
def launches(monkeypatch):
    """The grouped kernels recorded instead of run (tests/conftest.py)."""
    from powerlaw_fast.ops import grouped_penalty

    names = ("_grouped_column_mean_kernel", "_grouped_projection_kernel",
             "_grouped_penalty_kernel", "_grouped_backprojection_kernel")  # fmt: skip
    return record_launches(monkeypatch, grouped_penalty, names)


# x's dtype, compute dtype -> the documented plan (ops/_plan.py): GEMM operands (also Z),
# OPERAND_FP32 (float16 bases widened in the kernel), the dot precision (float32 exact on a
# CPU, float16 input at TF32, bfloat16 operands at "tf32"), bfloat16 widened for the
# interpreter's dot
PLANS = {
    (torch.float32, None): (torch.float32, False, "ieee", False),
    (torch.float16, None): (torch.float32, True, "tf32", False),
    (torch.bfloat16, None): (torch.bfloat16, False, "tf32", True),
    (torch.float32, torch.bfloat16): (torch.bfloat16, False, "tf32", True),
}


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the interpreter's plan")
@pytest.mark.parametrize("dtype,compute", list(PLANS))
def test_forward_and_backward_launches_on_the_inputs_device(launches, dtype, compute):
    """On the meta device: every buffer made on the inputs' device with its documented shape
    and dtype, each kernel's grid and arguments (the buffers one kernel writes are those the
    next reads), the plan's flags, and the tile and warps of the penalty kernel."""
    from powerlaw_fast.ops import grouped_penalty as gp
    from powerlaw_fast.ops._plan import mean_tolerance

    operand, operand_fp32, precision, dot_fp32 = PLANS[(dtype, compute)]
    widths, B = (37, 1100), 150  # two row blocks of 128; a penalty tile of 2048: 8 warps
    total, L, num_m = sum(widths), 2, 2
    meta = dict(device="meta")
    xs = [torch.empty(B, n, dtype=dtype, **meta) for n in widths]
    base_dtype = torch.float16 if dtype == torch.float16 else operand
    Vs = [torch.empty(n, n, dtype=base_dtype, **meta) for n in widths]
    settings = gp.GroupedSettings(
        anchors=(3, 9), alphas=(1.0, 1.5), betas=(1.0, 2.0), skip_nonpositive=True,
        validate="off", names=("a", "b"), taus=(4, 10),
        compute=str(compute).removeprefix("torch.") if compute else "",
    )  # fmt: skip
    plan = gp._plan(xs, settings)
    tables = gp._layer_tables(xs, settings, plan)
    heads, parts, z, v_flat = gp._launch_forward(xs, Vs, tables, settings, plan)
    (mean_call, projection, penalty) = launches
    for out, shape, out_dtype in [(heads, (L, 4), torch.float32),
                                  (parts, (3 * total,), torch.float32),
                                  (z, (B * total,), operand),
                                  (v_flat, (sum(n * n for n in widths),), base_dtype)]:  # fmt: skip
        assert out.device.type == "meta" and out.shape == shape and out.dtype == out_dtype

    name, grid, args, kwargs = mean_call
    assert name == "_grouped_column_mean_kernel" and grid == (2 + 35,)  # 32-column blocks
    x_flat, mean = args[0], args[1]
    assert x_flat.shape == (B * total,) and x_flat.dtype == dtype and x_flat.device.type == "meta"
    assert mean.shape == (total,) and mean.dtype == torch.float32 and mean.device.type == "meta"
    assert args[2] is tables["widths"] and args[3] is tables["col_off"] and args[4:] == (B, L)
    assert kwargs == dict(BLOCK_B=32, BLOCK_N=32)

    name, grid, args, kwargs = projection
    assert name == "_grouped_projection_kernel"
    assert grid({"BLOCK_N": 64}) == (num_m * (1 + 18),) and grid({"BLOCK_N": 128}) == (num_m * 10,)
    moments = args[4]
    assert args[0] is x_flat and args[1] is mean and args[2] is v_flat and args[3] is z
    assert moments.shape == (2, num_m, total) and moments.dtype == torch.float32
    assert moments.device.type == "meta"
    assert args[5] is tables["widths"] and args[6] is tables["col_off"]
    assert args[7] is tables["v_off"] and args[8:] == (B, L, total, 256)
    assert kwargs == dict(OPERAND_FP32=operand_fp32, IN_PRECISION=precision,
                          DOT_IN_FP32=dot_fp32, BLOCK_M=128)  # fmt: skip

    name, grid, args, kwargs = penalty
    assert name == "_grouped_penalty_kernel" and grid == (L,)
    assert args[0] is moments and args[1] is parts and args[2] is heads
    table_names = ["widths", "col_off", "anchors", "alphas", "betas", "tinies", "kinks"]
    assert all(args[3 + i] is tables[k] for i, k in enumerate(table_names))
    assert args[10:] == (num_m, total, float(B), mean_tolerance(B, torch.float32))
    assert kwargs == dict(SKIP_NONPOSITIVE=True, BLOCK=2048, num_warps=8)

    launches.clear()
    grad_out = torch.empty((), **meta)
    out = gp._launch_backward(grad_out, z, parts, v_flat, tables, B, dtype, plan)
    assert out.device.type == "meta" and out.shape == (B * total,) and out.dtype == dtype
    ((name, grid, args, kwargs),) = launches
    assert name == "_grouped_backprojection_kernel"
    assert grid({"BLOCK_N": 64}) == (num_m * (1 + 18),) and grid({"BLOCK_N": 128}) == (num_m * 10,)
    assert all(a is b for a, b in zip(args[:5], (z, parts, grad_out, v_flat, out), strict=True))
    assert args[5] is tables["widths"] and args[6] is tables["col_off"]
    assert args[7] is tables["v_off"] and args[8:] == (B, L, total, 256, 2.0 / (B - 1))
    assert kwargs == dict(OPERAND_FP32=operand_fp32, IN_PRECISION=precision,
                          DOT_IN_FP32=dot_fp32, BLOCK_M=128)  # fmt: skip


def test_a_penalty_tile_up_to_1024_runs_on_4_warps(launches):
    from powerlaw_fast.ops import grouped_penalty as gp

    for widths, block, warps in [((5,), 16, 4), ((1024, 3), 1024, 4), ((1025,), 2048, 8)]:
        launches.clear()
        xs = [torch.empty(4, n, device="meta") for n in widths]
        Vs = [torch.empty(n, n, device="meta") for n in widths]
        L = len(widths)
        settings = gp.GroupedSettings(anchors=(0,) * L, alphas=(1.0,) * L, betas=(1.0,) * L,
                                      skip_nonpositive=False, validate="off", names=("a",) * L,
                                      taus=(1,) * L)  # fmt: skip
        plan = gp._plan(xs, settings)
        gp._launch_forward(xs, Vs, gp._layer_tables(xs, settings, plan), settings, plan)
        kwargs = launches[2][3]
        assert kwargs["BLOCK"] == block and kwargs["num_warps"] == warps, widths
        assert kwargs["SKIP_NONPOSITIVE"] is False


def test_layer_tables_hold_each_layers_offsets_settings_and_rounding_levels():
    from powerlaw_fast.ops import grouped_penalty as gp
    from powerlaw_fast.ops._plan import anchor_tolerance, kink_tolerance

    xs = [torch.zeros(1, n).expand(6, n) for n in (3, 5, 2)]
    settings = gp.GroupedSettings(anchors=(0, 4, 1), alphas=(1.0, 2.5, 0.5),
                                  betas=(3.0, 0.25, 1.0), skip_nonpositive=False,
                                  validate="off", names=("a", "b", "c"), taus=(1, 5, 2))
    plan = gp._plan(xs, settings)
    t = gp._layer_tables(xs, settings, plan)
    assert t["widths"].tolist() == [3, 5, 2] and t["widths"].dtype == torch.int32
    assert t["col_off"].tolist() == [0, 3, 8] and t["v_off"].tolist() == [0, 9, 34]
    assert t["anchors"].tolist() == [0, 4, 1] and t["alphas"].tolist() == [1.0, 2.5, 0.5]
    assert t["betas"].tolist() == [3.0, 0.25, 1.0] and t["total"] == 10
    want = [anchor_tolerance(plan, n) for n in (3, 5, 2)]
    assert t["tinies"].tolist() == torch.tensor(want, dtype=torch.float32).tolist()
    kinks = [kink_tolerance(3, 1.0, torch.float32), kink_tolerance(5, 2.5, torch.float32),
             kink_tolerance(2, 0.5, torch.float32)]
    assert t["kinks"].tolist() == torch.tensor(kinks, dtype=torch.float32).tolist()
    assert t["widths"].device == xs[0].device


@pytest.mark.parametrize("compute", [None, torch.bfloat16])
def test_float32_bases_reach_the_kernels_in_the_compute_dtype(launches, compute):
    """compute_dtype=bfloat16: float32 bases are cast to bfloat16 once, before the kernels,
    which then take bfloat16 operands and keep Z in bfloat16 (recorded launches, validation
    off); without it, the float32 bases are read as they are."""
    xs, Vs = layers([6, 10], B=12, seed=10)
    settings = dict(alphas=[1.0, 1.0], anchors=[1, 2], betas=[1.0, 1.0])
    leaves = [x.clone().requires_grad_() for x in xs]
    total, _ = grouped_penalty_triton(leaves, Vs, **settings, convention="paper",
                                      compute_dtype=compute, validate="off")  # fmt: skip
    total.backward()
    operand = compute or torch.float32
    projection = next(c for c in launches if c[0] == "_grouped_projection_kernel")
    backprojection = next(c for c in launches if c[0] == "_grouped_backprojection_kernel")
    v_flat, z = projection[2][2], projection[2][3]
    assert v_flat.dtype == operand and z.dtype == operand
    assert backprojection[2][3].dtype == operand and backprojection[2][4].dtype == torch.float32
    assert projection[3]["IN_PRECISION"] == ("tf32" if compute else "ieee")
    assert torch.equal(v_flat, torch.cat([V.reshape(-1) for V in Vs]).to(operand))


def _rank_deficient_second_layer():
    """The second layer (N = 20) varies in 5 of its basis' directions only: the 10th largest
    value of its spectrum is zero."""
    good = make_batch(30, 8, seed=11)
    g = torch.Generator().manual_seed(12)
    bad = torch.zeros(30, 20)
    bad[:, :5] = torch.randn(30, 5, generator=g)
    return [good[0], bad.to(DEVICE)], [good[1], torch.eye(20, device=DEVICE)]


@pytest.mark.parametrize("convention,anchors,tau", [("paper", [2, 9], 10),
                                                    ("authors", [2, 9], 9)])  # fmt: skip
def test_a_rank_deficient_layer_is_named_with_its_tau(deferral, convention, anchors, tau):
    """Without taus the error gives the tau of the call's convention (as the per-layer twin
    does): the 1-indexed rank for "paper", the 0-indexed one for "authors"; the layers are
    named by their index without names."""
    xs, Vs = _rank_deficient_second_layer()
    kw = dict(alphas=[1.0, 1.0], anchors=anchors, betas=[1.0, 1.0], convention=convention)
    want = (f"layer '1': x: the batch is rank-deficient for tau = {tau}: the 10-th largest "
            f"value of its projected spectrum")  # fmt: skip
    with raises_validation(want):
        grouped_penalty_triton(xs, Vs, **kw)
    with pytest.raises(ValueError, match=want):
        grouped_penalty_torch(xs, Vs, **kw, validate="immediate")


def test_an_overflowing_layer_is_named_with_its_own_alpha_and_beta(deferral):
    """(n / tau)^alpha beyond float32 in the second layer only: the error names that layer and
    its alpha and beta, not the first layer's."""
    xs, Vs = layers([12, 40], B=60, seed=13)
    kw = dict(alphas=[1.0, 30.0], anchors=[2, 0], betas=[2.0, 0.5], convention="paper")
    with raises_validation("layer 'wide': alpha, beta: the penalty or its gradient is not "
                           r"finite in float32 with alpha = 30.0 and beta = 0.5 \("):
        grouped_penalty_triton(xs, Vs, **kw, names=["narrow", "wide"])


def test_a_deferred_error_names_the_grouped_op():
    xs, Vs = layers([20, 30], seed=7)
    xs[1] = xs[1].clone()
    xs[1][0, 0] = float("inf")
    kw = dict(alphas=[1.0, 1.0], anchors=[2, 2], betas=[1.0, 1.0], convention="paper")
    with status.simulate_deferral():
        grouped_penalty_triton(xs, Vs, **kw, names=["first", "second"])
        with pytest.raises(status.DeferredValidationError,
                           match=r"layer 'second': x: expected finite activations, got a "
                                 r"projected spectrum with 30 non-finite values .*"
                                 r"call #\d+ \(grouped penalty\)"):  # fmt: skip
            status.raise_pending_errors()


@pytest.mark.parametrize("compute", [None, torch.float32])
def test_a_float16_gradient_beyond_its_range_is_an_error(deferral, compute):
    """A float16 layer whose gradient passes 65504 (a large beta): an error from the backward,
    deferred as the grouped op's backward, not a silent inf; also with float32 compute (the
    bases then float32, the gradient still float16)."""
    xs, Vs = layers([8], B=10, seed=14, dtype=torch.float16)
    leaf = xs[0].clone().requires_grad_()
    total, _ = grouped_penalty_triton([leaf], Vs, alphas=[1.0], anchors=[0], betas=[1e9],
                                      convention="paper", compute_dtype=compute)  # fmt: skip
    want = "x: the penalty's gradient overflows float16 in [0-9]+ entries"
    if deferral == "deferred":
        want += r".*\(grouped penalty \(backward\)\)"
    with raises_validation(want):
        total.backward()


@pytest.mark.parametrize("dtype,compute", [(torch.bfloat16, ""), (torch.float32, "bfloat16")])
def test_one_layer_and_a_compute_dtype_pass_opcheck(dtype, compute):
    """The custom op's fake implementation (torch.compile's shapes) agrees with the real one
    for a single layer and for a compute dtype other than x's."""
    from powerlaw_fast.ops import grouped_penalty as gp

    xs, Vs = layers([12], B=40, seed=15, dtype=dtype)
    operand = getattr(torch, compute) if compute else dtype
    settings = gp.GroupedSettings(anchors=(2,), alphas=(1.0,), betas=(1.0,),
                                  skip_nonpositive=False, validate="immediate", names=("a",),
                                  taus=(3,), compute=compute)  # fmt: skip
    inputs = [x.requires_grad_() for x in xs] + [V.to(operand) for V in Vs]
    torch.library.opcheck(gp.GROUPED_PENALTY.custom_op, (inputs, *settings))
