"""The fused PGD/FGSM update: Triton (interpreter on CPU) against the torch reference and the
literal float64 formula."""

import math

import pytest
import torch

from powerlaw_fast._backend import triton_available
from powerlaw_fast.ops.attack_step import pgd_update, pgd_update_reference

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def literal(x_adv, x_nat, grad, eps_rows, step, lo, hi):
    """Float64, rows replicated explicitly, torch.max/min in place of clamp."""
    R = eps_rows.shape[0]
    xa = x_adv.double().repeat(R // x_adv.shape[0], 1)
    xn = x_nat.double().repeat(R // x_nat.shape[0], 1)
    g = grad.double().repeat(R // grad.shape[0], 1)
    e = eps_rows.double()[:, None]
    x = xa + step * torch.sign(g)
    x = torch.min(torch.max(x, xn - e), xn + e)
    return torch.min(torch.max(x, torch.tensor(lo, dtype=x.dtype)), torch.tensor(hi, dtype=x.dtype))


def make_inputs(R, S, D, dtype=torch.float32, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    x_nat = torch.rand((S, D), generator=g)
    x_adv = (x_nat.repeat(R // S, 1) + 0.3 * torch.randn((R, D), generator=g)).clamp(0, 1)
    grad = torch.randn((R, D), generator=g)
    grad[grad.abs() < 0.3] = 0.0  # exercise sign(0) = 0
    eps = torch.rand((R,), generator=g) * 0.2
    eps[0] = 0.0
    return (x_adv.to(device, dtype), x_nat.to(device, dtype), grad.to(device, dtype),
            eps.to(device))


def test_reference_matches_literal_formula_float64():
    xa, xn, g, e = make_inputs(12, 4, 37, torch.float64, device="cpu")
    out = pgd_update(xa, xn, g, e, 0.05, (0.0, 1.0), backend="torch")
    torch.testing.assert_close(out, literal(xa, xn, g, e, 0.05, 0.0, 1.0), rtol=0, atol=0)


def test_reference_float32_matches_literal_to_rounding():
    xa, xn, g, e = make_inputs(10, 5, 50, device="cpu")
    out = pgd_update(xa, xn, g, e, 0.03, (0.0, 1.0), backend="torch")
    torch.testing.assert_close(out.double(), literal(xa, xn, g, e, 0.03, 0.0, 1.0),
                               rtol=0, atol=2e-7)


def test_docstring_example_and_sign_zero():
    x = torch.tensor([[0.5, 0.5, 0.0]])
    g = torch.tensor([[1.0, -2.0, 0.0]])
    out = pgd_update(x, x, g, torch.tensor([0.1]), 0.3, (0.0, 1.0), backend="torch")
    assert out.tolist() == [[pytest.approx(0.6), pytest.approx(0.4), 0.0]]


@needs_triton
@pytest.mark.parametrize(
    "R,S,D",
    [(1, 1, 1), (7, 7, 3), (33, 11, 129), (6, 2, 784), (5, 1, 1000)],
)
def test_triton_equals_torch_bit_for_bit_float32(R, S, D):
    xa, xn, g, e = make_inputs(R, S, D)
    out = torch.full((R, D), math.nan, device=DEVICE)  # every element must be written
    pgd_update(xa, xn, g, e, 0.07, (0.0, 1.0), backend="triton", out=out)
    ref = pgd_update(xa, xn, g, e, 0.07, (0.0, 1.0), backend="torch")
    assert torch.equal(out, ref)


@needs_triton
def test_triton_float16_bit_for_bit_and_bfloat16_within_one_ulp():
    xa, xn, g, e = make_inputs(9, 3, 77)
    for dtype in (torch.float16, torch.bfloat16):
        a, n_, gr = xa.to(dtype), xn.to(dtype), g.to(dtype)
        out = torch.full(a.shape, math.nan, dtype=dtype, device=DEVICE)
        pgd_update(a, n_, gr, e, 0.07, (0.0, 1.0), backend="triton", out=out)
        ref = pgd_update_reference(a, n_, gr, e, 0.07, 0.0, 1.0)
        assert not out.isnan().any()
        if dtype == torch.float16 or DEVICE == "cuda":
            assert torch.equal(out, ref), dtype
        else:
            # triton 3.9's interpreter truncates float32 -> bfloat16 (GPUs round to nearest)
            ulp = 2.0 ** (torch.floor(torch.log2(ref.float().abs().clamp_min(1e-30))) - 7)
            assert ((out.float() - ref.float()).abs() <= ulp).all()


@needs_triton
def test_triton_non_contiguous_and_broadcast_inputs():
    R, S, D = 12, 4, 45
    xa, xn, g, e = make_inputs(R, S, D)
    xa_t = xa.t().contiguous().t()  # column-major [R, D]
    g_wide = torch.zeros((R, 2 * D), device=DEVICE)
    g_wide[:, ::2] = g
    g_strided = g_wide[:, ::2]  # column stride 2
    xn_bcast = xn[:1].expand(R, D)  # row stride 0: the same image for every row
    e_strided = torch.stack([e, e], 1)[:, 0]  # stride 2
    assert not xa_t.is_contiguous() and not g_strided.is_contiguous()
    out = torch.full((D, R), math.nan, device=DEVICE).t()  # non-contiguous destination
    pgd_update(xa_t, xn_bcast, g_strided, e_strided, 0.05, (0.0, 1.0), backend="triton", out=out)
    ref = pgd_update_reference(xa, xn[:1].repeat(R, 1), g, e, 0.05, 0.0, 1.0)
    assert torch.equal(out, ref)


@needs_triton
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_in_place_update(backend):
    xa, xn, g, e = make_inputs(8, 4, 30)
    expected = pgd_update_reference(xa, xn, g, e, 0.05, 0.0, 1.0)
    ptr = xa.data_ptr()
    res = pgd_update(xa, xn, g, e, 0.05, (0.0, 1.0), backend=backend, out=xa)
    assert res.data_ptr() == ptr and torch.equal(xa, expected)


@needs_triton
def test_shared_gradient_rows_and_no_bounds():
    """FGSM's layout: x and the gradient have n rows, the output E * n rows."""
    n, E, D = 5, 3, 20
    xa, xn, g, _ = make_inputs(n, n, D)
    eps = torch.tensor([0.0, 0.1, 0.2], device=DEVICE).repeat_interleave(n)
    for bounds in [(0.0, 1.0), None]:
        out = pgd_update(xn, xn, g, eps, 0.2, bounds, backend="triton")
        ref = pgd_update(xn, xn, g, eps, 0.2, bounds, backend="torch")
        assert out.shape == (E * n, D) and torch.equal(out, ref)
    unclamped = pgd_update(xn, xn, g, eps, 0.2, None, backend="torch")
    assert torch.equal(unclamped, (xn.repeat(E, 1) + eps[:, None] * g.repeat(E, 1).sign()))


@needs_triton
def test_nan_in_iterate_stays_nan_like_torch_clamp():
    xa, xn, g, e = make_inputs(4, 4, 16)
    xa[1, 3] = math.nan
    g[2, 5] = math.nan  # sign(NaN) = 0, as torch.sign
    out = pgd_update(xa, xn, g, e, 0.05, (0.0, 1.0), backend="triton")
    ref = pgd_update(xa, xn, g, e, 0.05, (0.0, 1.0), backend="torch")
    assert torch.equal(out.isnan(), ref.isnan()) and out[1, 3].isnan()
    assert torch.equal(out.nan_to_num(), ref.nan_to_num())


def test_float_eps_and_float64():
    xa, xn, g, _ = make_inputs(6, 6, 10, torch.float64, device="cpu")
    out = pgd_update(xa, xn, g, 0.1, 0.02, backend="auto")
    e = torch.full((6,), 0.1, dtype=torch.float64)
    assert torch.equal(out, literal(xa, xn, g, e, 0.02, 0.0, 1.0))


def test_float64_rejected_by_triton():
    xa, xn, g, e = make_inputs(2, 2, 3, torch.float64, device="cpu")
    with pytest.raises(TypeError, match="float64"):
        pgd_update(xa, xn, g, e, 0.1, backend="triton")


META = "meta"  # a second device on any machine: the device checks are reached without a GPU


@pytest.mark.parametrize(
    "change,exc,match",
    [
        (dict(x_adv=torch.zeros(4, 3, 2)), ValueError, "x_adv: expected a 2-D"),
        (dict(x_nat=torch.zeros(3, 5)), ValueError, "x_nat: expected shape"),
        (dict(x_nat=torch.zeros(0, 5)), ValueError, "x_nat: expected shape"),
        (dict(grad=torch.zeros(4, 4)), ValueError, "grad: expected shape"),
        (dict(grad=torch.zeros(4, 5, dtype=torch.float64)), TypeError, "grad: expected dtype"),
        (dict(x_nat=torch.zeros(2, 5, dtype=torch.float16)), TypeError, "x_nat: expected dtype"),
        (dict(x_adv=[[0.0] * 5] * 4), TypeError, "x_adv: expected a torch.Tensor"),
        (dict(x_nat=[[0.0] * 5] * 2), TypeError, "x_nat: expected a torch.Tensor"),
        (dict(grad=[[0.0] * 5] * 4), TypeError, "grad: expected a torch.Tensor"),
        (dict(out=[[0.0] * 5] * 4), TypeError, "out: expected a torch.Tensor"),
        (dict(x_nat=torch.zeros(2, 5, device=META)), ValueError, "x_nat: expected device cpu"),
        (dict(grad=torch.zeros(4, 5, device=META)), ValueError, "grad: expected device cpu"),
        (dict(eps_per_row=torch.zeros(4, device=META)), ValueError,
         "eps_per_row: expected device cpu"),
        (dict(out=torch.zeros(4, 5, device=META)), ValueError, "out: expected shape"),
        (dict(eps_per_row=torch.zeros(4, 1)), ValueError, "eps_per_row: expected a 1-D"),
        (dict(eps_per_row=torch.zeros(0)), ValueError, "eps_per_row: expected at least one row"),
        (dict(eps_per_row=torch.zeros(4, dtype=torch.int64)), TypeError,
         "eps_per_row: expected a floating dtype"),
        (dict(eps_per_row=torch.zeros(3)), ValueError, "x_adv: expected shape"),
        (dict(eps_per_row="0.1"), TypeError,
         "eps_per_row: expected a float or a 1-D tensor, got str$"),
        (dict(eps_per_row=True), TypeError,
         "eps_per_row: expected a float or a 1-D tensor, got bool$"),
        (dict(eps_per_row=-0.1), ValueError, "eps_per_row: expected a finite number"),
        (dict(step_size=-1.0), ValueError, "step_size: expected a finite number"),
        (dict(step_size=math.nan), ValueError, "step_size: expected a finite number"),
        (dict(bounds=(1.0, 0.0)), ValueError, "bounds: expected lo < hi"),
        (dict(bounds=(0.5, 0.5)), ValueError, "bounds: expected lo < hi"),
        (dict(bounds=(0.0,)), ValueError, "bounds: expected a pair"),
        (dict(out=torch.zeros(4, 4)), ValueError, "out: expected shape"),
        (dict(x_adv=torch.zeros(4, 5, dtype=torch.int64)), TypeError,
         "x_adv: expected a floating dtype"),
        (dict(backend="numpy"), ValueError, "backend: expected one of"),
    ],
)
def test_bad_input_is_refused_with_a_message_that_starts_with_the_argument(change, exc, match):
    args = dict(x_adv=torch.zeros(4, 5), x_nat=torch.zeros(2, 5), grad=torch.zeros(4, 5),
                eps_per_row=torch.zeros(4), step_size=0.1, bounds=(0.0, 1.0))
    kw = {k: change.pop(k) for k in ("backend", "out") if k in change}
    args.update(change)
    with pytest.raises(exc, match="^" + match):
        pgd_update(**args, **kw)


def test_zero_step_size_is_the_projection_alone():
    """step_size >= 0 (inclusive): a zero step projects the iterate on the ball and the box."""
    _, xn, g, e = make_inputs(6, 3, 11, torch.float64, device="cpu")
    noise = torch.randn((6, 11), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    xa = xn.repeat(2, 1) + 0.5 * noise  # outside the ball and the box in places
    out = pgd_update(xa, xn, g, e, 0.0, (0.0, 1.0), backend="torch")
    assert torch.equal(out, literal(xa, xn, g, e, 0.0, 0.0, 1.0))
    assert not torch.equal(out, xa)  # the projection did move some elements


def test_zero_float_eps_pins_every_row_to_its_natural_input():
    """eps_per_row >= 0 (inclusive) as a float too: eps = 0 is the natural input in the box."""
    xa, xn, g, _ = make_inputs(6, 6, 9, torch.float64, device="cpu")
    out = pgd_update(xa, xn, g, 0.0, 0.05, (0.0, 1.0), backend="torch")
    assert torch.equal(out, literal(xa, xn, g, torch.zeros(6), 0.05, 0.0, 1.0))
    assert torch.equal(out, xn)  # x_nat lies in the box already


def test_the_default_backend_runs_on_any_machine():
    """backend defaults to "auto": a call without it runs (the torch row on a CPU)."""
    xa, xn, g, e = make_inputs(6, 3, 10, device="cpu")
    out = pgd_update(xa, xn, g, e, 0.05)
    assert torch.equal(out, pgd_update_reference(xa, xn, g, e, 0.05, 0.0, 1.0))


def test_reference_computes_float32_input_in_float32_whatever_the_radii_dtype():
    """float64 radii on float32 inputs: the ball's edges are float32 differences of the rounded
    radii (float32 arithmetic throughout, as every backend computes), not float64 ones."""
    xa, xn, g, e = make_inputs(8, 4, 64, device="cpu")
    e64 = torch.linspace(0.0, 0.3, 8, dtype=torch.float64) + 0.1  # not float32 numbers
    out = pgd_update_reference(xa, xn, g, e64, 0.05, 0.0, 1.0)
    # the literal formula in float32, every operation rounded to float32
    R = 8
    x = xa + 0.05 * torch.sign(g)
    xn_r = xn.repeat(R // 4, 1)
    e32 = e64.float()[:, None]
    expected = torch.min(torch.max(x, xn_r - e32), xn_r + e32).clamp(0.0, 1.0)
    assert out.dtype == torch.float32 and torch.equal(out, expected)
    in_float64 = literal(xa, xn, g, e64, 0.05, 0.0, 1.0).float()
    assert not torch.equal(out, in_float64)  # the test can tell the two apart


def test_reference_cycles_rows_when_the_width_equals_the_row_count():
    """Row cycling looks at the number of rows only: D == R with S < R rows still cycles."""
    R, S = 6, 2
    xa, xn, g, e = make_inputs(R, S, R, torch.float64, device="cpu")
    for x_adv, grad in ((xa[:S], g), (xa, g[:S])):
        out = pgd_update_reference(x_adv, xn, grad, e, 0.05, 0.0, 1.0)
        assert torch.equal(out, literal(x_adv, xn, grad, e, 0.05, 0.0, 1.0))


@pytest.mark.parametrize("eps", [0.1, "rows"])
def test_outputs_and_eps_rows_live_on_the_inputs_device(eps):
    """On the meta device (no data): every tensor the update allocates (the output, the radii
    of a float eps) is made on the inputs' device, so the update runs there."""
    xa, xn, g, e = (t.to(META) for t in make_inputs(6, 3, 7, device="cpu"))
    out = pgd_update(xa, xn, g, e if eps == "rows" else eps, 0.05, backend="torch")
    assert out.device.type == META and out.shape == (6, 7) and out.dtype == xa.dtype


@needs_triton
def test_triton_row_wider_than_one_interpreter_tile():
    """D above the interpreter's widest tile (4096 columns): a row spans two column blocks."""
    xa, xn, g, e = make_inputs(2, 1, 5000)
    out = torch.full((2, 5000), math.nan, device=DEVICE)
    pgd_update(xa, xn, g, e, 0.07, (0.0, 1.0), backend="triton", out=out)
    assert torch.equal(out, pgd_update(xa, xn, g, e, 0.07, (0.0, 1.0), backend="torch"))


def _is_power_of_2(n):
    return isinstance(n, int) and n >= 1 and n & (n - 1) == 0


@pytest.mark.parametrize("interpreted", [False, True])
def test_tile_plans_are_valid_triton_launches(monkeypatch, interpreted):
    """The launch plan of both paths, also the compiled one on a machine without a GPU: tl.arange
    needs power-of-two blocks and a compiled kernel a power-of-two warp count; the column block
    covers a row up to its cap (512 compiled, 4096 interpreted) and never exceeds it."""
    from powerlaw_fast.ops import attack_step

    monkeypatch.setattr(attack_step, "triton_interpreter_active", lambda: interpreted)
    cap = 4096 if interpreted else 512
    for D in (1, 2, 3, 100, 511, 512, 513, 784, 4096, 4097, 10**6):
        block_r, block_d, num_warps = attack_step._tile_sizes(D)
        assert _is_power_of_2(block_r) and _is_power_of_2(block_d), (D, block_r, block_d)
        assert min(D, cap) <= block_d <= cap, (D, block_d)
        if not interpreted:  # the interpreter ignores num_warps
            assert _is_power_of_2(num_warps), (D, num_warps)


def test_cuda_backend_on_cpu_tensors_is_a_clear_error():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="cuda"):
        pgd_update(x, x, x, 0.1, 0.1, backend="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_triton_equals_torch_bit_for_bit(dtype):
    xa, xn, g, e = make_inputs(3000, 1000, 784, device="cuda")
    a, n_, gr = xa.to(dtype), xn.to(dtype), g.to(dtype)
    out = pgd_update(a, n_, gr, e, 0.01, backend="triton")
    assert torch.equal(out, pgd_update_reference(a, n_, gr, e, 0.01, 0.0, 1.0))


def test_the_update_is_a_stage_of_the_backend_table():
    from powerlaw_fast.ops import attack_step
    from powerlaw_fast.ops.backends import implementation

    rows = {b: implementation("pgd_update", b) for b in ("torch", "triton", "cuda")}
    assert rows["torch"] is attack_step.pgd_update_torch
    assert rows["triton"] is attack_step.pgd_update_triton
    assert rows["cuda"] is attack_step.pgd_update_cuda
    xa, xn, g, e = make_inputs(6, 3, 5, device="cpu")
    out = torch.empty_like(xa)
    assert rows["torch"](xa, xn, g, e, 0.05, 0.0, 1.0, out) is out
    torch.testing.assert_close(out, pgd_update(xa, xn, g, e, 0.05, backend="torch"),
                               rtol=0, atol=0)
