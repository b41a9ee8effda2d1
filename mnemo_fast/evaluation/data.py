"""Offline datasets: scikit-learn's bundled digits and Fashion-MNIST from Debian.

Both return (train, test) as ``TensorDataset`` of float32 images [N, 1, H, W] in [0, 1]
and int64 labels, so codes drawn from U[0, 1) live on the same scale as the data.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

FASHION_MNIST_DIR = Path(os.environ.get("MNEMO_FAST_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
DATASETS = ("digits", "fashion-mnist")


def digits(test_fraction: float = 0.3, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's 8x8 digits (1,797 images, 10 classes), a stratified seeded split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = bunch.images.astype(np.float32) / 16.0
    x_train, x_test, y_train, y_test = train_test_split(
        images, bunch.target, test_size=test_fraction, random_state=seed, stratify=bunch.target
    )
    return _tensor_dataset(x_train, y_train), _tensor_dataset(x_test, y_test)


def _tensor_dataset(images: np.ndarray, labels: np.ndarray) -> TensorDataset:
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).unsqueeze(1)
    return TensorDataset(x, torch.from_numpy(np.asarray(labels, dtype=np.int64)))


def read_idx(path: Path) -> np.ndarray:
    """Read a (gzipped) IDX file: the big-endian format of MNIST and Fashion-MNIST."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    zero, dtype_code, ndim = data[0] * 256 + data[1], data[2], data[3]
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find(directory: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (directory / name).exists():
            return directory / name
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}(.gz) not found in {directory}. Install the Debian package "
        f"'dataset-fashion-mnist' (sudo apt-get install dataset-fashion-mnist) or set "
        f"MNEMO_FAST_FASHION_MNIST to a folder holding the IDX files."
    )


def fashion_mnist(directory: str | Path | None = None, limit: int | None = None) -> tuple[TensorDataset, TensorDataset]:
    """Fashion-MNIST 28x28 (60,000 train / 10,000 test). ``limit`` keeps the first n of each split."""
    directory = Path(directory) if directory else FASHION_MNIST_DIR
    splits = []
    for prefix in ("train", "t10k"):
        images = read_idx(_find(directory, f"{prefix}-images-idx3-ubyte")).astype(np.float32) / 255.0
        labels = read_idx(_find(directory, f"{prefix}-labels-idx1-ubyte"))
        splits.append(_tensor_dataset(images[:limit], labels[:limit]))
    return splits[0], splits[1]


def load(name: str, **kwargs) -> tuple[TensorDataset, TensorDataset]:
    """(train, test) of a dataset by name: "digits" or "fashion-mnist"."""
    if name == "digits":
        return digits(**kwargs)
    if name == "fashion-mnist":
        return fashion_mnist(**kwargs)
    raise ValueError(f"unknown dataset {name!r}; choose from {DATASETS}")


def num_classes(dataset: TensorDataset) -> int:
    return int(dataset.tensors[1].max()) + 1
