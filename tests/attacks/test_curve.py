"""robustness_curve: agrees with per-epsilon loops, accepts every data form, round-trips JSON."""

import matplotlib
import pytest
import torch
from attack_helpers import make_data, make_mlp, reference_pgd
from torch.utils.data import DataLoader, TensorDataset

from powerlaw_fast.attacks import RobustnessCurve, fgsm, robustness_curve, white_noise

matplotlib.use("Agg")
EPS = [0.0, 0.02, 0.1, 0.3]


def wrong(model, x, y):
    with torch.no_grad():
        return model(x).argmax(1) != y


def test_pgd_curve_matches_per_eps_loop():
    model, (x, y) = make_mlp(), make_data(n=20)
    curve = robustness_curve(model, (x, y), EPS, attack="pgd", steps=5, step_size=0.02,
                             batch_size=8, progress=False, final_iterate=True)
    assert curve.success.shape == (len(EPS), 20) and curve.success.dtype == torch.bool
    for k, e in enumerate(EPS):
        ref_wrong = wrong(model, reference_pgd(model, x, y, e, 5, 0.02), y)
        assert torch.equal(curve.success[k], ref_wrong)
        assert curve.accuracy[k] == pytest.approx(1.0 - ref_wrong.double().mean().item())
    assert curve.accuracy[0] == pytest.approx(1.0 - wrong(model, x, y).double().mean().item())
    assert curve.attack == "pgd"
    assert curve.attack_kwargs == {"steps": 5, "step_size": 0.02, "final_iterate": True}


def test_pgd_curve_with_restarts_and_progress_bar(capsys):
    model, (x, y) = make_mlp(), make_data(n=9)
    curve = robustness_curve(model, (x, y), [0.0, 0.1], steps=2, random_start=True,
                             restarts=2, generator=1, batch_size=4, progress=True)
    assert curve.success.shape == (2, 9)
    assert curve.accuracy[0] == pytest.approx(1.0 - wrong(model, x, y).double().mean().item())
    # captured stderr is not a terminal: no bar there (drawn on a terminal, with several
    # batches: tests/paper/test_experiments.py::test_robustness_curve_draws_a_bar_only_on_a_terminal...)
    assert "pgd" not in capsys.readouterr().err


def test_fgsm_and_noise_curves_match_the_attacks():
    model, (x, y) = make_mlp(), make_data(n=10)
    c = robustness_curve(model, (x, y), EPS, attack="fgsm", progress=False, final_iterate=True)
    adv = fgsm(model, x, y, EPS)
    for k in range(len(EPS)):
        assert torch.equal(c.success[k], wrong(model, adv[k], y))
    n = robustness_curve(model, (x, y), [0.0, 0.5], attack="noise", generator=2, progress=False)
    noisy = white_noise(x, [0.0, 0.5], generator=2)
    assert torch.equal(n.success[1], wrong(model, noisy[1], y))
    assert n.accuracy[0] == c.accuracy[0]


def test_data_forms_agree():
    model, (x, y) = make_mlp(), make_data(n=11)
    kw = dict(attack="fgsm", progress=False)
    a = robustness_curve(model, (x, y), EPS, batch_size=4, **kw)
    b = robustness_curve(model, TensorDataset(x, y), EPS, batch_size=3, **kw)
    c = robustness_curve(model, DataLoader(TensorDataset(x, y), batch_size=5), EPS, **kw)
    assert torch.equal(a.success, b.success) and torch.equal(a.success, c.success)
    assert a.accuracy == b.accuracy == c.accuracy


def test_json_round_trip_and_plot(tmp_path):
    model, (x, y) = make_mlp(), make_data(n=7)
    curve = robustness_curve(model, (x, y), EPS, attack="pgd", steps=2, generator=torch.Generator(),
                             progress=False)
    path = tmp_path / "curve.json"
    curve.to_json(path)
    back = RobustnessCurve.from_json(path)
    assert back.eps == curve.eps and back.accuracy == curve.accuracy
    assert torch.equal(back.success, curve.success) and back.attack == "pgd"
    assert back.attack_kwargs["steps"] == 2 and isinstance(back.attack_kwargs["generator"], str)
    assert RobustnessCurve.from_dict(curve.to_dict()).n_samples == 7
    ax = curve.plot(label="mlp")
    assert ax.get_xlabel() == "epsilon" and len(ax.lines) == 1
    assert list(ax.lines[0].get_xdata()) == EPS


@pytest.mark.parametrize(
    "data,kw,exc,match",
    [
        ("data", dict(attack="cw"), ValueError, "attack"),
        ("data", dict(attack="fgsm", steps=3), TypeError, "steps"),
        ("data", dict(batch_size=0), ValueError, "batch_size"),
        ("data", dict(eps=[-0.1]), ValueError, "eps"),
        ([1, 2, 3], {}, TypeError, "data"),
        ((torch.rand(3, 64), torch.zeros(2, dtype=torch.long)), {}, ValueError, "data"),
        ((torch.rand(0, 64), torch.zeros(0, dtype=torch.long)), {}, ValueError, "data"),
        ((torch.rand(3, 64) + 1.0, torch.zeros(3, dtype=torch.long)), {}, ValueError, "x"),
    ],
)
def test_bad_input(data, kw, exc, match):
    model = make_mlp()
    if isinstance(data, str):
        data = make_data(n=3)
    eps = kw.pop("eps", [0.1])
    with pytest.raises(exc, match=match):
        robustness_curve(model, data, eps, progress=False, steps=1, **kw) if "attack" not in kw \
            else robustness_curve(model, data, eps, progress=False, **kw)
