"""Issue 16 (attacks): labels outside [0, classes) and inputs white_noise must refuse."""

import math

import pytest
import torch
from attack_helpers import make_data, make_mlp

from powerlaw_fast.attacks import fgsm, pgd, robustness_curve, white_noise


def _labels(values):
    return torch.tensor(values, dtype=torch.long)


@pytest.mark.parametrize("attack", ["pgd", "fgsm", "noise"])
@pytest.mark.parametrize("bad", [10, 12, -1, -100])
def test_curve_refuses_labels_out_of_range(attack, bad):
    """Before: IndexError (pgd/fgsm), -100 silently ignored by cross_entropy, noise: acc 0.0."""
    model, (x, y) = make_mlp(), make_data(n=4)
    y = y.clone()
    y[2] = bad
    with pytest.raises(ValueError, match=r"y: expected class labels in \[0, (10|classes)\)"):
        robustness_curve(model, (x, y), [0.0, 0.1], attack=attack, progress=False,
                         **({"steps": 2} if attack == "pgd" else {}))


@pytest.mark.parametrize("fn", [pgd, fgsm])
@pytest.mark.parametrize("bad", [10, -100])
def test_attacks_refuse_labels_out_of_range(fn, bad):
    model, (x, y) = make_mlp(), make_data(n=4)
    y = y.clone()
    y[0] = bad
    with pytest.raises(ValueError, match=r"y: expected class labels in \[0, (10|classes)\)"):
        fn(model, x, y, [0.0, 0.1])


def test_labels_at_the_edges_are_accepted():
    model, (x, _) = make_mlp(), make_data(n=4)
    y = _labels([0, 9, 0, 9])
    c = robustness_curve(model, (x, y), [0.0], attack="noise", progress=False)
    assert len(c.accuracy) == 1


def test_model_without_class_logits_is_a_clear_error():
    x, y = make_data(n=4)
    model = torch.nn.Flatten(0)  # returns [n * 64]: not [n, classes]
    with pytest.raises(ValueError, match="model: expected logits"):
        fgsm(model, x, y, 0.1)


def test_white_noise_checks_bounds_like_the_other_attacks():
    """Before: white_noise(x + 5, 0.0) returned the clamped x, accuracy 1.0 downstream."""
    x = torch.rand(3, 4)
    with pytest.raises(ValueError, match=r"x: expected every value within bounds"):
        white_noise(x + 5, 0.0)
    model, (xd, y) = make_mlp(), make_data(n=3)
    with pytest.raises(ValueError, match=r"x: expected every value within bounds"):
        robustness_curve(model, (xd + 5, y), [0.0], attack="noise", progress=False)
    # without bounds any finite input is fine, and sigma = 0 returns it exactly
    assert torch.equal(white_noise(x + 5, 0.0, bounds=None), x + 5)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_white_noise_refuses_non_finite_inputs(bad):
    """Before: NaN went through (bounds=None) or was reported as a value (bounds)."""
    x = torch.rand(3, 4)
    x[1, 2] = bad
    with pytest.raises(ValueError, match="x: expected"):
        white_noise(x, 0.1, bounds=None)
    with pytest.raises(ValueError, match="x: expected"):
        white_noise(x, 0.1)
