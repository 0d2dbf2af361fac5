"""White-noise corruption."""

import pytest
import torch

from powerlaw_fast.attacks import white_noise


def test_shapes_sigma_zero_and_bounds():
    x = torch.rand(6, 1, 5, 5)
    out = white_noise(x, [0.0, 0.1, 2.0], generator=1)
    assert out.shape == (3, *x.shape) and out.dtype == x.dtype
    assert torch.equal(out[0], x)
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert white_noise(x, 0.1, generator=1).shape == x.shape


def test_gaussian_with_sigma_and_common_draw():
    x = torch.full((200, 50), 0.5, dtype=torch.float64)
    out = white_noise(x, [0.01, 0.02], bounds=None, generator=3)
    z1, z2 = (out[0] - x) / 0.01, (out[1] - x) / 0.02
    torch.testing.assert_close(z1, z2)  # one draw scaled by each sigma
    assert abs(z1.mean().item()) < 0.02 and abs(z1.std().item() - 1.0) < 0.02


def test_seeded_and_global_rng_untouched():
    x = torch.rand(4, 10)
    state = torch.get_rng_state()
    a = white_noise(x, 0.3, generator=5)
    b = white_noise(x, 0.3, generator=torch.Generator().manual_seed(5))
    c = white_noise(x, 0.3, generator=6)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize(
    "x,sigma,kw,exc,match",
    [
        (torch.rand(2, 3), -0.1, {}, ValueError, "sigma"),
        (torch.rand(2, 3), [0.1, -1.0], {}, ValueError, r"sigma\[1\]"),
        (torch.zeros(2, 3, dtype=torch.long), 0.1, {}, TypeError, "x"),
        ([[0.1]], 0.1, {}, TypeError, "x"),
        (torch.rand(2, 3), 0.1, {"bounds": (1, 0)}, ValueError, "bounds"),
        (torch.rand(2, 3), 0.1, {"generator": 1.5}, TypeError, "generator"),
    ],
)
def test_bad_input(x, sigma, kw, exc, match):
    with pytest.raises(exc, match=match):
        white_noise(x, sigma, **kw)


# --- found by `nox -s mutants -- attacks/noise.py` (issue 28): each test below fails for a
# one-line change of noise.py that the tests above let through


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_normal_draw_in_the_inputs_dtype_scaled_by_each_sigma(dtype):
    x = torch.zeros(3, 5, dtype=dtype)
    out = white_noise(x, [0.0, 0.5, 2.0], bounds=None, generator=9)
    z = torch.randn((3, 5), generator=torch.Generator().manual_seed(9), dtype=dtype)
    assert out.dtype == dtype and out.shape == (3, 3, 5)
    assert torch.equal(out[0], x) and torch.equal(out[1], 0.5 * z)
    assert torch.equal(out[2], 2.0 * z)
    one = white_noise(x, torch.tensor(0.5), bounds=None, generator=9)
    assert one.shape == x.shape and torch.equal(one, 0.5 * z)


def test_custom_bounds_clamp_and_check():
    x = torch.linspace(-1.0, 1.0, 40, dtype=torch.float64).view(4, 10)
    out = white_noise(x, [0.0, 1.0], bounds=(-1.0, 1.0), generator=2)
    z = torch.randn((4, 10), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert torch.equal(out[1], (x + z).clamp(-1.0, 1.0))
    assert (out[1] == -1.0).any() and (out[1] == 1.0).any() and (out[1] < 0).sum() > 5
    with pytest.raises(ValueError, match=r"x: expected every value within bounds \[-0.5, 1.0\] "
                                         r"\(and no NaN\), got 10 values outside"):
        white_noise(x, 0.1, bounds=(-0.5, 1.0))
    with pytest.raises(ValueError, match=r"got 10 values outside"):
        white_noise(x, 0.1, bounds=(-1.0, 0.5))
    assert torch.equal(white_noise(x, 0.0, bounds=(-1.0, 1.0)), x)  # edges are inside


def test_unbounded_noise_is_not_clamped():
    x = torch.full((50, 4), 0.5, dtype=torch.float64)
    out = white_noise(x, 3.0, bounds=None, generator=1)
    assert out.min() < 0 and out.max() > 1


@pytest.mark.parametrize(
    "x,message",
    [
        ([[0.1]], r"^x: expected a torch\.Tensor, got list$"),
        (torch.zeros(2, 3, dtype=torch.long), r"^x: expected a floating dtype .*got torch\.int64$"),
    ],
)
def test_type_errors_name_the_argument_x(x, message):
    with pytest.raises(TypeError, match=message):
        white_noise(x, 0.1)


def test_sigma_is_applied_in_the_inputs_dtype():
    # 0.1 is not a float32 number: scaled by float32(0.1) the float64 noise would be off by
    # |float32(0.1) - 0.1| |z| (about 1.5e-9 |z|), and a float32 sigma would turn half
    # precision inputs into float32 outputs
    x = torch.full((4, 6), 0.5, dtype=torch.float64)
    z = torch.randn((4, 6), generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    assert torch.equal(white_noise(x, [0.0, 0.1], bounds=None, generator=4)[1], x + 0.1 * z)
    for dtype in (torch.float16, torch.bfloat16):
        half = white_noise(x.to(dtype), [0.1, 0.3], generator=4)
        assert half.dtype == dtype and half.shape == (2, 4, 6)
