"""Coloured shapes on noisy backgrounds: a dataset factory for the harness.

The harness calls ``shapes(**data.args)`` and gets ``(train, test)``; it does the validation split,
the normalisation and the batching itself.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

CLASSES = ("square", "disc", "cross", "bar")


class Shapes(Dataset):
    """``n`` 3 x size x size images of one shape each, at a random place, in a random colour."""

    classes = CLASSES  # the harness reads the number of classes from here

    def __init__(self, n: int, size: int, seed: int):
        rng = np.random.default_rng(seed)
        self.labels = rng.integers(0, len(CLASSES), n)
        self.images = np.empty((n, 3, size, size), np.float32)
        yy, xx = np.mgrid[:size, :size]
        for i, k in enumerate(self.labels):
            r = rng.integers(size // 5, size // 3)
            cy, cx = rng.integers(r, size - r, 2)
            if k == 0:
                mask = (abs(yy - cy) <= r) & (abs(xx - cx) <= r)
            elif k == 1:
                mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            elif k == 2:
                mask = ((abs(yy - cy) <= 1) & (abs(xx - cx) <= r)) | ((abs(xx - cx) <= 1) & (abs(yy - cy) <= r))
            else:
                mask = (abs(yy - cy) <= r // 2) & (abs(xx - cx) <= r + 2)
            colour = rng.uniform(0.4, 1.0, 3)
            self.images[i] = rng.normal(0.2, 0.15, (3, size, size))
            self.images[i][:, mask] = colour[:, None]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return torch.from_numpy(self.images[i]), int(self.labels[i])


def shapes(n_train: int = 1000, n_test: int = 300, size: int = 16, seed: int = 0):
    """The factory: a training set and a test set, drawn with different seeds."""
    return Shapes(n_train, size, seed), Shapes(n_test, size, seed + 1)
