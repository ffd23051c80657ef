"""A researcher's own dataset, from ``data.dataset: package.module:function``, checked against the contract.

The factory is called as ``factory(**data.args)`` and returns ``(train, test)``, each either a pair of
tensors (or numpy arrays) ``(x, y)`` with x ``(N, C, H, W)`` (or ``(N, H, W)``) float or uint8 images and y
``(N,)`` integer class indices, or a torch ``Dataset`` whose items are such ``(x, y)`` pairs. The number
of classes is ``data.num_classes``, else the sets' ``classes`` attribute (torchvision's datasets have one),
else the largest label + 1. Every way a factory can break the contract is one line naming the field.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from harness.core import imports
from harness.core.datasets import Source
from harness.errors import SpecError

FIELD = "data.dataset"


def from_factory(spec) -> Source:
    try:
        fn = imports.resolve(spec.dataset)
    except imports.FactoryError as e:
        raise SpecError(f"{FIELD}: {e}") from None
    out = imports.call(FIELD, spec.dataset, fn, **spec.args)
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise SpecError(f"{FIELD}: {spec.dataset} must return (train, test); it returned "
                        f"{imports.short(out, 60)}")
    train, test = (_checked(part, what, spec.dataset) for part, what in zip(out, ("training", "test")))
    k = spec.num_classes or _declared_classes(out[0]) or 0  # 0: the largest label + 1, once seen
    args = ", ".join(f"{a}={v!r}" for a, v in spec.args.items())
    return Source(train, test, k, f"{spec.dataset}({args})"[:500])


def _declared_classes(part: Any) -> int:
    classes = getattr(part, "classes", None)
    return len(classes) if isinstance(classes, (list, tuple)) and len(classes) >= 2 else 0


def _checked(part: Any, what: str, path: str) -> Any:
    if isinstance(part, (torch.Tensor, np.ndarray)):
        raise SpecError(f"{FIELD}: {path}'s {what} set is a single {tuple(part.shape)} array; return "
                        f"((x_train, y_train), (x_test, y_test)) or two Datasets")
    if isinstance(part, (tuple, list)) and len(part) == 2:
        return tensors(part[0], part[1], f"{path}'s {what} set")
    if hasattr(part, "__getitem__") and hasattr(part, "__len__"):
        if len(part) == 0:
            raise SpecError(f"{FIELD}: {path}'s {what} set is empty")
        try:
            item = part[0]
        except Exception as e:
            raise SpecError(f"{FIELD}: {path}'s {what} set raised {type(e).__name__} on item 0: "
                            f"{imports._first_line(e)}") from None
        if not (isinstance(item, (tuple, list)) and len(item) >= 2 and isinstance(item[0], torch.Tensor)
                and item[0].dim() in (2, 3)):
            raise SpecError(f"{FIELD}: {path}'s {what} set yields {_describe(item)} as item 0; each item "
                            f"must be (image tensor (C, H, W), label) (add transforms.ToTensor()?)")
        return part
    raise SpecError(f"{FIELD}: {path}'s {what} set is {imports.short(part, 60)}; return a torch Dataset "
                    f"or a pair of tensors (x, y)")


def _describe(item: Any, top: bool = True) -> str:
    if top and isinstance(item, (tuple, list)):
        return "(" + ", ".join(_describe(i, False) for i in item[:3]) + ")"
    if isinstance(item, torch.Tensor):
        return f"a {tuple(item.shape)} tensor"
    return type(item).__name__


def tensors(x: Any, y: Any, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` as checked host tensors: x ``(N, C, H, W)`` uint8 or float32 (finite), y ``(N,)`` int64."""
    try:
        x = torch.as_tensor(x)
        y = torch.as_tensor(y)
    except (TypeError, ValueError, RuntimeError) as e:
        raise SpecError(f"{FIELD}: {what} is not a pair of tensors or arrays: {imports._first_line(e)}") from None
    if x.dim() == 3:
        x = x[:, None]  # (N, H, W): one channel
    if x.dim() != 4:
        raise SpecError(f"{FIELD}: {what}: images of shape {tuple(x.shape)}; expected (N, C, H, W) or (N, H, W)")
    if x.dtype != torch.uint8 and not x.is_floating_point():
        raise SpecError(f"{FIELD}: {what}: images of dtype {x.dtype}; use float or uint8")
    if y.dim() != 1 or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise SpecError(f"{FIELD}: {what}: labels must be a 1-d tensor of integer class indices, got "
                        f"{y.dtype} of shape {tuple(y.shape)}")
    if len(x) != len(y):
        raise SpecError(f"{FIELD}: {what} has {len(x)} images but {len(y)} labels")
    if len(x) == 0:
        raise SpecError(f"{FIELD}: {what} is empty")
    if x.is_floating_point():
        x = x.float()
        if not bool(torch.isfinite(x).all()):
            raise SpecError(f"{FIELD}: {what}: the images hold NaN or infinite values")
    return x, y.long()


def materialise(part: Any, what: str, path: str, workers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A factory's ``Dataset`` read once into tensors (the in-memory path)."""
    from torch.utils.data import DataLoader

    xs, ys = [], []
    try:
        for x, y, *_ in DataLoader(part, batch_size=512, num_workers=workers):
            xs.append(x)
            ys.append(torch.as_tensor(y))
    except SpecError:
        raise
    except Exception as e:
        raise SpecError(f"{FIELD}: {path}'s {what} set cannot be read into batches: {type(e).__name__}: "
                        f"{imports._first_line(e)}") from None
    return tensors(torch.cat(xs), torch.cat(ys), f"{path}'s {what} set")


def check_labels(y: torch.Tensor, k: int, what: str, where: str) -> None:
    """Every label in ``0..k-1``, else one line naming the set and the first bad example."""
    bad = torch.nonzero((y < 0) | (y >= k)).flatten()
    if len(bad):
        i = int(bad[0])
        raise SpecError(f"{where}: the {what} set has label {int(y[i])} (example {i}) outside 0..{k - 1}"
                        f" for {k} classes; fix the labels or set data.num_classes")


def infer_classes(*ys: torch.Tensor, where: str) -> int:
    top = max(int(y.max()) for y in ys if len(y)) + 1
    if top < 2:
        raise SpecError(f"{where}: every label is {top - 1}: a classifier needs at least 2 classes "
                        f"(or set data.num_classes)")
    return top

