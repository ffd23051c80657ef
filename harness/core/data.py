"""Datasets -> (train, val, test) batches.

Small datasets live as normalised tensors in memory (on the device) and are batched by index with a
seeded generator: no per-sample PIL transforms on the hot path. ``data.loader: dataloader`` keeps the
plain torchvision + DataLoader path for datasets that do not fit.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch

from harness.errors import DataError

if TYPE_CHECKING:
    from harness.spec import DataSpec

TEST_SPLIT_SEED = 12345  # digits has no official test split: hold out one fixed split, forever


@dataclass(frozen=True)
class Split:
    x: torch.Tensor  # (N, C, H, W) float, normalised
    y: torch.Tensor  # (N,) int64


class Batches:
    """Batches of one split. Shuffled splits use a generator seeded by (seed, epoch), so the data order
    of an epoch is the same in every run with that seed, whatever else consumed random numbers."""

    def __init__(self, split: Split, batch_size: int, shuffle: bool = False, seed: int = 0):
        self.split, self.batch_size, self.shuffle, self.seed = split, batch_size, shuffle, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-len(self.split.y) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.split.y)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(n, generator=g).to(self.split.x.device)
            for i in range(0, n, self.batch_size):
                idx = order[i:i + self.batch_size]
                yield self.split.x[idx], self.split.y[idx]
        else:
            for i in range(0, n, self.batch_size):
                yield self.split.x[i:i + self.batch_size], self.split.y[i:i + self.batch_size]


class LoaderBatches:
    """The plain torch DataLoader path (per-sample transforms, worker processes), same interface."""

    def __init__(self, dataset, indices: np.ndarray, batch_size: int, shuffle: bool, seed: int,
                 num_workers: int, device: torch.device):
        self.dataset, self.indices, self.batch_size = dataset, indices, batch_size
        self.shuffle, self.seed, self.num_workers, self.device = shuffle, seed, num_workers, device
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)

    def __iter__(self):
        from torch.utils.data import DataLoader, Subset

        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        loader = DataLoader(Subset(self.dataset, self.indices.tolist()), batch_size=self.batch_size,
                            shuffle=self.shuffle, generator=g, num_workers=self.num_workers)
        for x, y in loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


@dataclass(frozen=True)
class Data:
    name: str
    train: Batches | LoaderBatches
    val: Batches | LoaderBatches
    test: Batches | LoaderBatches
    input_shape: tuple[int, int, int]
    num_classes: int
    sizes: dict[str, int]
    source: str  # where the examples came from, for the MLflow dataset input

    def example_input(self, n: int = 2) -> torch.Tensor:
        x, _ = next(iter(self.val))
        return x[:n]


def load_data(spec: DataSpec, seed: int, device: torch.device) -> Data:
    """Load ``spec.dataset`` and split it into train / val (held out with ``split_seed``) / test."""
    if spec.dataset == "digits":
        x_all, y_all, source = _digits()
        test_idx, rest = _split(len(y_all), 0.2, TEST_SPLIT_SEED)
        x_test, y_test = x_all[test_idx], y_all[test_idx]
        x_trval, y_trval = x_all[rest], y_all[rest]
    else:
        if spec.loader == "dataloader":
            return _dataloader_data(spec, seed, device)
        (x_trval, y_trval), (x_test, y_test), source = _torchvision_tensors(spec)

    val_idx, train_idx = _split(len(y_trval), spec.val_fraction, spec.split_seed)
    if spec.limit_train:
        train_idx = train_idx[: spec.limit_train]
    x_train, y_train = x_trval[train_idx], y_trval[train_idx]
    # Normalise with the training split's statistics only (no peeking at val/test).
    mean, std = float(x_train.mean()), float(x_train.std()) or 1.0

    def to_split(x: np.ndarray, y: np.ndarray) -> Split:
        xt = torch.from_numpy(((x - mean) / std).astype(np.float32)).to(device)
        return Split(xt, torch.from_numpy(y.astype(np.int64)).to(device))

    train = to_split(x_train, y_train)
    val = to_split(x_trval[val_idx], y_trval[val_idx])
    test = to_split(x_test, y_test)
    return Data(
        name=spec.dataset,
        train=Batches(train, spec.batch_size, shuffle=True, seed=seed),
        val=Batches(val, spec.val_batch_size),
        test=Batches(test, spec.val_batch_size),
        input_shape=tuple(train.x.shape[1:]),  # type: ignore[arg-type]
        num_classes=10,
        sizes={"train": len(train.y), "val": len(val.y), "test": len(test.y)},
        source=source,
    )


def _split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    k = max(1, int(round(n * fraction)))
    return np.sort(order[:k]), np.sort(order[k:])


def _digits() -> tuple[np.ndarray, np.ndarray, str]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None, :, :]  # (1797, 1, 8, 8)
    return x, d.target, "sklearn.datasets.load_digits"


_TV_CLASSES = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}


def _torchvision_dataset(spec: DataSpec, train: bool, transform=None):
    import torchvision

    cls = getattr(torchvision.datasets, _TV_CLASSES[spec.dataset])
    root = Path(spec.root)
    try:
        return cls(str(root), train=train, download=spec.download, transform=transform)
    except Exception as e:  # missing files, or a download that failed (no network, blocked host)
        first = (str(e).splitlines() or [""])[0][:120]
        if spec.download:
            reason = f"the download failed ({type(e).__name__}: {first})"
        elif "not found" in first.lower():
            reason = "data.download is false"
        else:
            raise
    raw = root / cls.__name__ / "raw"
    raise DataError(
        f"data.dataset={spec.dataset}: files not found in {raw} and {reason}; put "
        f"train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and "
        f"t10k-labels-idx1-ubyte there (or set data.root)"
    )


def _torchvision_tensors(spec: DataSpec):
    train = _torchvision_dataset(spec, train=True)
    test = _torchvision_dataset(spec, train=False)

    def arrays(ds):
        # The dataset object already holds every image as one uint8 tensor: use it directly.
        return (ds.data.numpy().astype(np.float32) / 255.0)[:, None, :, :], ds.targets.numpy()

    return arrays(train), arrays(test), f"torchvision.datasets.{type(train).__name__}({spec.root})"


def _dataloader_data(spec: DataSpec, seed: int, device: torch.device) -> Data:
    from torchvision import transforms

    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    trval = _torchvision_dataset(spec, train=True, transform=tf)
    test = _torchvision_dataset(spec, train=False, transform=tf)
    val_idx, train_idx = _split(len(trval), spec.val_fraction, spec.split_seed)
    if spec.limit_train:
        train_idx = train_idx[: spec.limit_train]
    w = spec.num_workers

    def mk(ds, idx, bs, shuffle):
        return LoaderBatches(ds, idx, bs, shuffle, seed, w, device)

    return Data(
        name=spec.dataset,
        train=mk(trval, train_idx, spec.batch_size, True),
        val=mk(trval, val_idx, spec.val_batch_size, False),
        test=mk(test, np.arange(len(test)), spec.val_batch_size, False),
        input_shape=(1, 28, 28),
        num_classes=10,
        sizes={"train": len(train_idx), "val": len(val_idx), "test": len(test)},
        source=f"torchvision.datasets.{type(trval).__name__}({spec.root})",
    )
