"""CovarianceAccumulator beyond tests/training/test_spectra.py: the all-reduce over a process
group (run in-process, one thread per rank: tests/distributed_utils.py's ThreadGroup), the
shift and rebase algebra, and the argument checks.

Found by `nox -s mutants -- training/accumulator.py` (issue 28): each test fails for a one-line
change of accumulator.py that test_spectra.py lets through."""

import pytest
import torch

from powerlaw_fast.training.accumulator import CovarianceAccumulator, eigh_descending
from tests.distributed_utils import ThreadGroup


def data(rows, n, seed=0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g, dtype=torch.float64)
    return torch.randn(rows, n, generator=g, dtype=torch.float64) @ mix + offset


@pytest.fixture
def thread_group(monkeypatch):
    return lambda world: ThreadGroup(range(world)).patch(monkeypatch)


def test_all_reduce_gives_every_rank_the_covariance_of_all_rows(thread_group):
    rows = data(30, 4, offset=5.0)
    # uneven (one rank holds a single row), and each rank shifts by its own first batch
    parts = [rows[:1], rows[1:19], rows[19:]]
    group = thread_group(3)
    token = object()

    def body(rank):
        acc = CovarianceAccumulator(4)
        for chunk in parts[rank].split(4):
            acc.update(chunk)
        assert acc.all_reduce(token) is acc
        return acc

    for acc in group.run(body):
        assert acc.count == 30
        torch.testing.assert_close(acc.covariance(), torch.cov(rows.T), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(acc.mean, rows.mean(0), rtol=1e-12, atol=1e-12)
        # the common shift: the count-weighted mean of the ranks' first-batch means
        shift = sum(len(p) * p[:4].mean(0) for p in parts) / 30
        torch.testing.assert_close(acc.shift, shift, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(acc.sum, (rows - shift).sum(0), rtol=1e-12, atol=1e-11)
    assert len(group.collectives) == 3  # the shift and count, S1, S2: one all-reduce each
    assert group.groups and all(g is token for g in group.groups)


def test_a_rank_without_rows_takes_part_with_zeros(thread_group):
    rows = data(9, 3, seed=1, offset=-2.0)
    group = thread_group(2)

    def body(rank):
        acc = CovarianceAccumulator(3)
        if rank == 0:
            acc.update(rows)
        return acc.all_reduce()

    for acc in group.run(body):
        assert acc.count == 9
        torch.testing.assert_close(acc.covariance(), torch.cov(rows.T), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(acc.mean, rows.mean(0), rtol=1e-12, atol=1e-12)


def test_all_reduce_of_ranks_without_rows_leaves_them_empty(thread_group):
    group = thread_group(2)
    accs = group.run(lambda rank: CovarianceAccumulator(3).all_reduce())
    for acc in accs:
        assert acc.count == 0 and acc.shift is None
        assert torch.equal(acc.sum, torch.zeros(3, dtype=torch.float64))
    assert len(group.collectives) == 1  # the count is all-reduced, then nothing more


def test_all_reduce_with_one_process_changes_nothing(thread_group):
    group = thread_group(1)
    x = data(6, 3, seed=2)
    acc = CovarianceAccumulator(3).update(x)
    shift, s1, s2 = acc.shift.clone(), acc.sum.clone(), acc.sum_outer.clone()
    assert acc.all_reduce() is acc
    assert group.collectives == [] and acc.count == 6
    assert torch.equal(acc.shift, shift) and torch.equal(acc.sum, s1)
    assert torch.equal(acc.sum_outer, s2)


def test_float32_accumulation_and_device_are_kept():
    x = data(40, 5, seed=3, offset=1.0)
    acc = CovarianceAccumulator(5, device="cpu", dtype=torch.float32)
    assert acc.device == torch.device("cpu") and acc.dtype == torch.float32
    assert acc.sum.dtype == acc.sum_outer.dtype == torch.float32
    assert acc.sum.shape == (5,) and acc.sum_outer.shape == (5, 5)
    acc.update(x[:10]).update(x[10:])
    assert acc.covariance().dtype == torch.float32 and acc.mean.dtype == torch.float32
    torch.testing.assert_close(acc.covariance(), torch.cov(x.T).float(), rtol=1e-5, atol=1e-5)
    assert repr(acc) == ("CovarianceAccumulator(num_features=5, count=40, device=cpu, "
                         "dtype=torch.float32)")


def test_a_fixed_shift_is_kept_and_the_sums_are_around_it():
    x = data(12, 3, seed=4, offset=3.0)
    shift = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float32)  # cast to the sums' float64
    acc = CovarianceAccumulator(3, shift=shift).update(x)
    assert acc.shift.dtype == torch.float64 and torch.equal(acc.shift, shift.double())
    torch.testing.assert_close(acc.sum, (x - shift.double()).sum(0), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(acc.mean, x.mean(0), rtol=1e-13, atol=1e-13)


def test_rebase_is_exact_algebra_on_every_sum():
    x = data(20, 4, seed=5, offset=2.0)
    acc = CovarianceAccumulator(4).update(x[:8]).update(x[8:])
    new = torch.tensor([0.5, -1.0, 2.0, 4.0], dtype=torch.float64)
    acc.rebase(new)
    assert torch.equal(acc.shift, new) and acc.count == 20
    d = x - new
    torch.testing.assert_close(acc.sum, d.sum(0), rtol=1e-12, atol=1e-11)
    torch.testing.assert_close(acc.sum_outer, d.T @ d, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(acc.covariance(), torch.cov(x.T), rtol=1e-12, atol=1e-12)
    # before any row a rebase only sets the shift
    empty = CovarianceAccumulator(4).rebase(new)
    assert torch.equal(empty.shift, new) and empty.count == 0
    assert torch.equal(empty.update(x).sum, (x - new).sum(0))


def test_merge_into_an_empty_accumulator_copies_the_other():
    x = data(15, 3, seed=6, offset=-4.0)
    other = CovarianceAccumulator(3).update(x)
    merged = CovarianceAccumulator(3).merge(other)
    assert merged.count == 15 and torch.equal(merged.shift, other.shift)
    assert torch.equal(merged.sum, other.sum) and torch.equal(merged.sum_outer, other.sum_outer)
    merged.update(x)  # the merged sums are copies: other keeps its own
    assert other.count == 15 and merged.count == 30
    torch.testing.assert_close(other.covariance(), torch.cov(x.T), rtol=1e-12, atol=1e-12)


def test_merge_of_float32_sums_into_float64_is_exact_for_integers():
    x = torch.arange(24, dtype=torch.float64).view(8, 3) % 5
    a = CovarianceAccumulator(3).update(x[:3])
    b = CovarianceAccumulator(3, dtype=torch.float32).update(x[3:])
    a.merge(b)
    assert a.count == 8 and a.sum.dtype == torch.float64
    torch.testing.assert_close(a.covariance(), torch.cov(x.T), rtol=1e-6, atol=1e-6)
    # merged into an empty one, the shift too is in the accumulator's float64
    empty = CovarianceAccumulator(3).merge(b)
    assert empty.shift.dtype == empty.sum.dtype == empty.sum_outer.dtype == torch.float64
    torch.testing.assert_close(empty.covariance(), torch.cov(x[3:].T), rtol=1e-6, atol=1e-6)


def test_the_covariance_of_a_single_row_per_batch_is_unbiased():
    x = torch.tensor([[0.0, 1.0], [2.0, 5.0], [4.0, 3.0]], dtype=torch.float64)
    acc = CovarianceAccumulator(2)
    for row in x:
        acc.update(row[None])
    # sample covariance with 1/(n - 1): var 4 and 4, covariance 2
    assert torch.equal(acc.covariance(), torch.tensor([[4.0, 2.0], [2.0, 4.0]],
                                                      dtype=torch.float64))
    assert torch.equal(acc.mean, torch.tensor([2.0, 3.0], dtype=torch.float64))


def test_two_rows_are_enough_and_one_feature_is_a_variance():
    two = CovarianceAccumulator(2).update(torch.tensor([[1.0, 2.0], [3.0, -2.0]]))
    assert torch.equal(two.covariance(), torch.tensor([[2.0, -4.0], [-4.0, 8.0]],
                                                      dtype=torch.float64))
    one = CovarianceAccumulator(1).update(torch.tensor([[1.0], [2.0], [6.0]]))
    assert torch.equal(one.covariance(), torch.tensor([[7.0]], dtype=torch.float64))
    assert torch.equal(one.mean, torch.tensor([3.0], dtype=torch.float64))


def test_eigh_descending_orders_values_and_vectors_together():
    cov = torch.diag(torch.tensor([1.0, 3.0, 2.0], dtype=torch.float64))
    values, vectors = eigh_descending(cov)
    assert torch.equal(values, torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))
    assert torch.equal(vectors.abs(), torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0],
                                                    [0.0, 1.0, 0.0]], dtype=torch.float64))


@pytest.mark.parametrize(
    "make,exc,match",
    [
        (lambda: CovarianceAccumulator(0), ValueError,
         r"^num_features: expected an integer in 1\.\.16777216, got 0$"),
        (lambda: CovarianceAccumulator(2**24 + 1), ValueError, r"^num_features: .*got 16777217$"),
        (lambda: CovarianceAccumulator(3, dtype=torch.float16), TypeError,
         r"^dtype: expected torch\.float64 or torch\.float32, got torch\.float16$"),
        (lambda: CovarianceAccumulator(3, shift=torch.zeros(4)), ValueError,
         r"^shift: expected shape \[3\] \(num_features\), got \(4,\)$"),
        (lambda: CovarianceAccumulator(3, shift=[0.0, 0.0, 0.0]), TypeError,
         r"^shift: expected a torch\.Tensor, got list$"),
        (lambda: CovarianceAccumulator(3).rebase(torch.zeros(2)), ValueError,
         r"^shift: expected shape \[3\]"),
        (lambda: CovarianceAccumulator(3).update([[1.0, 2.0, 3.0]]), TypeError,
         r"^x: expected a torch\.Tensor, got list$"),
        (lambda: CovarianceAccumulator(3).update(torch.ones(2, 3, dtype=torch.int64)), TypeError,
         r"^x: expected a floating dtype"),
        (lambda: CovarianceAccumulator(3).update(torch.ones(0, 3)), ValueError,
         r"^x: expected \[B, N\] or \[B, \*\] with B >= 1, got \(0, 3\)$"),
        (lambda: CovarianceAccumulator(3).update(torch.ones(2, 4)), ValueError,
         r"^x: expected 3 features per sample \(num_features\), got 4 from shape \(2, 4\)$"),
        (lambda: CovarianceAccumulator(3).update(torch.tensor([[1.0, float("inf"), 0.0]])),
         ValueError, r"^x: contains NaN or infinite values$"),
        (lambda: CovarianceAccumulator(3).merge(CovarianceAccumulator(4)), ValueError,
         r"^other: expected num_features = 3, got 4$"),
        (lambda: CovarianceAccumulator(3).merge("acc"), TypeError,
         r"^other: expected a CovarianceAccumulator, got str$"),
        (lambda: CovarianceAccumulator(3).mean, ValueError,
         r"^CovarianceAccumulator: no rows yet, the mean is undefined$"),
        (lambda: CovarianceAccumulator(3).update(torch.ones(1, 3)).covariance(), ValueError,
         r"^CovarianceAccumulator: need at least 2 rows for a covariance, got 1$"),
    ],
)
def test_errors_name_the_argument_and_what_was_given(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_the_sums_and_a_given_shift_live_on_the_accumulators_device():
    # the meta device stands in for a GPU: a tensor left on the CPU would show
    acc = CovarianceAccumulator(3, device="meta", shift=torch.zeros(3, dtype=torch.float32))
    assert acc.device == torch.device("meta")
    for t in (acc.sum, acc.sum_outer, acc.shift):
        assert t.device.type == "meta" and t.dtype == torch.float64


def test_the_largest_width_is_accepted():
    acc = CovarianceAccumulator(2**24, dtype=torch.float32, device="meta")
    assert acc.num_features == 2**24 and acc.sum_outer.shape == (2**24, 2**24)
