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
