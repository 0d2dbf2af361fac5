"""The MNIST splits of a run, held in memory: :class:`Data` and :func:`load_data`."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..datasets import load_mnist


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
