"""Datasets -> (train, val, test) batches.

The examples come from a built-in set (:mod:`harness.core.datasets`) or a researcher's factory
(:mod:`harness.core.sources`). Here, for every source alike: the validation split (held out with its
own seed), normalisation with per-channel statistics of the training split only, and the batching:
tensors on the device batched by index when the set fits (``data.loader: auto`` or ``memory``), else a
``DataLoader`` (``dataloader``). Splits that leave nothing to train on are refused before any run.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from harness.core import sources
from harness.core.batches import ArrayDataset, Augment, Batches, LoaderBatches, Split
from harness.core.datasets import Source, builtin
from harness.errors import SpecError

if TYPE_CHECKING:
    from harness.spec import DataSpec

__all__ = ["Batches", "Data", "LoaderBatches", "Split", "load_data"]
MEMORY_SHARE = 0.5  # `auto` keeps a set in memory when its float32 copy needs at most this share


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
    src = builtin(spec) if spec.dataset in _BUILTIN else sources.from_factory(spec)
    n_trval = len(src.train[1]) if isinstance(src.train, tuple) else len(src.train)
    val_idx, train_idx = _split(n_trval, spec.val_fraction, spec.split_seed)
    _enough(spec, n_trval, len(train_idx))
    if spec.limit_train:
        train_idx = train_idx[: spec.limit_train]
    path = spec.dataset
    if spec.loader == "dataloader" or (spec.loader == "auto" and not _fits(src, device)):
        return _loader_data(spec, src, seed, device, train_idx, val_idx)
    if not isinstance(src.train, tuple):
        src.train = sources.materialise(src.train, "training", path, spec.num_workers)
    if not isinstance(src.test, tuple):
        src.test = sources.materialise(src.test, "test", path, spec.num_workers)
    (x_trval, y_trval), (x_test, y_test) = src.train, src.test
    k = _classes(src, spec, y_trval, y_test)
    if x_test.shape[1:] != x_trval.shape[1:]:
        raise SpecError(f"data.dataset: {path}'s test images are {tuple(x_test.shape[1:])}, its training "
                        f"images {tuple(x_trval.shape[1:])}; they must have the same shape")
    # Normalise with the training split's statistics only (no peeking at val/test).
    tr = torch.from_numpy(train_idx)
    mean, std = _stats(x_trval[tr])

    def to_split(x: torch.Tensor, y: torch.Tensor) -> Split:
        x = x.to(device)  # uint8 crosses to the device as bytes, a quarter of the floats
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.float().clone()
        x.sub_(mean.to(device).view(1, -1, 1, 1)).div_(std.to(device).view(1, -1, 1, 1))
        return Split(x, y.to(device))

    train = to_split(x_trval[tr], y_trval[tr])
    val = to_split(x_trval[torch.from_numpy(val_idx)], y_trval[torch.from_numpy(val_idx)])
    test = to_split(x_test, y_test)
    augment = _augment(spec, train.x.shape, -mean / std)
    return Data(
        name=spec.dataset,
        train=Batches(train, spec.batch_size, shuffle=True, seed=seed, augment=augment),
        val=Batches(val, spec.val_batch_size),
        test=Batches(test, spec.val_batch_size),
        input_shape=tuple(train.x.shape[1:]),  # type: ignore[arg-type]
        num_classes=k,
        sizes={"train": len(train.y), "val": len(val.y), "test": len(test.y)},
        source=src.source,
    )


_BUILTIN = ("digits", "mnist", "fashion_mnist", "cifar10", "cifar100")


def _split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    k = max(1, int(round(n * fraction)))
    return np.sort(order[:k]), np.sort(order[k:])


def _enough(spec: DataSpec, n_trval: int, n_train: int) -> None:
    """At least two training examples (BatchNorm cannot train on one; see batches._n_batches)."""
    if n_train < 2:
        raise SpecError(f"data.val_fraction={spec.val_fraction} leaves {n_train} training example(s) of "
                        f"{n_trval}; at least 2 are needed: lower data.val_fraction")
    if spec.limit_train is not None and spec.limit_train < 2:
        raise SpecError(f"data.limit_train={spec.limit_train} leaves 1 training example; at least 2 are needed")


def _classes(src: Source, spec: DataSpec, *ys: torch.Tensor) -> int:
    k = src.num_classes or sources.infer_classes(*ys, where="data.dataset")
    for y, what in zip(ys, ("training", "test")):
        sources.check_labels(y, k, what, "data.dataset")
    return k


def _stats(x: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (population) std of images scaled to floats, accumulated in float64 in
    chunks (a float64 copy of CIFAR would take a gigabyte)."""
    scale = 255.0 if x.dtype == torch.uint8 else 1.0
    s = torch.zeros(x.shape[1], dtype=torch.float64)
    s2 = torch.zeros_like(s)
    for i in range(0, len(x), chunk):
        part = x[i:i + chunk].to(torch.float64) / scale
        s += part.sum(dim=(0, 2, 3))
        s2 += (part * part).sum(dim=(0, 2, 3))
    n = len(x) * x.shape[2] * x.shape[3]
    mean = s / n
    std = (s2 / n - mean * mean).clamp_min(0).sqrt()
    std[std < 1e-12] = 1.0  # a constant channel: leave its scale alone
    return mean.float(), std.float()


def _augment(spec: DataSpec, shape, fill: torch.Tensor) -> Augment | None:
    # CIFAR's standard 4-pixel padding on 32x32 images; the same share of the side for other sizes.
    return Augment(max(1, round(min(shape[2:]) / 8)), fill) if spec.augment else None


def _fits(src: Source, device: torch.device) -> bool:
    """Whether float32 copies of every split fit in the device's memory (``data.loader: auto``)."""
    n, item = 0, 0
    for part in (src.train, src.test):
        if isinstance(part, tuple):
            n, item = n + len(part[1]), part[0][0].numel()
        else:
            n, item = n + len(part), part[0][0].numel()
    need = n * item * 4
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        import psutil

        free = psutil.virtual_memory().available
    return need <= MEMORY_SHARE * free


def _loader_data(spec: DataSpec, src: Source, seed: int, device: torch.device, train_idx: np.ndarray,
                 val_idx: np.ndarray) -> Data:
    trval = ArrayDataset(*src.train) if isinstance(src.train, tuple) else src.train
    test = ArrayDataset(*src.test) if isinstance(src.test, tuple) else src.test
    if isinstance(src.train, tuple):
        mean, std = _stats(src.train[0][torch.from_numpy(train_idx)])
        k = _classes(src, spec, src.train[1], *([src.test[1]] if isinstance(src.test, tuple) else []))
    else:
        mean, std, k = _stream_stats(trval, train_idx, spec, src.num_classes)
    shape = tuple(trval[0][0].shape)
    shape = (1, *shape) if len(shape) == 2 else shape
    w = spec.num_workers

    def mk(ds, idx, bs, shuffle, what, augment=None):
        return LoaderBatches(ds, idx, bs, shuffle, seed, w, device, mean, std, k, what, augment)

    return Data(
        name=spec.dataset,
        train=mk(trval, train_idx, spec.batch_size, True, "training", _augment(spec, (0, *shape), -mean / std)),
        val=mk(trval, val_idx, spec.val_batch_size, False, "training"),
        test=mk(test, np.arange(len(test)), spec.val_batch_size, False, "test"),
        input_shape=shape,  # type: ignore[arg-type]
        num_classes=k,
        sizes={"train": len(train_idx), "val": len(val_idx), "test": len(test)},
        source=src.source,
    )


def _stream_stats(ds, idx: np.ndarray, spec: DataSpec, k: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One pass over a factory's training subset: per-channel statistics and, unless declared, the
    number of classes (largest training label + 1)."""
    from torch.utils.data import Subset

    xs = sources.materialise(Subset(ds, idx.tolist()), "training", spec.dataset, spec.num_workers) \
        if len(idx) <= 10_000 else None
    if xs is None:  # a big set: the statistics of a fixed sample of 10000 training examples
        pick = np.sort(np.random.default_rng(0).choice(idx, 10_000, replace=False))
        xs = sources.materialise(Subset(ds, pick.tolist()), "training", spec.dataset, spec.num_workers)
    mean, std = _stats(xs[0])
    k = k or sources.infer_classes(xs[1], where="data.dataset")
    sources.check_labels(xs[1], k, "training", "data.dataset")
    return mean, std, k
