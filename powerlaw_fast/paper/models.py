"""The MNIST networks of Nassar et al. (2020), sections 4.1 and 4.2.

Every model is built from named blocks, one per hidden layer; a block's output is that layer's
representation (after the nonlinearity, the pooling and, where present, the whitening), the
activations the spectral regulariser and the spectra see. ``hidden_layers()`` returns these
blocks in order, so a forward hook on a block captures exactly one hidden representation.
Conv outputs are flattened per sample when they are regularised, as in the paper.

- ``ShallowNet``: 784 - 2000 - 10 (sec. 4.1, sigmoid, optional batch norm).
- ``MLP``: 784 - 1000 - 1000 - 1000 - 10 (sec. 4.2), optional whitening of one hidden layer.
- ``CNN``: conv 16 3x3, max-pool 2, conv 32 3x3, max-pool 2, fc 1000, fc 10 (sec. 4.2);
  hidden widths 16*13*13 = 2704, 32*5*5 = 800 and 1000; optional whitening of the second
  (flattened) conv layer, as in the authors' ``CNN_Flat``.

Inputs are MNIST images ``[B, 1, 28, 28]`` or flattened ``[B, 784]``; outputs are logits
``[B, 10]``.

Naming: a hidden layer's number of units is its *width* everywhere: ``ShallowNet(width=)``,
``MLP(widths=)`` (one per layer), ``CNN(fc_width=)``, ``RunConfig.width`` and the command line's
``--width``. (``ShallowNet(hidden=)`` is the old name; it still works, with a
``DeprecationWarning``.)
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from .._validation import check_int_range, check_tensor
from .whitening import Whiten

ACTIVATIONS = {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "relu": nn.ReLU}
IMAGE_SHAPE = (1, 28, 28)
IMAGE_PIXELS = 28 * 28


def make_activation(name: str) -> nn.Module:
    """A fresh activation module for ``name`` in ``"sigmoid"``, ``"tanh"``, ``"relu"``."""
    if name not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {tuple(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]()


def _flat_images(x) -> torch.Tensor:
    check_tensor(x, "x")
    if x.dim() == 2 and x.shape[1] == IMAGE_PIXELS:
        return x
    if x.dim() == 4 and tuple(x.shape[1:]) == IMAGE_SHAPE:
        return x.flatten(1)
    raise ValueError(
        f"x: expected MNIST images [B, 1, 28, 28] or [B, 784], got shape {tuple(x.shape)}"
    )


def _square_images(x) -> torch.Tensor:
    return _flat_images(x).reshape(-1, *IMAGE_SHAPE)


class _HiddenLayerModel(nn.Module):
    """Shared ``hidden_layers`` / ``hidden_widths`` over ``self.blocks`` (an nn.ModuleDict)."""

    blocks: nn.ModuleDict
    _widths: dict[str, int]

    def hidden_layers(self) -> OrderedDict[str, nn.Module]:
        """Hidden layers in forward order, name -> module whose output is the representation.

        Hook a module's output (flattened per sample) to see the layer's activations ``[B, N]``.
        """
        return OrderedDict(self.blocks.items())

    def hidden_widths(self) -> OrderedDict[str, int]:
        """Name -> N, the number of features of the flattened hidden representation."""
        return OrderedDict((name, self._widths[name]) for name in self.blocks)


class ShallowNet(_HiddenLayerModel):
    """One hidden layer, 784 - ``width`` - 10 (sec. 4.1: 2000 sigmoid units with batch norm).

    Batch norm, when on, sits between the linear map and the nonlinearity (Ioffe & Szegedy's
    placement), so the regularised representation is the sigmoid output. The authors' code put
    it after the nonlinearity; the paper does not say.

    Args:
        width: hidden units (default 2000, the paper's). ``hidden=`` is its deprecated name.
        activation: ``"sigmoid"`` (default, the paper's), ``"tanh"`` or ``"relu"``.
        batch_norm: batch norm between the linear map and the nonlinearity.
        num_classes: logits.

    Example::

        >>> import torch
        >>> from powerlaw_fast.paper.models import ShallowNet
        >>> net = ShallowNet(batch_norm=True)
        >>> net(torch.rand(3, 1, 28, 28)).shape, dict(net.hidden_widths())
        (torch.Size([3, 10]), {'hidden1': 2000})
    """

    def __init__(
        self,
        width: int | None = None,
        activation: str = "sigmoid",
        batch_norm: bool = False,
        num_classes: int = 10,
        *,
        hidden: int | None = None,
    ) -> None:
        super().__init__()
        if hidden is not None:
            warnings.warn("ShallowNet(hidden=) is deprecated: use ShallowNet(width=)",
                          DeprecationWarning, stacklevel=2)
            if width is not None:
                raise TypeError(f"ShallowNet: got both width={width!r} and hidden={hidden!r}")
            width = hidden
        width = check_int_range(2000 if width is None else width, "width", 1, 1 << 20)
        num_classes = check_int_range(num_classes, "num_classes", 1, 1 << 20)
        layers: list[nn.Module] = [nn.Linear(IMAGE_PIXELS, width)]
        if batch_norm:
            layers.append(nn.BatchNorm1d(width))
        layers.append(make_activation(activation))
        self.blocks = nn.ModuleDict({"hidden1": nn.Sequential(*layers)})
        self.readout = nn.Linear(width, num_classes)
        self._widths = {"hidden1": width}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.readout(self.blocks["hidden1"](_flat_images(x)))


class MLP(_HiddenLayerModel):
    """Multi-layer perceptron, 784 - 1000 - 1000 - 1000 - 10 by default (sec. 4.2).

    Args:
        widths: hidden layer widths.
        activation: ``"tanh"`` (default, the authors' experiments), ``"sigmoid"`` or ``"relu"``.
        whiten_layer: 1-indexed hidden layer whose representation is whitened (eq. 10) after
            its nonlinearity; the paper whitens the second (``whiten_layer=2``). The whitened
            output is that layer's representation, as in the authors' code.
        whiten_eval_mode, whiten_eps: passed to :class:`~powerlaw_fast.paper.whitening.Whiten`.

    Example::

        >>> import torch
        >>> from powerlaw_fast.paper.models import MLP
        >>> net = MLP(whiten_layer=2)
        >>> net(torch.rand(8, 784)).shape, list(net.hidden_widths().values())
        (torch.Size([8, 10]), [1000, 1000, 1000])
    """

    def __init__(
        self,
        widths: Sequence[int] = (1000, 1000, 1000),
        activation: str = "tanh",
        whiten_layer: int | None = None,
        *,
        whiten_eval_mode: str = "batch",
        whiten_eps: float = 1e-5,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        widths = [check_int_range(w, "widths[i]", 1, 1 << 20) for w in widths]
        if not widths:
            raise ValueError("widths: expected at least one hidden layer width, got none")
        if whiten_layer is not None:
            check_int_range(whiten_layer, "whiten_layer", 1, len(widths), " (1-indexed layer)")
        num_classes = check_int_range(num_classes, "num_classes", 1, 1 << 20)
        blocks = OrderedDict()
        fan_in = IMAGE_PIXELS
        for index, width in enumerate(widths, start=1):
            layers: list[nn.Module] = [nn.Linear(fan_in, width), make_activation(activation)]
            if index == whiten_layer:
                layers.append(Whiten(width, eps=whiten_eps, eval_mode=whiten_eval_mode))
            blocks[f"hidden{index}"] = nn.Sequential(*layers)
            fan_in = width
        self.blocks = nn.ModuleDict(blocks)
        self.readout = nn.Linear(fan_in, num_classes)
        self._widths = {f"hidden{i}": w for i, w in enumerate(widths, start=1)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = _flat_images(x)
        for block in self.blocks.values():
            h = block(h)
        return self.readout(h)


class CNN(_HiddenLayerModel):
    """Convolutional network of sec. 4.2 with three hidden layers.

    ``conv1``: conv 16 3x3 -> activation -> max-pool 2, output [B, 16, 13, 13] (N = 2704).
    ``conv2``: conv 32 3x3 -> activation -> max-pool 2 -> flatten (-> whiten), [B, 800].
    ``fc``: linear 800 -> 1000 -> activation, [B, 1000]. Then a linear readout to 10 logits.
    (Order conv, nonlinearity, pool as in the authors' code; spatial 28 -> 26 -> 13 -> 11 -> 5.)

    Args:
        activation: ``"tanh"`` (default, the authors' experiments), ``"relu"`` or ``"sigmoid"``.
        whiten: whiten the flattened second conv representation (the authors' ``CNN_Flat``).
        whiten_eval_mode, whiten_eps: passed to :class:`~powerlaw_fast.paper.whitening.Whiten`.

    Example::

        >>> import torch
        >>> from powerlaw_fast.paper.models import CNN
        >>> net = CNN()
        >>> net(torch.rand(2, 1, 28, 28)).shape, list(net.hidden_widths().values())
        (torch.Size([2, 10]), [2704, 800, 1000])
    """

    def __init__(
        self,
        activation: str = "tanh",
        whiten: bool = False,
        *,
        whiten_eval_mode: str = "batch",
        whiten_eps: float = 1e-5,
        fc_width: int = 1000,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        fc_width = check_int_range(fc_width, "fc_width", 1, 1 << 20)
        num_classes = check_int_range(num_classes, "num_classes", 1, 1 << 20)
        conv2_width = 32 * 5 * 5
        conv2: list[nn.Module] = [
            nn.Conv2d(16, 32, kernel_size=3),
            make_activation(activation),
            nn.MaxPool2d(2),
            nn.Flatten(1),
        ]
        if whiten:
            conv2.append(Whiten(conv2_width, eps=whiten_eps, eval_mode=whiten_eval_mode))
        self.blocks = nn.ModuleDict(
            {
                "conv1": nn.Sequential(
                    nn.Conv2d(1, 16, kernel_size=3), make_activation(activation), nn.MaxPool2d(2)
                ),
                "conv2": nn.Sequential(*conv2),
                "fc": nn.Sequential(nn.Linear(conv2_width, fc_width), make_activation(activation)),
            }
        )
        self.readout = nn.Linear(fc_width, num_classes)
        self._widths = {"conv1": 16 * 13 * 13, "conv2": conv2_width, "fc": fc_width}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = _square_images(x)
        for block in self.blocks.values():
            h = block(h)
        return self.readout(h)
