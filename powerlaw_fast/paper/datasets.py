"""MNIST from torchvision's directory layout, read with gzip + numpy (torchvision not needed).

Where the data come from, in order:
1. the ``root`` argument; ``root="shipped"`` selects the subset shipped in the package;
2. the environment variable ``POWERLAW_FAST_DATA``;
3. the shipped subset ``powerlaw_fast/paper/data/mnist_subset.npz``: the first 6000 training and the
   first 1000 test images of real MNIST (uint8, compressed, ~1 MB), enough for demos and tests.

A root may point at the folder that contains ``MNIST/raw`` (torchvision's ``root``), at
``MNIST`` or at ``raw`` itself. The four IDX files may be gzipped (``.gz``, as downloaded) or
not. Headers, sizes and labels are validated; a missing, empty or corrupt file raises an
:class:`MNISTFileError` that names it (for a missing file or folder, the subclass
:class:`MNISTNotFoundError`, which is also a ``FileNotFoundError``).
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path

import numpy as np
import torch

from .._validation import check_int_range

ENV_VAR = "POWERLAW_FAST_DATA"
SHIPPED = "shipped"
SUBSET_PATH = Path(__file__).resolve().parent / "data" / "mnist_subset.npz"
IDX_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dims
LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dim
IMAGE_SIDE = 28


class MNISTFileError(ValueError):
    """A missing, empty, truncated or malformed MNIST file or folder (the message names it)."""


class MNISTNotFoundError(MNISTFileError, FileNotFoundError):
    """A missing MNIST file or folder: an :class:`MNISTFileError` and a ``FileNotFoundError``."""


def _find_raw_dir(root: Path) -> Path:
    names = IDX_FILES[True] + IDX_FILES[False]
    for candidate in (root / "MNIST" / "raw", root / "raw", root):
        if any((candidate / n).exists() or (candidate / f"{n}.gz").exists() for n in names):
            return candidate
    raise MNISTNotFoundError(
        f"root: no MNIST IDX files found in {root} (looked in {root}/MNIST/raw, {root}/raw and "
        f"{root} for e.g. {names[0]}.gz)"
    )


def _read_bytes(raw_dir: Path, name: str) -> tuple[bytes, Path]:
    gz = raw_dir / f"{name}.gz"
    plain = raw_dir / name
    if gz.exists():
        try:
            with gzip.open(gz, "rb") as fh:
                return fh.read(), gz
        except (OSError, EOFError, zlib.error) as err:
            raise MNISTFileError(f"{gz}: corrupt gzip file ({err})") from err
    if plain.exists():
        return plain.read_bytes(), plain
    raise MNISTNotFoundError(
        f"{gz}: missing MNIST file (neither {gz.name} nor {plain.name} exists)"
    )


def read_idx(raw_dir: Path, name: str, *, magic: int, ndim: int) -> np.ndarray:
    """Read one unsigned-byte IDX file (``name``, optionally ``name.gz``) into a uint8 array."""
    data, path = _read_bytes(Path(raw_dir), name)
    header = 4 + 4 * ndim
    if len(data) < header:
        raise MNISTFileError(f"{path}: truncated IDX header ({len(data)} bytes)")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise MNISTFileError(f"{path}: bad IDX magic number 0x{found:08x}, expected 0x{magic:08x}")
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    # Python integers: np.prod of 2**31 x 2**31 x 4 wraps around to 0 in int64
    expected = header + math.prod(dims)
    if len(data) != expected:
        raise MNISTFileError(
            f"{path}: expected {expected} bytes for dims {dims}, found {len(data)} "
            f"(truncated or padded file)"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def read_mnist_raw(raw_dir, *, train: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images ``[n, 28, 28]`` and labels ``[n]`` from the IDX files in ``raw_dir``."""
    raw_dir = Path(raw_dir)
    image_name, label_name = IDX_FILES[bool(train)]
    images = read_idx(raw_dir, image_name, magic=IMAGES_MAGIC, ndim=3)
    labels = read_idx(raw_dir, label_name, magic=LABELS_MAGIC, ndim=1)
    if images.shape[0] == 0:
        raise MNISTFileError(f"{raw_dir / image_name}: the file holds 0 images")
    if images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
        raise MNISTFileError(
            f"{raw_dir / image_name}: expected 28x28 images, got "
            f"{images.shape[1]}x{images.shape[2]}"
        )
    if images.shape[0] != labels.shape[0]:
        raise MNISTFileError(
            f"{raw_dir}: {image_name} has {images.shape[0]} images but {label_name} has "
            f"{labels.shape[0]} labels"
        )
    if labels.size and int(labels.max()) > 9:
        raise MNISTFileError(
            f"{raw_dir / label_name}: labels must be 0..9, found {int(labels.max())}"
        )
    return images, labels


def _read_subset(path: Path, train: bool) -> tuple[np.ndarray, np.ndarray]:
    if not path.exists():
        raise MNISTNotFoundError(f"{path}: the shipped MNIST subset is missing from the package")
    split = "train" if train else "test"
    with np.load(path) as npz:
        return npz[f"{split}_images"], npz[f"{split}_labels"]


def _download(root: Path, train: bool) -> None:
    try:
        from torchvision.datasets import MNIST
    except ImportError as err:
        raise ImportError(
            "download=True needs torchvision (pip install torchvision); or place the four IDX "
            f"files in {root}/MNIST/raw"
        ) from err
    MNIST(str(root), train=train, download=True)


def load_mnist(
    root: str | os.PathLike | None = None,
    *,
    train: bool = True,
    limit: int | None = None,
    download: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST as tensors: images float32 ``[n, 1, 28, 28]`` in [0, 1], labels int64 ``[n]``.

    Args:
        root: data folder (see the module docstring), ``"shipped"`` for the packaged subset, or
            ``None``: ``$POWERLAW_FAST_DATA`` if set, else the packaged subset.
        train: the training split (else the test split).
        limit: keep the first ``limit`` samples.
        download: fetch the files into ``root`` with torchvision when they are missing (needs
            ``root`` and torchvision; never used by the tests).

    Raises:
        MNISTFileError: a missing (:class:`MNISTNotFoundError`), empty, truncated or malformed
            file or folder; the message names it.
        ValueError: an empty ``root`` or a ``limit`` below 1.

    Example::

        >>> from powerlaw_fast.paper.datasets import load_mnist
        >>> images, labels = load_mnist("shipped", train=False, limit=100)
        >>> images.shape, images.dtype, labels.dtype
        (torch.Size([100, 1, 28, 28]), torch.float32, torch.int64)
    """
    if limit is not None:
        limit = check_int_range(limit, "limit", 1, 1 << 40)
    if root is None:
        env = os.environ.get(ENV_VAR, "")
        root = env if env else SHIPPED
    if isinstance(root, str | os.PathLike) and not os.fspath(root):
        raise ValueError(
            "root: got an empty path; pass a folder, 'shipped' for the packaged subset, or None "
            f"for ${ENV_VAR} / the packaged subset (use '.' for the current folder)"
        )
    if str(root) == SHIPPED:
        if download:
            raise ValueError("download: needs a root folder to download into, got root='shipped'")
        images, labels = _read_subset(SUBSET_PATH, train)
    else:
        path = Path(root).expanduser()
        if download:
            try:
                _find_raw_dir(path)
            except FileNotFoundError:
                _download(path, train)
        if not path.exists():
            raise MNISTNotFoundError(f"root: the MNIST folder {path} does not exist")
        images, labels = read_mnist_raw(_find_raw_dir(path), train=train)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    # astype copies the (read-only) buffers into writable arrays torch can own.
    x = torch.from_numpy(images.astype(np.float32)).div_(255.0)
    y = torch.from_numpy(labels.astype(np.int64))
    return x.unsqueeze(1), y


def make_mnist_subset(
    src_root, dest=SUBSET_PATH, *, n_train: int = 6000, n_test: int = 1000
) -> Path:
    """Write the first ``n_train`` training and ``n_test`` test images of real MNIST (found
    under ``src_root``) to a compressed ``.npz`` (uint8 images, uint8 labels). This made the
    shipped subset::

        python -c "import powerlaw_fast.paper.datasets as d; d.make_mnist_subset('/path/to/mnist')"
    """
    raw = _find_raw_dir(Path(src_root))
    train_images, train_labels = read_mnist_raw(raw, train=True)
    test_images, test_labels = read_mnist_raw(raw, train=False)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        dest,
        train_images=train_images[:n_train],
        train_labels=train_labels[:n_train],
        test_images=test_images[:n_test],
        test_labels=test_labels[:n_test],
    )
    return dest


def mnist_loaders(
    root: str | os.PathLike | None = None,
    *,
    batch_size: int = 1500,
    test_batch_size: int | None = None,
    limit_train: int | None = None,
    limit_test: int | None = None,
    shuffle: bool = True,
    seed: int | None = None,
    drop_last: bool = False,
) -> tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader]:
    """Training and test DataLoaders over in-memory MNIST tensors (see :func:`load_mnist`).

    Batches are ``(images [b, 1, 28, 28] float32, labels [b] int64)``; the training loader
    shuffles (reproducibly when ``seed`` is given), the test loader does not.

    Example::

        >>> from powerlaw_fast.paper.datasets import mnist_loaders
        >>> train, test = mnist_loaders("shipped", batch_size=256, limit_train=512, seed=0)
        >>> [tuple(t.shape) for t in next(iter(train))]
        [(256, 1, 28, 28), (256,)]
    """
    from torch.utils.data import DataLoader, TensorDataset

    batch_size = check_int_range(batch_size, "batch_size", 1, 1 << 30)
    test_batch_size = batch_size if test_batch_size is None else test_batch_size
    test_batch_size = check_int_range(test_batch_size, "test_batch_size", 1, 1 << 30)
    generator = None
    if seed is not None:
        seed = check_int_range(seed, "seed", 0, (1 << 64) - 1)
        generator = torch.Generator().manual_seed(seed)
    train_set = TensorDataset(*load_mnist(root, train=True, limit=limit_train))
    test_set = TensorDataset(*load_mnist(root, train=False, limit=limit_test))
    train_loader = DataLoader(
        train_set, batch_size=batch_size, shuffle=shuffle, generator=generator, drop_last=drop_last
    )
    test_loader = DataLoader(test_set, batch_size=test_batch_size, shuffle=False)
    return train_loader, test_loader
