"""Tiny dataset files in the real formats, written by the tests (no download, ever): MNIST idx files
and CIFAR python pickles, with learnable contents."""
from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np


def write_idx(raw_dir: Path, prefix: str, images: np.ndarray, labels: np.ndarray) -> None:
    raw_dir.mkdir(parents=True, exist_ok=True)
    n, h, w = images.shape
    (raw_dir / f"{prefix}-images-idx3-ubyte").write_bytes(
        struct.pack(">IIII", 0x0803, n, h, w) + images.astype(np.uint8).tobytes())
    (raw_dir / f"{prefix}-labels-idx1-ubyte").write_bytes(
        struct.pack(">II", 0x0801, len(labels)) + labels.astype(np.uint8).tobytes())


def colour_images(n: int, seed: int, classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """(n, 3, 32, 32) uint8: class k is a bright block in channel k % 3 at a class-dependent row."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    x = rng.integers(0, 90, (n, 3, 32, 32))
    for i, k in enumerate(y):
        r = 2 + 3 * (k % 10)
        x[i, k % 3, r:r + 3, 4:28] = 255
    return x.astype(np.uint8), y


def write_cifar10(root: Path, n_per_batch: int = 40, n_test: int = 60) -> Path:
    """``root/cifar-10-batches-py``: five training batches and a test batch, as CIFAR-10 ships them."""
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True, exist_ok=True)
    for i in range(1, 6):
        x, y = colour_images(n_per_batch, seed=i)
        write_cifar_batch(base / f"data_batch_{i}", x, y.tolist(), "labels")
    x, y = colour_images(n_test, seed=99)
    write_cifar_batch(base / "test_batch", x, y.tolist(), "labels")
    return base


def write_cifar100(root: Path, n_train: int = 150, n_test: int = 50) -> Path:
    base = root / "cifar-100-python"
    base.mkdir(parents=True, exist_ok=True)
    x, y = colour_images(n_train, seed=1, classes=100)
    write_cifar_batch(base / "train", x, y.tolist(), "fine_labels")
    x, y = colour_images(n_test, seed=2, classes=100)
    write_cifar_batch(base / "test", x, y.tolist(), "fine_labels")
    return base


def write_cifar_batch(path: Path, x: np.ndarray, labels, key: str) -> None:
    entry = {"batch_label": "a tiny batch", key: labels, "data": x.reshape(len(x), -1),
             "filenames": [f"img_{i}.png" for i in range(len(x))]}
    path.write_bytes(pickle.dumps(entry, protocol=2))
