"""Running a model up to one layer (training/capture.py) beyond tests/training/test_spectra.py:
how data is batched, which inputs are accepted, and the errors.

Found by `nox -s mutants -- training/capture.py` (issue 28): each test fails for a one-line
change of capture.py that test_spectra.py lets through."""

import pytest
import torch
from torch import nn

from powerlaw_fast.training.capture import layer_covariance, layer_spectrum, model_device


class Batches(nn.Module):
    """Linear(2, 2) that records the number of rows of each forward."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(2, 2, dtype=torch.float64)
        self.rows = []

    def forward(self, x):
        self.rows.append(x.shape[0])
        return self.a(x)


def test_a_tensor_is_split_into_batches_of_1000_rows_by_default():
    x = torch.rand(1001, 2, dtype=torch.float64)
    net = Batches()
    lam = layer_spectrum(net, "a", x)
    assert net.rows == [1000, 1]  # the last batch partial
    with torch.no_grad():
        ref = torch.linalg.eigvalsh(torch.cov(net.a(x).T)).flip(0)
    torch.testing.assert_close(lam, ref, rtol=1e-12, atol=1e-12)
    net.rows = []
    assert layer_covariance(net, "a", x).count == 1001 and net.rows == [1000, 1]


def test_batch_size_bounds():
    x = torch.rand(3, 2, dtype=torch.float64)
    net = Batches()
    assert layer_covariance(net, "a", x, batch_size=1).count == 3 and net.rows == [1, 1, 1]
    net.rows = []
    assert layer_covariance(net, "a", x, batch_size=2**30).count == 3 and net.rows == [3]
    for bad in (0, 2**30 + 1):
        message = rf"^batch_size: expected an integer in 1\.\.1073741824, got {bad}$"
        with pytest.raises(ValueError, match=message):
            layer_covariance(net, "a", x, batch_size=bad)


def test_a_single_row_and_one_dimensional_index_data_are_accepted():
    net = Batches()
    x = torch.tensor([[0.5, -1.0]], dtype=torch.float64)
    acc = layer_covariance(net, "a", x)
    with torch.no_grad():
        assert acc.count == 1 and torch.equal(acc.mean, net.a(x)[0])
    # [M] integer indices into an embedding: the layer output is [M, 3]
    emb = nn.Sequential(nn.Embedding(5, 3), nn.Tanh())
    idx = torch.tensor([0, 1, 2, 3, 4, 0])
    acc = layer_covariance(emb, "1", idx, batch_size=4)
    with torch.no_grad():
        out = torch.tanh(emb[0].weight[idx]).double()
    assert acc.count == 6
    torch.testing.assert_close(acc.covariance(), torch.cov(out.T), rtol=1e-6, atol=1e-7)


def test_an_explicit_device_is_where_the_model_runs():
    x = torch.rand(20, 2, dtype=torch.float64)
    net = Batches()
    got = layer_spectrum(net, "a", x, device="cpu")
    torch.testing.assert_close(got, layer_spectrum(net, "a", x), rtol=0, atol=0)
    assert layer_covariance(net, "a", x, device=torch.device("cpu")).device == torch.device("cpu")


def test_a_model_without_parameters_runs_on_the_cpu():
    assert model_device(nn.Sequential(nn.Flatten(), nn.ReLU())) == torch.device("cpu")
    assert model_device(nn.Linear(2, 2, device="meta")) == torch.device("meta")


class NotRun(nn.Module):
    def __init__(self):
        super().__init__()
        self.used = nn.Linear(2, 2)
        self.unused = nn.Linear(2, 2)
        self.pair = nn.Identity()

    def forward(self, x):
        self.pair((x, x))  # a layer whose output is a tuple
        return self.used(x)


@pytest.mark.parametrize(
    "model,layer,data,exc,match",
    [
        (NotRun(), "unused", torch.rand(4, 2), ValueError,
         r"^layer: the module did not run during the model's forward pass$"),
        (NotRun(), "pair", torch.rand(4, 2), TypeError,
         r"^layer: expected the layer to output a tensor, got tuple$"),
        (NotRun(), "missing", torch.rand(4, 2), ValueError, r"^layer: no submodule 'missing'"),
        (NotRun(), nn.Linear(2, 2), torch.rand(4, 2), ValueError,
         r"^layer: the given Linear is not a submodule of model$"),
        (NotRun(), 3, torch.rand(4, 2), TypeError,
         r"^layer: expected a str, an nn\.Module or None, got int$"),
        (NotRun(), None, torch.rand(4, 2), ValueError,
         r"^layer: None means the last hidden layer, but the model has no hidden_layers\(\)$"),
        (NotRun(), "used", [], ValueError, r"^data: no batches$"),
        (NotRun(), "used", 5, TypeError,
         r"^data: expected a tensor or an iterable of batches, got int$"),
        (NotRun(), "used", torch.empty(0, 2), ValueError,
         r"^data: expected a non-empty \[M, \.\.\.\] tensor, got \(0, 2\)$"),
        (NotRun(), "used", torch.tensor(1.0), ValueError,
         r"^data: expected a non-empty \[M, \.\.\.\] tensor, got \(\)$"),
        (NotRun(), "used", [7], TypeError,
         r"^data: expected batches that are tensors or \(inputs, targets\) tuples, got int$"),
        (NotRun(), "used", [()], TypeError,
         r"^data: expected batches that are tensors or \(inputs, targets\) tuples, got tuple$"),
        (NotRun(), "used", [("x", torch.zeros(2))], TypeError,
         r"^data: expected batches that are tensors or \(inputs, targets\) tuples, got tuple$"),
    ],
)
def test_errors_name_the_argument_and_what_was_given(model, layer, data, exc, match):
    with pytest.raises(exc, match=match):
        layer_covariance(model, layer, data)
