"""The built-in datasets as host tensors: ``digits`` (scikit-learn, offline), ``mnist`` and
``fashion_mnist`` (idx files), ``cifar10`` and ``cifar100`` (the python pickles).

Files are read and checked here (header, length, images against labels, label range), each problem one
:class:`DataError` line naming the file; torchvision only downloads them when they are missing. CIFAR's
pickles are read by an unpickler that builds nothing but numpy arrays, lists and dicts, so a tampered
file cannot run code.
"""
from __future__ import annotations

import pickle
import sys
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harness.errors import DataError

TEST_SPLIT_SEED = 12345  # digits has no official test split: hold out one fixed split, forever


@dataclass
class Source:
    """A dataset's train and test examples: ``(x, y)`` host tensors (x ``(N, C, H, W)`` uint8 or float,
    y ``(N,)`` int64) or, from a factory, torch ``Dataset``s."""
    train: Any
    test: Any
    num_classes: int
    source: str  # where the examples came from, for the MLflow dataset input: the files' absolute path,
    # or the factory call that made them


def builtin(spec) -> Source:
    if spec.dataset == "digits":
        return _digits()
    if spec.dataset in ("mnist", "fashion_mnist"):
        return _mnist(spec)
    return _cifar(spec)


def _digits() -> Source:
    images, target, src = _digits_arrays()
    x = torch.from_numpy((images / 16.0).astype(np.float32)[:, None, :, :])  # (1797, 1, 8, 8)
    y = torch.from_numpy(target.astype(np.int64))
    order = np.random.default_rng(TEST_SPLIT_SEED).permutation(len(y))
    k = int(round(len(y) * 0.2))
    test, rest = torch.from_numpy(np.sort(order[:k])), torch.from_numpy(np.sort(order[k:]))
    return Source((x[rest], y[rest]), (x[test], y[test]), 10, src)


def _digits_arrays() -> tuple[np.ndarray, np.ndarray, str]:
    """scikit-learn's bundled digits file (a copy of the UCI handwritten digits' test set), read as
    ``load_digits`` reads it, without importing scikit-learn (its import costs a second or more of every
    command's start-up); with the file's path, the dataset's source."""
    import gzip
    from importlib.util import find_spec

    spec = find_spec("sklearn")  # locates the package without running it
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if path is None or not path.is_file():  # another layout: let scikit-learn find it
        from sklearn.datasets import load_digits

        d = load_digits()
        src = Path(sys.modules[load_digits.__module__].__file__).parent / "data" / "digits.csv.gz"
        return d.images, d.target, str(src)
    with gzip.open(path, "rt") as f:
        data = np.loadtxt(f, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int), str(path)


# -- MNIST-format idx files --------------------------------------------------------------------------

_MNIST = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}
_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
              "t10k-labels-idx1-ubyte")


def _mnist(spec) -> Source:
    cls = _MNIST[spec.dataset]
    raw = Path(spec.root) / cls / "raw"
    if not all((raw / f).is_file() for f in _IDX_FILES):
        _download(spec, cls, raw, ", ".join(_IDX_FILES))

    def split(prefix: str):
        x = _read_idx(raw / f"{prefix}-images-idx3-ubyte", 0x0803, 3)
        y = _read_idx(raw / f"{prefix}-labels-idx1-ubyte", 0x0801, 1)
        _agree(x, y, raw / f"{prefix}-images-idx3-ubyte", raw / f"{prefix}-labels-idx1-ubyte", 10)
        return torch.from_numpy(x[:, None].copy()), torch.from_numpy(y.astype(np.int64))

    return Source(split("train"), split("t10k"), 10, str(raw.resolve()))


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    """An idx file of unsigned bytes: big-endian magic, ``ndim`` sizes, then the data."""
    try:
        blob = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror or type(e).__name__})") from None
    head = 4 + 4 * ndim
    if len(blob) < head:
        raise DataError(f"{path}: truncated ({len(blob)} bytes, shorter than its {head}-byte header)")
    found, *dims = struct.unpack(f">{1 + ndim}I", blob[:head])
    if found != magic:
        raise DataError(f"{path}: not an idx{ndim} file of unsigned bytes (magic 0x{found:08x}, expected "
                        f"0x{magic:08x}); is it still gzipped?")
    need = head + int(np.prod(dims, dtype=np.int64))
    if len(blob) != need:
        shape = "x".join(map(str, dims))
        raise DataError(f"{path}: {'truncated' if len(blob) < need else 'too long'}: its header says {shape} "
                        f"({need} bytes) but the file holds {len(blob)} bytes; download it again")
    return np.frombuffer(blob, np.uint8, offset=head).reshape(dims)


def _agree(x: np.ndarray, y: np.ndarray, xpath: Path, ypath: Path, num_classes: int) -> None:
    if len(x) != len(y):
        raise DataError(f"{xpath}: {len(x)} images but {ypath.name} holds {len(y)} labels; the two files "
                        f"must come from the same set")
    bad = np.flatnonzero((y < 0) | (y >= num_classes))
    if len(bad):
        raise DataError(f"{ypath}: label {int(y[bad[0]])} at index {int(bad[0])} is out of range "
                        f"0..{num_classes - 1}")


# -- CIFAR-10/100 pickles ----------------------------------------------------------------------------

_CIFAR = {  # folder, train files, test files, label key, classes
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels", 10),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels", 100),
}


def _cifar(spec) -> Source:
    folder, train_files, test_files, key, k = _CIFAR[spec.dataset]
    base = Path(spec.root) / folder
    if not all((base / f).is_file() for f in train_files + test_files):
        _download(spec, "CIFAR10" if k == 10 else "CIFAR100", base, ", ".join(train_files + test_files))

    def split(files: list[str]):
        xs, ys = [], []
        for name in files:
            x, y = _read_cifar(base / name, key, k)
            xs.append(x)
            ys.append(y)
        return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))

    return Source(split(train_files), split(test_files), k, str(base.resolve()))


class _ArraysOnly(pickle.Unpickler):
    """Builds numpy arrays and plain containers; any other class in the pickle is refused."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"),
               ("_codecs", "encode")}  # how protocol-2 pickles written by Python 3 spell bytes

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused to build {module}.{name}")
        if module.startswith("numpy.core"):
            module = "numpy._core" + module[len("numpy.core"):]  # numpy 2 moved it; old pickles say core
        return super().find_class(module, name)


def _read_cifar(path: Path, key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR python batch: ``data`` (N, 3072) uint8 rows (R, G, B planes of 32x32) + labels."""
    try:
        with open(path, "rb") as f:
            entry = _ArraysOnly(f, encoding="latin1").load()
    except Exception as e:  # truncated (EOFError), not a pickle (UnpicklingError), a refused class ...
        first = (str(e).strip().splitlines() or ["no message"])[0][:100]
        raise DataError(f"{path}: not a readable CIFAR batch ({type(e).__name__}: {first}); "
                        f"download it again") from None
    entry = {k.decode() if isinstance(k, bytes) else k: v for k, v in entry.items()} \
        if isinstance(entry, dict) else {}
    data, labels = entry.get("data"), entry.get(key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: not a CIFAR batch: 'data' must be uint8 rows of 3072 pixels, got {got}")
    if labels is None:
        raise DataError(f"{path}: not a CIFAR batch: no {key!r} list")
    y = np.asarray(labels, dtype=np.int64)
    x = data.reshape(-1, 3, 32, 32)
    _agree(x, y, path, path, num_classes)
    return x, y


def _download(spec, cls_name: str, where: Path, files: str) -> None:
    """Fetch a missing torchvision dataset into ``spec.root`` (torchvision checks the archives' md5)."""
    if spec.download:
        import torchvision

        cls = getattr(torchvision.datasets, cls_name)
        try:
            for train in (True, False):
                cls(str(spec.root), train=train, download=True)
            return
        except Exception as e:  # no network, a blocked host, a bad archive
            first = (str(e).splitlines() or [""])[0][:120]
            reason = f"the download failed ({type(e).__name__}: {first})"
    else:
        reason = "data.download is false"
    raise DataError(f"data.dataset={spec.dataset}: files not found in {where} and {reason}; put {files} "
                    f"there (or set data.root)")
