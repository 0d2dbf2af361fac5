"""robustness_curve: agrees with per-epsilon loops, accepts every data form, round-trips JSON."""

import matplotlib
import pytest
import torch
from attack_helpers import Recording, make_data, make_mlp, reference_pgd
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
    # batches: tests/paper/test_experiments.py::
    # test_robustness_curve_draws_a_bar_only_on_a_terminal...)
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


# --- found by `nox -s mutants -- attacks/curve.py` (issue 28): each test below fails for a
# one-line change of curve.py that the tests above let through


def test_json_safe_values_and_repr():
    import numpy as np

    model, (x, y) = make_mlp(), make_data(n=3)
    c = robustness_curve(model, (x, y), [0.0, 0.05], attack="fgsm", progress=False,
                         bounds=(0, 1), max_batch=np.int64(2))
    d = c.to_dict()
    assert d["attack_kwargs"] == {"bounds": [0, 1], "max_batch": 2}
    assert type(d["attack_kwargs"]["max_batch"]) is int
    from powerlaw_fast.attacks.curve import _json_safe

    assert _json_safe({1: (np.float32(0.5), None, True, "s", [np.int8(3)])}) == \
        {"1": [0.5, None, True, "s", [3]]}
    assert type(_json_safe(np.float32(0.5))) is float and _json_safe(True) is True
    assert _json_safe(torch.device("cpu")) == "device(type='cpu')"
    assert repr(c) == (f"RobustnessCurve(attack='fgsm', eps=[0, 0.05], accuracy="
                       f"[{c.accuracy[0]:.4g}, {c.accuracy[1]:.4g}], n_samples=3)")


def test_to_dict_success_strings_and_per_sample_steps():
    success = torch.tensor([[True, False, True], [True, True, True]])
    step = torch.tensor([[0, -1, 2], [0, 1, 2]])
    c = RobustnessCurve(eps=[0.1, 0.2], accuracy=[1 / 3, 0.0], success=success, attack="pgd",
                        step=step, found_at=torch.tensor([[0, -1, 0], [0, 1, 0]]),
                        work={"row_steps": 4})
    d = c.to_dict()
    assert d["success"] == ["101", "111"] and d["n_samples"] == 3 and "step" not in d
    assert d["eps"] == [0.1, 0.2] and d["work"] == {"row_steps": 4}
    full = c.to_dict(per_sample_steps=True)
    assert full["step"] == step.tolist() and full["found_at"] == [[0, -1, 0], [0, 1, 0]]
    back = RobustnessCurve.from_dict(full)
    assert torch.equal(back.success, success) and torch.equal(back.step, step)
    assert back.work == {"row_steps": 4} and back.attack_kwargs == {}
    noise = RobustnessCurve(eps=[0.0], accuracy=[1.0], success=torch.zeros(1, 2, dtype=bool),
                            attack="noise")
    d = noise.to_dict(per_sample_steps=True)
    assert d["step"] is None and d["found_at"] is None
    back = RobustnessCurve.from_dict(d)
    assert back.step is None and back.found_at is None and back.n_samples == 2


def test_noise_plot_labels_and_limits():
    c = RobustnessCurve(eps=[0.0, 0.5], accuracy=[0.9, 0.4],
                        success=torch.zeros(2, 4, dtype=bool), attack="noise")
    ax = c.plot()
    assert ax.get_xlabel() == "sigma" and ax.get_ylabel() == "accuracy"
    assert ax.get_ylim() == (0.0, 1.0)
    line = ax.lines[0]
    assert line.get_label() == "NOISE" and line.get_marker() == "o"
    assert list(line.get_ydata()) == [0.9, 0.4]
    ax2 = c.plot(ax=ax, label="mine", marker="x")
    assert ax2 is ax and ax.lines[1].get_label() == "mine" and ax.lines[1].get_marker() == "x"


def test_data_refused_with_clear_errors():
    model, (x, y) = make_mlp(), make_data(n=3)
    with pytest.raises(ValueError, match=r"data: expected a TensorDataset of \(x, y\), got one "
                                         r"tensor"):
        robustness_curve(model, TensorDataset(x), [0.0], attack="fgsm", progress=False)
    with pytest.raises(TypeError, match="data: expected x and y to be tensors"):
        robustness_curve(model, (x, y.tolist()), [0.0], attack="fgsm", progress=False)
    with pytest.raises(ValueError, match="data: x has 3 samples but y has 2"):
        robustness_curve(model, (x, y[:2]), [0.0], attack="fgsm", progress=False)
    with pytest.raises(TypeError, match=r"attack_kwargs: \['steps'\] not accepted by "
                                        r"attack='noise'; expected some of \['bounds', "
                                        r"'generator', 'max_batch'\]"):
        robustness_curve(model, (x, y), [0.0], attack="noise", steps=3, progress=False)
    with pytest.raises(ValueError, match=r"attack: expected one of \('pgd', 'fgsm', 'noise'\), "
                                         r"got 'cw'"):
        robustness_curve(model, (x, y), [0.0], attack="cw", progress=False)
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module, got function"):
        robustness_curve(lambda t: t, (x, y), [0.0], progress=False)
    with pytest.raises(ValueError, match="sigma"):
        robustness_curve(model, (x, y), [-1.0], attack="noise", progress=False)
    with pytest.raises(ValueError, match="bounds"):
        robustness_curve(model, (x, y), [0.0], attack="noise", bounds=(1, 0), progress=False)
    with pytest.raises(ValueError, match="max_batch"):
        robustness_curve(model, (x, y), [0.0], attack="noise", max_batch=0, progress=False)
    with pytest.raises(TypeError, match="final_iterate: expected a bool, got int"):
        robustness_curve(model, (x, y), [0.0], attack="fgsm", final_iterate=1, progress=False)
    with pytest.raises(ValueError, match="precision"):
        robustness_curve(model, (x, y), [0.0], precision="fp16", progress=False)


def test_n_batches():
    from torch.utils.data import IterableDataset

    from powerlaw_fast.attacks.curve import _n_batches

    x, y = make_data(n=10)
    assert _n_batches((x, y), 4) == 3 and _n_batches([x, y], 5) == 2
    assert _n_batches(TensorDataset(x, y), 3) == 4
    assert _n_batches(DataLoader(TensorDataset(x, y), batch_size=6), 1) == 2

    class Stream(IterableDataset):
        def __iter__(self):
            yield from zip(x, y, strict=True)

    assert _n_batches(DataLoader(Stream(), batch_size=4), 4) is None
    assert _n_batches([1, 2], 4) is None and _n_batches("ab", 4) is None


def test_noise_curve_with_custom_bounds_batches_and_work():
    model = make_mlp()
    x, y = make_data(n=10)
    x = 2 * x - 1
    rec = Recording(model)
    c = robustness_curve(rec, (x, y), [0.0, 0.3], attack="noise", bounds=(-1.0, 1.0),
                         generator=4, batch_size=6, max_batch=5, progress=False)
    # one generator over the batches: batch 2 continues batch 1's stream
    g = torch.Generator().manual_seed(4)
    noisy = torch.cat([white_noise(x[:6], [0.0, 0.3], bounds=(-1.0, 1.0), generator=g),
                       white_noise(x[6:], [0.0, 0.3], bounds=(-1.0, 1.0), generator=g)], dim=1)
    assert torch.equal(c.success, torch.stack([wrong(model, a, y) for a in noisy]))
    assert c.step is None and c.found_at is None
    assert c.work == {"row_steps": 0, "row_forwards": 2 + 2 * 10, "unverified": 0}
    assert max(rows for rows, _ in rec.calls) <= 5
    assert c.accuracy == pytest.approx((1 - c.success.double().mean(1)).tolist())


def test_pgd_curve_work_sums_over_batches_and_random_starts_continue():
    model, (x, y) = make_mlp(), make_data(n=10)
    rec = Recording(model)
    kw = dict(steps=2, step_size=0.01, random_start=True, generator=3, final_iterate=True)
    c = robustness_curve(rec, (x, y), [0.0, 0.1], batch_size=6, progress=False, **kw)
    grads = sum(rows for rows, g in rec.calls if g)
    forwards = sum(rows for rows, g in rec.calls if not g)
    assert c.work["row_steps"] == grads == 10 * 2
    assert c.work["row_forwards"] == forwards  # the label checks (one row per batch) included
    assert c.work["row_forwards"] == 2 + 10 + 10 and c.work["unverified"] == 0
    # the second batch's starts continue the first batch's stream of one generator
    gen = torch.Generator().manual_seed(3)
    parts = []
    for sl in (slice(0, 6), slice(6, 10)):
        u = torch.rand((sl.stop - sl.start, 64), generator=gen, dtype=torch.float64)
        start = (x[sl] + (2 * u.view_as(x[sl]) - 1) * 0.1).clamp(0, 1)
        parts.append(wrong(model, reference_pgd(model, x[sl], y[sl], 0.1, 2, 0.01,
                                                x_start=start), y[sl]))
    assert torch.equal(c.success[1], torch.cat(parts))
    assert torch.equal(c.step[0], torch.where(c.success[0], 0, -1))


def test_pgd_curve_batches_of_a_dataloader_in_default_mode():
    model, (x, y) = make_mlp(), make_data(n=9)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    a = robustness_curve(model, loader, EPS, steps=3, progress=False)
    b = robustness_curve(model, (x, y), EPS, steps=3, batch_size=9, progress=False)
    assert torch.equal(a.success, b.success) and torch.equal(a.step, b.step)
    assert torch.equal(a.found_at, b.found_at) and a.accuracy == b.accuracy
    assert a.work["row_forwards"] == b.work["row_forwards"] + 2  # 3 label checks, not 1


def test_default_pgd_is_40_steps_of_0_01_and_batches_of_one_are_accepted():
    model, (x, y) = make_mlp(), make_data(n=3)
    c = robustness_curve(model, (x, y), [0.05], final_iterate=True, batch_size=1, progress=False)
    ref = wrong(model, reference_pgd(model, x, y, 0.05, 40, 0.01), y)
    assert torch.equal(c.success[0], ref) and c.work["row_steps"] == 3 * 40
    with pytest.raises(TypeError, match=r"data: expected an \(x, y\) pair of tensors, a "
                                        r"TensorDataset or a DataLoader, got list"):
        robustness_curve(model, [x, y, y], [0.0], attack="fgsm", progress=False)


def test_bar_on_a_terminal_counts_the_batches(monkeypatch):
    import sys

    class Terminal:
        text = ""

        def isatty(self):
            return True

        def write(self, text):
            self.text += text

        def flush(self):
            pass

    model, (x, y) = make_mlp(), make_data(n=6)
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    robustness_curve(model, (x, y), [0.0, 0.1], attack="fgsm", batch_size=2)
    assert "fgsm x 2 eps" in term.text and "3/3" in term.text


@pytest.mark.parametrize("attack", ["pgd", "fgsm"])
def test_the_backend_argument_reaches_the_attack(attack):
    model, (x, y) = make_mlp(), make_data(n=3)
    kw = {"steps": 1} if attack == "pgd" else {}
    with pytest.raises(ValueError, match=r"backend: expected one of"):
        robustness_curve(model, (x, y), [0.1], attack=attack, backend="jax", progress=False,
                         **kw)
    c = robustness_curve(model, (x, y), [0.1], attack=attack, backend="torch", progress=False,
                         **kw)
    assert c.success.shape == (1, 3)


def test_the_precision_argument_reaches_pgd():
    model, (x, _) = make_mlp(torch.float32), make_data(n=6, dtype=torch.float32)
    with torch.no_grad():
        y = model(x).argmax(1)  # every sample clean-correct: every row steps
    seen = []

    class Autocast(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, t):
            if t.requires_grad:
                seen.append(torch.is_autocast_enabled("cpu"))
            return self.inner(t)

    robustness_curve(Autocast(), (x, y), [0.001], steps=2, precision="bf16", progress=False)
    assert seen and all(seen)
