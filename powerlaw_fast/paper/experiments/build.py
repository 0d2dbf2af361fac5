"""What a run is built from: its MNIST splits in memory (:class:`Data`, :func:`load_data`), its
network and regularised layers, its batch size and its default device."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from torch import nn

from ..datasets import load_mnist
from ..models import CNN, MLP, ShallowNet
from .config import RunConfig


@dataclass
class Data:
    """In-memory MNIST: images ``[n, 1, 28, 28]`` float32 in [0, 1], labels int64 ``[n]``."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    source: str


def load_data(root=None, limit_train: int | None = None, limit_test: int | None = None) -> Data:
    """Both MNIST splits (see :func:`~powerlaw_fast.paper.datasets.load_mnist` for ``root``).

    Raises the loader's ``MNISTFileError`` for a missing, empty or corrupt folder (the command
    line turns it into a one-line message).
    """
    train_x, train_y = load_mnist(root, train=True, limit=limit_train)
    test_x, test_y = load_mnist(root, train=False, limit=limit_test)
    if root is None:
        env = os.environ.get("POWERLAW_FAST_DATA", "")
        source = env if env else "shipped subset of real MNIST (6000 train / 1000 test)"
    else:
        source = str(root)
    return Data(train_x, train_y, test_x, test_y, source)



def build_model(cfg: RunConfig) -> tuple[nn.Module, list[str]]:
    """The network of ``cfg`` and the names of its spectrally regularised layers."""
    whiten = cfg.variant in ("whiten", "whiten+specreg-last")
    if cfg.arch == "shallow":
        model = ShallowNet(width=cfg.width or 2000, activation=cfg.activation or "sigmoid",
                           batch_norm=cfg.batch_norm)
        if cfg.batch_norm and cfg.batch_norm_position == "post":
            # the authors' order: linear, nonlinearity, batch norm; the block's output (the
            # regularised, measured and attacked representation) is the batch-norm output
            linear, norm, act = model.blocks["hidden1"]
            model.blocks["hidden1"] = nn.Sequential(linear, act, norm)
    elif cfg.arch == "mlp":
        width = cfg.width or 1000
        # Running statistics in eval mode: the attacks put rows for several epsilons in one
        # forward pass, which batch statistics would couple.
        model = MLP(widths=(width,) * 3, whiten_layer=2 if whiten else None,
                    whiten_eval_mode="running")
    else:
        model = CNN(whiten=whiten, whiten_eval_mode="running", fc_width=cfg.width or 1000)
    names = list(model.hidden_layers())
    if cfg.variant == "specreg-all":
        layers = names
    elif cfg.regularised:
        layers = names[-1:]
    else:
        layers = []
    return model, layers


def batch_size_for(cfg: RunConfig, model: nn.Module) -> int:
    """``cfg.batch_size`` or the paper's rule: 1.5 x the widest hidden layer."""
    if cfg.batch_size is not None:
        return int(cfg.batch_size)
    return math.ceil(1.5 * max(model.hidden_widths().values()))


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_runs(configs, n_train: int) -> None:
    """Refuse, before any training, runs that would fail part-way (``ValueError``).

    Each run needs training batches of at least 2 images (batch norm, the covariance) and every
    regularised layer at least ``tau`` units (the anchor rank). Configs that differ only in
    their seed are checked once.
    """
    import dataclasses

    seen = set()
    for cfg in configs:
        key = repr(dataclasses.replace(cfg, seed=0, notes={}))
        if key in seen:
            continue
        seen.add(key)
        model, layers = build_model(cfg)
        batch = min(batch_size_for(cfg, model), n_train)
        if batch < 2:
            raise ValueError(
                f"batch size: run {cfg.name} would train on batches of {batch} image(s) "
                f"({n_train} training images, batch size {batch_size_for(cfg, model)}); batch "
                "norm and the spectrum estimate need at least 2"
            )
        widths = model.hidden_widths()
        for name in layers:
            lowest = cfg.tau + (1 if cfg.convention == "authors" else 0)
            if widths[name] < lowest:
                raise ValueError(
                    f"width: the regularised layer {name} of run {cfg.name} has {widths[name]} "
                    f"units, fewer than tau = {cfg.tau} needs ({lowest})"
                )
