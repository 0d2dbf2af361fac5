"""The per-epoch refresh pass (training/_refresh.py): its progress bar, the errors it names, and
rank 0's bases on every rank of a process group (ranks as threads in this process:
tests/distributed_utils.py's ThreadGroup).

Found by `nox -s mutants -- training/_refresh.py` (issue 28): each test fails for a one-line
change of _refresh.py that the regulariser's tests let through."""

import pytest
import torch
from torch import nn

from powerlaw_fast.training._hooks import LayerHooks
from powerlaw_fast.training._refresh import accumulate_layers, eigenbases
from powerlaw_fast.training.accumulator import eigh_descending
from tests.distributed_utils import ThreadGroup


def refresh(model, layers, data, *, batch_size=4, progress=False):
    hooks = LayerHooks(model, {name: model.get_submodule(name) for name in layers})
    try:
        return accumulate_layers(model, list(layers), hooks, data, batch_size=batch_size,
                                 progress=progress)
    finally:
        hooks.remove()


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


# --- the progress bar


@pytest.mark.parametrize(
    "make_model,data",
    [
        (mlp, torch.rand(10, 3)),  # a tensor: ceil(10 / 4) batches
        (lambda: nn.Sequential(nn.Embedding(6, 4), nn.Tanh()), torch.arange(10) % 6),  # [M]
        (mlp, [torch.rand(4, 3), (torch.rand(4, 3), 0), torch.rand(2, 3)]),  # len() batches
    ],
)
def test_the_progress_bar_counts_batches_and_is_cleared_at_the_end(capsys, make_model, data):
    accs = refresh(make_model(), ["1"], data, progress=True)
    assert accs["1"].count == 10
    err = capsys.readouterr().err
    # drawn at the start with the number of batches, and erased (no newline) at the end
    assert "spectral refresh:   0%|" in err and "| 0/3 [" in err and "?batch/s]" in err
    assert "\n" not in err


def test_without_progress_nothing_is_drawn_and_unsized_data_has_no_total(capsys):
    refresh(mlp(), ["1"], torch.rand(10, 3), progress=False)
    assert capsys.readouterr().err == ""
    refresh(mlp(), ["1"], (b for b in torch.rand(10, 3).split(4)), progress=True)
    err = capsys.readouterr().err
    assert "spectral refresh: 0batch [" in err and "/" not in err.split("[")[0]


# --- errors


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Tanh()

    def forward(self, x):
        return self.b(self.a(self.a(x)))


class Pair(nn.Module):
    def forward(self, x):
        return x, x


@pytest.mark.parametrize(
    "model,layer,data,exc,match",
    [
        (nn.Sequential(nn.Linear(3, 3), Pair()), "1", torch.rand(4, 3), TypeError,
         r"^layer '1': expected the layer to output a tensor, got tuple$"),
        (Twice(), ["a", "b"], torch.rand(4, 3), RuntimeError,
         r"^layer 'a' ran twice in one forward"),
        (nn.Sequential(nn.Flatten()), "0", [torch.rand(4, 1, 4, 4), torch.rand(4, 1, 2, 2)],
         ValueError, r"^layer '0': expected 16 features per sample as in the first batch, "
                     r"got 4$"),
        (mlp(), "1", [], ValueError, r"^data: no batches to refresh the eigenbases from$"),
        (mlp(), "1", torch.tensor(1.0), ValueError,
         r"^data: expected a non-empty \[M, \.\.\.\] tensor, got \(\)$"),
    ],
)
def test_errors_name_the_layer_and_what_was_seen(model, layer, data, exc, match):
    with pytest.raises(exc, match=match):
        refresh(model, layer if isinstance(layer, list) else [layer], data)


# --- rank 0's bases on every rank


@pytest.fixture
def thread_group(monkeypatch):
    return lambda members: ThreadGroup(members).patch(monkeypatch)


def covariances(rank):
    g = torch.Generator().manual_seed(rank)
    out = {}
    for name, n in (("a", 3), ("b", 2)):
        h = torch.randn(20, n, generator=g, dtype=torch.float64)
        out[name] = torch.cov(h.T)
    return out


def test_every_rank_gets_the_bases_and_eigenvalues_of_the_groups_first_rank(thread_group):
    # a group of the global ranks 3 and 5: its first rank is global rank 3
    group = thread_group([3, 5])
    token = object()
    results = group.run(lambda rank: eigenbases(covariances(rank), token))
    first = {name: eigh_descending(cov) for name, cov in covariances(0).items()}
    for basis, values in results:
        for name, (lam, V) in first.items():
            assert torch.equal(values[name], lam)
            assert torch.equal(basis[name], V.to(torch.float32))
    assert group.collectives == [("broadcast", 3)] * 4  # two tensors per layer, from rank 3
    assert group.groups and all(g is token for g in group.groups)


def test_a_group_of_one_broadcasts_nothing(thread_group):
    group = thread_group([0])
    (basis, values), = group.run(lambda rank: eigenbases(covariances(4), object()))
    for name, cov in covariances(4).items():
        lam, V = eigh_descending(cov)
        assert torch.equal(values[name], lam) and torch.equal(basis[name], V.float())
    assert group.collectives == []
