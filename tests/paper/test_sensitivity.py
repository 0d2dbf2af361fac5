import pytest
import torch
from torch import nn

from powerlaw_fast.paper.sensitivity import sensitivity_maps
from powerlaw_fast.paper.whitening import Whiten


def tiny_model(whiten=False):
    torch.manual_seed(0)
    layers = [nn.Flatten(), nn.Linear(16, 5), nn.Tanh()]
    if whiten:
        layers.append(Whiten(5, eps=1e-3))
    layers += [nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)]
    return nn.Sequential(*layers).double()


def dataset_eigenvalues(model, module, data, batch_size):
    """Literal: the layer's outputs over the data set (same batching), float64 eigvalsh."""
    outs = []
    handle = module.register_forward_hook(lambda m, a, out: outs.append(out))
    with torch.no_grad():
        for chunk in data.split(batch_size):
            model(chunk)
    handle.remove()
    h = torch.cat(outs).reshape(data.shape[0], -1)
    return torch.linalg.eigvalsh(torch.cov(h.T)).flip(0)


def finite_difference_maps(model, module, data, ranks, sample, batch_size, step=1e-6):
    model.eval()
    flat = data.reshape(data.shape[0], -1)
    maps = torch.zeros(len(ranks), flat.shape[1], dtype=torch.float64)
    for p in range(flat.shape[1]):
        plus, minus = flat.clone(), flat.clone()
        plus[sample, p] += step
        minus[sample, p] -= step
        lp = dataset_eigenvalues(model, module, plus.reshape(data.shape), batch_size)
        lm = dataset_eigenvalues(model, module, minus.reshape(data.shape), batch_size)
        for i, r in enumerate(ranks):
            maps[i, p] = (lp[r - 1] - lm[r - 1]) / (2 * step)
    return maps


@pytest.mark.parametrize("whiten,sample", [(False, 13), (True, 22), (False, 0)])
def test_maps_match_finite_differences(whiten, sample):
    model = tiny_model(whiten)
    g = torch.Generator().manual_seed(1)
    data = torch.rand(25, 1, 4, 4, generator=g, dtype=torch.float64)
    module = model[5] if whiten else model[4]  # the last hidden layer (tanh after Linear(5, 6))
    ranks = [1, 3, 6]
    model.train()
    got = sensitivity_maps(
        model, module, data, ranks, sample=sample, image_shape=(4, 4), batch_size=10
    )
    assert model.training and all(m.training for m in model.modules())
    assert got.shape == (3, 4, 4) and got.dtype == torch.float64
    ref = finite_difference_maps(model, module, data, ranks, sample, 10).reshape(3, 4, 4)
    scale = ref.abs().max()
    assert scale > 0
    torch.testing.assert_close(got, ref, atol=1e-6 * float(scale), rtol=1e-5)


def test_float32_model_and_named_layer():
    from powerlaw_fast.paper.models import MLP

    torch.manual_seed(0)
    net = MLP(widths=(12, 8))
    data = torch.rand(40, 1, 28, 28)
    a = sensitivity_maps(net, None, data, [2], sample=3, batch_size=16)
    b = sensitivity_maps(net, "hidden2", data, 2, sample=3, batch_size=40)
    assert a.shape == (1, 28, 28)
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6 * float(b.abs().max()))
    c = sensitivity_maps(net.double(), "hidden2", data.double(), [2], sample=3, batch_size=40)
    torch.testing.assert_close(a, c, rtol=1e-3, atol=1e-4 * float(c.abs().max()))


def test_bad_inputs():
    model = tiny_model()
    data = torch.rand(10, 1, 4, 4, dtype=torch.float64)
    layer = model[4]
    with pytest.raises(ValueError, match="ranks"):
        sensitivity_maps(model, layer, data, [7], image_shape=(4, 4))
    with pytest.raises(ValueError, match="ranks"):
        sensitivity_maps(model, layer, data, [0], image_shape=(4, 4))
    with pytest.raises(ValueError, match="ranks"):
        sensitivity_maps(model, layer, data, [], image_shape=(4, 4))
    with pytest.raises(ValueError, match="image_shape"):
        sensitivity_maps(model, layer, data, [1])
    with pytest.raises(ValueError, match="sample"):
        sensitivity_maps(model, layer, data, [1], sample=10, image_shape=(4, 4))
    with pytest.raises(ValueError, match="M >= 2"):
        sensitivity_maps(model, layer, data[:1], [1], image_shape=(4, 4))
    with pytest.raises(TypeError, match="data"):
        sensitivity_maps(model, layer, data.tolist(), [1], image_shape=(4, 4))
