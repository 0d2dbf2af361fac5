import math

import pytest
import torch
from torch import nn

from powerlaw_fast.paper.models import MLP
from powerlaw_fast.training.accumulator import CovarianceAccumulator, eigh_descending
from powerlaw_fast.training.capture import layer_covariance, layer_spectrum
from powerlaw_fast.training.fits import effective_dimension, fit_power_law


def data(rows, n, seed=0, offset=0.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g, dtype=torch.float64)
    return (torch.randn(rows, n, generator=g, dtype=torch.float64) @ mix + offset).to(dtype)


# ---------------------------------------------------------------- CovarianceAccumulator


def test_accumulator_uneven_batches_match_torch_cov():
    x = data(101, 7, offset=2.0)
    acc = CovarianceAccumulator(7)
    for chunk in (x[:40], x[40:41], x[41:97], x[97:]):  # a single row and a partial last batch
        acc.update(chunk)
    assert acc.count == 101
    torch.testing.assert_close(acc.covariance(), torch.cov(x.T), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(acc.mean, x.mean(0), rtol=1e-12, atol=1e-12)
    cov = acc.covariance()
    assert torch.equal(cov, cov.T)


def test_accumulator_float32_input_accumulates_in_float64():
    x = data(64, 5, dtype=torch.float32)
    acc = CovarianceAccumulator(5).update(x[:30]).update(x[30:])
    assert acc.covariance().dtype == torch.float64
    torch.testing.assert_close(acc.covariance(), torch.cov(x.double().T), rtol=1e-12, atol=1e-12)


def test_accumulator_flattens_and_takes_non_contiguous():
    x = data(50, 12)
    acc = CovarianceAccumulator(6).update(x[:, ::2])
    torch.testing.assert_close(acc.covariance(), torch.cov(x[:, ::2].T))
    acc = CovarianceAccumulator(12).update(x.reshape(50, 3, 4))
    torch.testing.assert_close(acc.covariance(), torch.cov(x.T))


def test_shift_keeps_accuracy_with_a_large_mean():
    # Spread 1e-3 around a mean of 1e4: unshifted float64 sums would lose ~all digits.
    x = data(500, 4) * 1e-3 + 1e4
    acc = CovarianceAccumulator(4)
    for chunk in x.split(64):
        acc.update(chunk)
    ref = torch.cov((x - x[:64].mean(0)).T)  # exact: covariance is shift-invariant
    torch.testing.assert_close(acc.covariance(), ref, rtol=1e-9, atol=0)


def test_merge_and_rebase():
    x = data(90, 6, offset=-3.0)
    a = CovarianceAccumulator(6).update(x[:25]).update(x[25:31])
    b = CovarianceAccumulator(6).update(x[31:])
    b_before = b.sum_outer.clone()
    a.merge(b)
    assert torch.equal(b.sum_outer, b_before)  # other is untouched
    assert a.count == 90
    torch.testing.assert_close(a.covariance(), torch.cov(x.T), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a.mean, x.mean(0), rtol=1e-12, atol=1e-12)
    a.merge(CovarianceAccumulator(6))  # empty: no-op
    empty = CovarianceAccumulator(6).merge(a)
    torch.testing.assert_close(empty.covariance(), torch.cov(x.T), rtol=1e-12, atol=1e-12)

    a.rebase(torch.full((6,), 5.0, dtype=torch.float64))
    torch.testing.assert_close(a.covariance(), torch.cov(x.T), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a.sum, (x - 5.0).sum(0), rtol=1e-12, atol=1e-10)


def test_fixed_shift_sums_add_up():
    # With a common shift, per-process sums are plain sums (what an all-reduce needs).
    x = data(40, 3)
    shift = torch.zeros(3, dtype=torch.float64)
    a = CovarianceAccumulator(3, shift=shift).update(x[:15])
    b = CovarianceAccumulator(3, shift=shift).update(x[15:])
    torch.testing.assert_close(a.sum + b.sum, x.sum(0))
    torch.testing.assert_close(a.sum_outer + b.sum_outer, x.T @ x)


def test_eigh_descending():
    x = data(200, 5)
    values, vectors = CovarianceAccumulator(5).update(x).eigh()
    assert bool((values[:-1] >= values[1:]).all())
    cov = torch.cov(x.T)
    torch.testing.assert_close(cov @ vectors, vectors * values, rtol=1e-10, atol=1e-10)
    v2, _ = eigh_descending(cov)
    torch.testing.assert_close(v2, values)


def test_accumulator_errors():
    acc = CovarianceAccumulator(3)
    with pytest.raises(ValueError, match="no rows"):
        _ = acc.mean
    with pytest.raises(ValueError, match="at least 2 rows"):
        acc.update(torch.randn(1, 3)).covariance()
    with pytest.raises(ValueError, match="expected 3 features"):
        acc.update(torch.randn(4, 5))
    with pytest.raises(ValueError, match="NaN"):
        acc.update(torch.tensor([[1.0, float("nan"), 0.0]]))
    with pytest.raises(TypeError, match="floating"):
        acc.update(torch.ones(2, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"\[B, N\]"):
        acc.update(torch.randn(3))
    with pytest.raises(ValueError, match="num_features"):
        acc.merge(CovarianceAccumulator(4).update(torch.randn(2, 4)))
    with pytest.raises(TypeError, match="CovarianceAccumulator"):
        acc.merge("x")
    with pytest.raises(TypeError, match="dtype"):
        CovarianceAccumulator(3, dtype=torch.float16)
    with pytest.raises(ValueError, match="shift"):
        CovarianceAccumulator(3, shift=torch.zeros(4))


# ---------------------------------------------------------------- layer spectra


def reference_spectrum(model, module, x):
    seen = []
    handle = module.register_forward_hook(lambda m, a, out: seen.append(out))
    model.eval()
    with torch.no_grad():
        model(x)
    handle.remove()
    h = seen[0].reshape(x.shape[0], -1).double()
    return torch.linalg.eigvalsh(torch.cov(h.T)).flip(0)


def test_layer_spectrum_matches_full_batch_reference():
    torch.manual_seed(0)
    net = MLP(widths=(24, 16, 8))
    x = torch.rand(157, 1, 28, 28)
    ref = reference_spectrum(net, net.hidden_layers()["hidden2"], x)
    net.train()
    got = layer_spectrum(net, "hidden2", x, batch_size=50)
    assert got.dtype == torch.float64 and got.shape == (16,)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-9)
    assert net.training  # mode restored
    # a module, None (= last hidden layer), a DataLoader-like iterable of (x, y)
    torch.testing.assert_close(
        layer_spectrum(net, net.hidden_layers()["hidden2"], x, batch_size=64), got
    )
    batches = [(x[i : i + 40], torch.zeros(len(x[i : i + 40]))) for i in range(0, 157, 40)]
    last = layer_spectrum(net, None, batches)
    torch.testing.assert_close(
        last, reference_spectrum(net, net.hidden_layers()["hidden3"], x), rtol=1e-5, atol=1e-9
    )


def test_layer_covariance_stops_after_the_layer():
    calls = []

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 4)
            self.b = nn.Linear(4, 2)

        def forward(self, x):
            h = self.a(x)
            calls.append("b")
            return self.b(h)

    net = Net()
    acc = layer_covariance(net, "a", torch.randn(10, 3), batch_size=4)
    assert acc.count == 10 and calls == []


def test_layer_errors():
    net = MLP(widths=(4, 3))
    x = torch.rand(10, 784)
    with pytest.raises(ValueError, match="no submodule"):
        layer_spectrum(net, "hidden9", x)
    with pytest.raises(ValueError, match="not a submodule"):
        layer_spectrum(net, nn.Linear(2, 2), x)
    with pytest.raises(TypeError, match="layer"):
        layer_spectrum(net, 3, x)
    with pytest.raises(ValueError, match="batch_size"):
        layer_spectrum(net, "hidden1", x, batch_size=0)
    with pytest.raises(TypeError, match="data"):
        layer_spectrum(net, "hidden1", 5)
    with pytest.raises(ValueError, match="hidden_layers"):
        layer_spectrum(nn.Sequential(nn.Linear(2, 2)), None, torch.randn(3, 2))


# ---------------------------------------------------------------- power law and dimension


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.3])
def test_fit_recovers_exponent(alpha):
    n = torch.arange(1, 801, dtype=torch.float64)
    lam = 7.0 * n**-alpha
    got, intercept, window = fit_power_law(lam)
    assert window == (10, 800)
    assert abs(got - alpha) < 1e-10 and abs(intercept - math.log(7.0)) < 1e-9


def test_fit_window_and_noise():
    g = torch.Generator().manual_seed(0)
    n = torch.arange(1, 1001, dtype=torch.float64)
    noise = torch.exp(0.05 * torch.randn(1000, generator=g, dtype=torch.float64))
    lam = n**-1.0 * noise
    lam[:9] = 100.0  # ranks 1..9: outside the default window
    alpha, _, window = fit_power_law(lam.tolist())
    assert window == (10, 1000) and abs(alpha - 1.0) < 0.01
    alpha, _, window = fit_power_law(lam, start=20, stop=200)
    assert window == (20, 200) and abs(alpha - 1.0) < 0.03


def test_fit_stops_before_nonpositive_tail():
    n = torch.arange(1, 101, dtype=torch.float64)
    lam = n**-1.5
    lam[60:] = torch.tensor([0.0] + [-1e-18] * 39, dtype=torch.float64)
    alpha, _, window = fit_power_law(lam, start=5)
    assert window == (5, 60) and abs(alpha - 1.5) < 1e-10
    with pytest.raises(ValueError, match="non-positive"):
        fit_power_law(lam, start=5, stop=80)


def test_fit_errors():
    with pytest.raises(ValueError, match="start"):
        fit_power_law(torch.ones(5), start=6)
    with pytest.raises(ValueError, match="stop"):
        fit_power_law(torch.ones(20), start=10, stop=10)
    with pytest.raises(ValueError, match="1-D"):
        fit_power_law(torch.ones(3, 3))
    with pytest.raises(ValueError, match="NaN"):
        fit_power_law(torch.tensor([1.0, float("nan"), 0.5]), start=1)
    with pytest.raises(ValueError, match="fewer than 2"):
        fit_power_law(torch.tensor([1.0, 0.5, 0.0, 0.0]), start=2)
    with pytest.raises(TypeError, match="eigenvalues"):
        fit_power_law("spectrum")


def test_effective_dimension():
    assert effective_dimension([5.0, 3.0, 1.0, 1.0]) == 3  # exactly 90% at rank 3
    assert effective_dimension(torch.tensor([1.0, 1.0, 5.0, 3.0])) == 3  # sorted first
    assert effective_dimension([5.0, 3.0, 1.0, 1.0], threshold=0.91) == 4
    assert effective_dimension([5.0, 3.0, 1.0, 1.0], threshold=0.5) == 1
    assert effective_dimension(torch.ones(100)) == 90
    assert effective_dimension([2.0, 1.0, -1e-17]) == 2
    n = torch.arange(1, 1001, dtype=torch.float64)
    lam = 1.0 / n
    expected = int(torch.nonzero(lam.cumsum(0) / lam.sum() >= 0.9)[0]) + 1
    assert effective_dimension(lam) == expected
    with pytest.raises(ValueError, match="threshold"):
        effective_dimension([1.0], threshold=1.5)
    with pytest.raises(ValueError, match="zero"):
        effective_dimension([0.0, 0.0])


def _all_reduce_body(rank, world, rows, result_file):
    acc = CovarianceAccumulator(rows.shape[1])
    mine = rows[:7] if rank == 0 else rows[7:]  # uneven split, different first-batch shifts
    for chunk in mine.split(4):
        acc.update(chunk)
    acc.all_reduce()
    if rank == 0:
        torch.save({"cov": acc.covariance(), "mean": acc.mean, "count": acc.count}, result_file)


def test_all_reduce_over_two_processes(tmp_path):
    from tests.distributed_utils import run_on_processes

    rows = data(30, 4, offset=5.0)
    out = tmp_path / "result.pt"
    run_on_processes(_all_reduce_body, 2, tmp_path, rows, str(out))
    got = torch.load(out)
    assert got["count"] == 30
    torch.testing.assert_close(got["cov"], torch.cov(rows.T), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got["mean"], rows.mean(0), rtol=1e-12, atol=1e-12)


def test_all_reduce_without_process_group_is_a_no_op():
    acc = CovarianceAccumulator(3).update(torch.randn(5, 3, dtype=torch.float64))
    before = acc.covariance()
    assert acc.all_reduce() is acc
    torch.testing.assert_close(acc.covariance(), before)
