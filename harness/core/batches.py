"""Batches of one split: tensors resident on the device batched by index (no host sync per batch), or
a torch ``DataLoader`` for sets that do not fit. The training augmentation (random crop with padding +
horizontal flip) runs on the device, batched; evaluation batches are never augmented."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch


@dataclass(frozen=True)
class Split:
    x: torch.Tensor  # (N, C, H, W) float, normalised
    y: torch.Tensor  # (N,) int64


def _generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


def _n_batches(n: int, batch_size: int, shuffle: bool) -> int:
    # A last training batch of one example is dropped: BatchNorm cannot normalise a batch of one (it
    # raises, or trains on zero variance), and a one-example step is mostly noise anyway.
    full = -(-n // batch_size)
    return full - 1 if shuffle and batch_size > 1 and n % batch_size == 1 else full


class Augment:
    """Random crop after zero padding (``pad`` pixels; zero in pixel space, i.e. ``fill`` once
    normalised) and a horizontal flip with probability 1/2, per example, as torchvision's
    ``RandomCrop(size, padding) + RandomHorizontalFlip()``, on a whole batch at once on its device."""

    def __init__(self, pad: int, fill: torch.Tensor):
        self.pad, self.fill = pad, fill

    def draw(self, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Per example: the crop's offset (row, column) in the padded image, and whether to flip."""
        return torch.randint(0, 2 * self.pad + 1, (n, 2), generator=g), torch.rand(n, generator=g) < 0.5

    def __call__(self, x: torch.Tensor, shifts: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        p, dev = self.pad, x.device
        padded = self.fill.to(dev, x.dtype).view(1, c, 1, 1).expand(b, c, h + 2 * p, w + 2 * p).clone()
        padded[:, :, p:p + h, p:p + w] = x
        rows = shifts[:, :1] + torch.arange(h, device=dev)  # (B, H) rows of the padded image
        cols = shifts[:, 1:] + torch.arange(w, device=dev)  # (B, W)
        cols = torch.where(flips[:, None], cols.flip(1), cols)
        # One gather over the flattened padded image (2x faster than 4-d advanced indexing on CPU).
        flat = (rows[:, :, None] * (w + 2 * p) + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
        return padded.view(b, c, -1).gather(2, flat).view(b, c, h, w)


class Batches:
    """Batches of a split held in memory. Shuffled splits use a generator seeded by (seed, epoch), so
    the data order (and augmentation) of an epoch is the same in every run with that seed, whatever else
    consumed random numbers; both are drawn once per epoch and moved to the device in one copy."""

    def __init__(self, split: Split, batch_size: int, shuffle: bool = False, seed: int = 0,
                 augment: Augment | None = None):
        self.split, self.batch_size, self.shuffle, self.seed = split, batch_size, shuffle, seed
        self.augment = augment if shuffle else None  # never validation or test
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return _n_batches(len(self.split.y), self.batch_size, self.shuffle)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        x, y, bs = self.split.x, self.split.y, self.batch_size
        if not self.shuffle:
            for i in range(0, len(y), bs):
                yield x[i:i + bs], y[i:i + bs]
            return
        g = _generator(self.seed, self.epoch)
        order = torch.randperm(len(y), generator=g)
        aug = self.augment.draw(len(y), g) if self.augment else None
        order = order.to(x.device)
        if aug is not None:
            aug = tuple(t.to(x.device) for t in aug)
        for b in range(len(self)):
            sl = slice(b * bs, (b + 1) * bs)
            idx = order[sl]
            xb = x[idx]
            if aug is not None:
                xb = self.augment(xb, aug[0][sl], aug[1][sl])
            yield xb, y[idx]


class ArrayDataset(torch.utils.data.Dataset):
    """Host tensors as a map-style dataset (the DataLoader path of the built-in sets)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


class LoaderBatches:
    """The torch DataLoader path (per-sample reads, worker processes), same interface. Each batch is
    scaled (uint8 to [0, 1]), normalised and augmented on the device; its labels are checked on the
    host (a big set's labels are not all read before training)."""

    def __init__(self, dataset, indices: np.ndarray, batch_size: int, shuffle: bool, seed: int,
                 num_workers: int, device: torch.device, mean: torch.Tensor, std: torch.Tensor,
                 num_classes: int, what: str, augment: Augment | None = None):
        self.dataset, self.indices, self.batch_size = dataset, indices, batch_size
        self.shuffle, self.seed, self.num_workers, self.device = shuffle, seed, num_workers, device
        self.mean, self.std = mean.view(1, -1, 1, 1).to(device), std.view(1, -1, 1, 1).to(device)
        self.num_classes, self.what = num_classes, what
        self.augment = augment if shuffle else None
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return _n_batches(len(self.indices), self.batch_size, self.shuffle)

    def __iter__(self):
        from torch.utils.data import DataLoader, Subset

        from harness.core.sources import check_labels

        g = _generator(self.seed, self.epoch)
        order = self.indices
        if self.shuffle:
            order = order[torch.randperm(len(order), generator=g).numpy()][:len(self) * self.batch_size]
        loader = DataLoader(Subset(self.dataset, order.tolist()), batch_size=self.batch_size,
                            num_workers=self.num_workers, pin_memory=self.device.type == "cuda")
        for x, y, *_ in loader:
            y = torch.as_tensor(y).long()
            check_labels(y, self.num_classes, self.what, "data.dataset")
            x = x.to(self.device, non_blocking=True)
            x = x[:, None] if x.dim() == 3 else x
            x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
            x = (x - self.mean) / self.std
            if self.augment is not None:
                shifts, flips = self.augment.draw(len(x), g)
                x = self.augment(x, shifts.to(self.device), flips.to(self.device))
            yield x, y.to(self.device, non_blocking=True)
