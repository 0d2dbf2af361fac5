import pytest
import torch
from torch import nn

from powerlaw_fast.paper.models import CNN, MLP, ShallowNet, make_activation
from powerlaw_fast.paper.whitening import Whiten


def capture(model, x):
    """Run the model with forward hooks on every hidden layer; return name -> [B, N]."""
    seen = {}
    handles = [
        module.register_forward_hook(lambda m, a, out, name=name: seen.__setitem__(name, out))
        for name, module in model.hidden_layers().items()
    ]
    logits = model(x)
    for h in handles:
        h.remove()
    return logits, {k: v.reshape(v.shape[0], -1) for k, v in seen.items()}


@pytest.mark.parametrize(
    "model,widths",
    [
        (ShallowNet(), {"hidden1": 2000}),
        (ShallowNet(batch_norm=True, width=50), {"hidden1": 50}),
        (MLP(), {"hidden1": 1000, "hidden2": 1000, "hidden3": 1000}),
        (MLP(widths=(30, 20), whiten_layer=2, activation="relu"), {"hidden1": 30, "hidden2": 20}),
        (CNN(), {"conv1": 2704, "conv2": 800, "fc": 1000}),
        (CNN(whiten=True, activation="sigmoid"), {"conv1": 2704, "conv2": 800, "fc": 1000}),
    ],
)
def test_shapes_and_hidden_widths(model, widths):
    torch.manual_seed(0)
    assert dict(model.hidden_widths()) == widths
    assert list(model.hidden_layers()) == list(widths)
    x = torch.rand(5, 1, 28, 28)
    logits, hidden = capture(model, x)
    assert logits.shape == (5, 10)
    assert {k: v.shape[1] for k, v in hidden.items()} == widths
    torch.testing.assert_close(model(x.reshape(5, 784)), logits)


def test_hidden_representation_is_after_nonlinearity():
    torch.manual_seed(0)
    x = torch.rand(6, 784)
    _, hidden = capture(ShallowNet(width=40), x)
    assert hidden["hidden1"].min() > 0 and hidden["hidden1"].max() < 1  # sigmoid output
    _, hidden = capture(MLP(widths=(16, 16, 16), activation="tanh"), x)
    assert all(h.abs().max() < 1 for h in hidden.values())
    _, hidden = capture(CNN(activation="relu"), x.reshape(6, 1, 28, 28))
    assert all(h.min() >= 0 for h in hidden.values())


def test_mlp_structure_matches_the_paper():
    net = MLP(whiten_layer=2)
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (784, 1000),
        (1000, 1000),
        (1000, 1000),
        (1000, 10),
    ]
    assert isinstance(net.hidden_layers()["hidden2"][-1], Whiten)
    assert not any(isinstance(m, Whiten) for m in net.hidden_layers()["hidden1"])


def test_whitened_layer_representation_is_white():
    torch.manual_seed(0)
    net = MLP(widths=(12, 8, 6), whiten_layer=2, whiten_eps=0.0)
    _, hidden = capture(net, torch.rand(100, 784))
    cov = torch.cov(hidden["hidden2"].double().T)
    torch.testing.assert_close(cov, torch.eye(8, dtype=torch.float64), atol=1e-3, rtol=0)
    cnn = CNN(whiten=True)
    _, hidden = capture(cnn, torch.rand(900, 1, 28, 28))
    # With eps > 0 the output covariance R^-1 Sigma R^-T has eigenvalues lam / (lam + eps) in
    # [0, 1): close to 1 except in the near-null directions of the conv features.
    lam = torch.linalg.eigvalsh(torch.cov(hidden["conv2"].double().T))
    assert lam.max() < 1 + 1e-3 and lam.min() > -1e-3
    assert lam.median() > 0.9


def test_cnn_structure():
    net = CNN()
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (1, 16, (3, 3)),
        (16, 32, (3, 3)),
    ]
    assert sum(isinstance(m, nn.MaxPool2d) for m in net.modules()) == 2


def test_shallow_batch_norm_trains_and_evals():
    net = ShallowNet(width=20, batch_norm=True)
    assert any(isinstance(m, nn.BatchNorm1d) for m in net.modules())
    net(torch.rand(8, 784)).sum().backward()
    assert net.readout.weight.grad is not None
    net.eval()
    assert net(torch.rand(1, 784)).shape == (1, 10)


def test_bad_arguments():
    with pytest.raises(ValueError, match="activation"):
        MLP(activation="gelu")
    with pytest.raises(ValueError, match="activation"):
        make_activation("softplus")
    with pytest.raises(ValueError, match="whiten_layer"):
        MLP(widths=(10, 10), whiten_layer=3)
    with pytest.raises(ValueError, match="widths"):
        MLP(widths=())
    with pytest.raises(ValueError, match="width"):
        ShallowNet(width=0)
    with pytest.raises(ValueError, match=r"\[B, 1, 28, 28\]"):
        CNN()(torch.rand(2, 3, 28, 28))
    with pytest.raises(ValueError, match=r"\[B, 784\]"):
        MLP()(torch.rand(2, 783))


def test_shallow_net_width_and_its_deprecated_name():
    # one idea, one name: ShallowNet(width=), MLP(widths=), CNN(fc_width=), --width
    assert dict(ShallowNet(width=30).hidden_widths()) == {"hidden1": 30}
    assert dict(ShallowNet(30).hidden_widths()) == {"hidden1": 30}
    with pytest.warns(DeprecationWarning, match="ShallowNet\\(width=\\)"):
        net = ShallowNet(hidden=25)
    assert dict(net.hidden_widths()) == {"hidden1": 25}
    with pytest.raises(TypeError, match="both width"), pytest.warns(DeprecationWarning):
        ShallowNet(width=10, hidden=20)

