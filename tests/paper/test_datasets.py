import gzip
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from powerlaw_fast.paper import datasets
from powerlaw_fast.paper.datasets import (
    MNISTFileError,
    load_mnist,
    make_mnist_subset,
    mnist_loaders,
    read_mnist_raw,
)


def _real_mnist_raw() -> Path | None:
    """The raw IDX folder of real MNIST: $POWERLAW_FAST_DATA, else the sibling ../shared."""
    candidates = [os.environ.get("POWERLAW_FAST_DATA", ""),
                  Path(__file__).resolve().parents[3] / "shared" / "data" / "mnist",
                  "/work/shared/data/mnist"]
    for root in candidates:
        if root and Path(root).is_dir():
            try:
                return datasets._find_raw_dir(Path(root))
            except FileNotFoundError:
                continue
    return None


REAL_RAW = _real_mnist_raw()
needs_real = pytest.mark.skipif(
    REAL_RAW is None,
    reason="real MNIST not found: set POWERLAW_FAST_DATA to a folder holding MNIST/raw/*.gz "
    "(torchvision's layout) or place it in ../shared/data/mnist",
)


def write_idx(path: Path, array: np.ndarray, magic: int, compress: bool = True) -> None:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(str(path) + ".gz", "wb") as fh:
            fh.write(payload)
    else:
        path.write_bytes(payload)


def fake_mnist(raw: Path, n_train=12, n_test=5, compress=True, seed=0):
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {}
    for train, n in ((True, n_train), (False, n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        img_name, lab_name = datasets.IDX_FILES[train]
        write_idx(raw / img_name, images, 0x803, compress)
        write_idx(raw / lab_name, labels, 0x801, compress)
        arrays[train] = (images, labels)
    return arrays


@pytest.mark.parametrize("compress", [True, False])
def test_reads_idx_files_from_any_root_level(tmp_path, compress):
    arrays = fake_mnist(tmp_path / "MNIST" / "raw", compress=compress)
    for root in (tmp_path, tmp_path / "MNIST", tmp_path / "MNIST" / "raw", str(tmp_path)):
        x, y = load_mnist(root, train=False)
        assert x.shape == (5, 1, 28, 28) and x.dtype == torch.float32
        assert y.dtype == torch.int64
        np.testing.assert_array_equal((x[:, 0] * 255).round().numpy(), arrays[False][0])
        np.testing.assert_array_equal(y.numpy(), arrays[False][1])
    x, y = load_mnist(tmp_path, train=True, limit=4)
    assert x.shape == (4, 1, 28, 28) and x.min() >= 0 and x.max() <= 1
    np.testing.assert_array_equal(y.numpy(), arrays[True][1][:4])


def test_environment_variable_root(tmp_path, monkeypatch):
    arrays = fake_mnist(tmp_path / "raw", n_test=3)
    monkeypatch.setenv("POWERLAW_FAST_DATA", str(tmp_path))
    _, y = load_mnist(train=False)
    np.testing.assert_array_equal(y.numpy(), arrays[False][1])
    monkeypatch.setenv("POWERLAW_FAST_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_mnist()


def test_shipped_subset_loads(monkeypatch):
    monkeypatch.delenv("POWERLAW_FAST_DATA", raising=False)
    assert datasets.SUBSET_PATH.stat().st_size < 3_000_000
    x, y = load_mnist(train=True)
    assert x.shape == (6000, 1, 28, 28) and y.shape == (6000,)
    assert set(y.unique().tolist()) == set(range(10))
    xt, yt = load_mnist("shipped", train=False, limit=10)
    assert xt.shape == (10, 1, 28, 28)
    assert 0.05 < float(x.mean()) < 0.25  # real digits: mostly dark background
    assert y[:5].tolist() == [5, 0, 4, 1, 9]  # the first MNIST training labels


@needs_real
def test_real_mnist_and_subset_agree():
    x, y = load_mnist(REAL_RAW, train=True)
    assert x.shape == (60000, 1, 28, 28) and y.shape == (60000,)
    xt, yt = load_mnist(REAL_RAW, train=False)
    assert xt.shape == (10000, 1, 28, 28)
    xs, ys = load_mnist("shipped", train=False)
    assert torch.equal(xs, xt[:1000]) and torch.equal(ys, yt[:1000])


@needs_real
def test_make_subset(tmp_path):
    dest = make_mnist_subset(REAL_RAW, tmp_path / "sub.npz", n_train=20, n_test=7)
    with np.load(dest) as npz:
        assert npz["train_images"].shape == (20, 28, 28) and npz["test_labels"].shape == (7,)
        assert npz["train_images"].dtype == np.uint8


def test_truncated_gzip_is_refused(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    fake_mnist(raw)
    path = raw / "t10k-images-idx3-ubyte.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(MNISTFileError, match="t10k-images-idx3-ubyte.gz"):
        load_mnist(tmp_path, train=False)


def test_not_gzip_is_refused(tmp_path):
    raw = tmp_path / "raw"
    fake_mnist(raw)
    (raw / "t10k-labels-idx1-ubyte.gz").write_bytes(b"this is not gzip data at all")
    with pytest.raises(MNISTFileError, match="t10k-labels-idx1-ubyte.gz.*corrupt"):
        load_mnist(tmp_path, train=False)


def test_bad_magic_is_refused(tmp_path):
    raw = tmp_path / "raw"
    fake_mnist(raw)
    write_idx(raw / "train-labels-idx1-ubyte", np.zeros(12, np.uint8), 0x803)
    with pytest.raises(MNISTFileError, match="train-labels-idx1-ubyte.gz: bad IDX magic"):
        load_mnist(tmp_path, train=True)


def test_wrong_length_and_mismatch_and_labels(tmp_path):
    raw = tmp_path / "raw"
    fake_mnist(raw, compress=False)
    img = raw / "t10k-images-idx3-ubyte"
    img.write_bytes(img.read_bytes()[:-10])
    with pytest.raises(MNISTFileError, match="t10k-images-idx3-ubyte: expected .* bytes"):
        read_mnist_raw(raw, train=False)
    write_idx(raw / "t10k-images-idx3-ubyte", np.zeros((4, 28, 28), np.uint8), 0x803, False)
    with pytest.raises(MNISTFileError, match="4 images but .* 5 labels"):
        read_mnist_raw(raw, train=False)
    write_idx(raw / "t10k-images-idx3-ubyte", np.zeros((5, 20, 20), np.uint8), 0x803, False)
    with pytest.raises(MNISTFileError, match="28x28"):
        read_mnist_raw(raw, train=False)
    write_idx(raw / "t10k-images-idx3-ubyte", np.zeros((5, 28, 28), np.uint8), 0x803, False)
    write_idx(raw / "t10k-labels-idx1-ubyte", np.full(5, 11, np.uint8), 0x801, False)
    with pytest.raises(MNISTFileError, match="0..9"):
        read_mnist_raw(raw, train=False)
    (raw / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00")
    with pytest.raises(MNISTFileError, match="truncated IDX header"):
        read_mnist_raw(raw, train=False)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_mnist(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="no MNIST IDX files"):
        load_mnist(tmp_path)
    raw = tmp_path / "raw"
    fake_mnist(raw)
    (raw / "train-images-idx3-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte.gz"):
        load_mnist(tmp_path, train=True)


def test_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="limit"):
        load_mnist("shipped", limit=0)
    with pytest.raises(ValueError, match="download"):
        load_mnist("shipped", download=True)


def test_download_needs_torchvision(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_torchvision(name, *args, **kwargs):
        if name.startswith("torchvision"):
            raise ImportError("no torchvision here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torchvision)
    with pytest.raises(ImportError, match="torchvision"):
        load_mnist(tmp_path, download=True)


def test_loaders():
    train, test = mnist_loaders(
        "shipped", batch_size=100, test_batch_size=64, limit_train=250, limit_test=70, seed=0
    )
    shapes = [tuple(x.shape) for x, _ in train]
    assert shapes == [(100, 1, 28, 28), (100, 1, 28, 28), (50, 1, 28, 28)]
    assert [len(y) for _, y in test] == [64, 6]

    def first_labels(seed):
        loader = mnist_loaders("shipped", batch_size=100, limit_train=250, seed=seed)[0]
        return next(iter(loader))[1]

    assert torch.equal(first_labels(0), first_labels(0))
    assert not torch.equal(first_labels(0), first_labels(1))
    train, _ = mnist_loaders("shipped", batch_size=100, limit_train=250, drop_last=True)
    assert len(train) == 2


@needs_real
def test_real_copy_in_tmp(tmp_path):
    # A root that contains only gzipped files copied from the shipped layout works too.
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in datasets.IDX_FILES[False]:
        shutil.copy(REAL_RAW / f"{name}.gz", raw)
    x, y = load_mnist(tmp_path, train=False, limit=3)
    assert x.shape == (3, 1, 28, 28) and y.tolist() == [7, 2, 1]


# Issue 16 (data): each of these failed before the fix.


def test_missing_file_raises_the_documented_error(tmp_path):
    raw = tmp_path / "raw"
    fake_mnist(raw)
    (raw / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(MNISTFileError, match="t10k-labels-idx1-ubyte.gz: missing MNIST file"):
        load_mnist(tmp_path, train=False)
    with pytest.raises(MNISTFileError, match="does not exist"):
        load_mnist(tmp_path / "absent")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MNISTFileError, match="no MNIST IDX files"):
        load_mnist(empty)


def test_huge_idx_dims_do_not_overflow_the_size_check(tmp_path):
    raw = tmp_path / "raw"
    fake_mnist(raw, compress=False)
    # 2^31 x 2^31 x 4 = 2^64 bytes: np.prod wraps to 0, which matched an empty payload
    header = (0x803).to_bytes(4, "big") + b"".join(
        d.to_bytes(4, "big") for d in (1 << 31, 1 << 31, 4))
    (raw / "t10k-images-idx3-ubyte").write_bytes(header)
    with pytest.raises(MNISTFileError, match=r"expected 18446744073709551632 bytes"):
        read_mnist_raw(raw, train=False)


def test_a_file_of_zero_images_is_refused(tmp_path):
    raw = tmp_path / "raw"
    fake_mnist(raw, compress=False)
    write_idx(raw / "t10k-images-idx3-ubyte", np.zeros((0, 28, 28), np.uint8), 0x803, False)
    write_idx(raw / "t10k-labels-idx1-ubyte", np.zeros(0, np.uint8), 0x801, False)
    with pytest.raises(MNISTFileError, match="t10k-images-idx3-ubyte: the file holds 0 images"):
        load_mnist(tmp_path, train=False)


def test_empty_root_is_refused(tmp_path, monkeypatch):
    fake_mnist(tmp_path / "raw")
    monkeypatch.chdir(tmp_path)  # before the fix, "" silently read the current folder
    with pytest.raises(ValueError, match="root: got an empty path"):
        load_mnist("")


@pytest.mark.parametrize("seed", ["a", 1.5, True])
def test_loader_seed_must_be_an_integer(seed):
    with pytest.raises(TypeError, match="seed: expected an integer"):
        mnist_loaders("shipped", batch_size=10, limit_train=20, limit_test=10, seed=seed)
