"""Model registry: ``lenet`` (the classic 2-conv CNN) and ``mlp``, with dropout, batchnorm and noise options.

Add an architecture without touching the loop::

    @register("mynet")
    def mynet(spec: ModelSpec, input_shape, num_classes) -> nn.Module: ...

Models expose ``features`` and ``classifier`` submodules so a feature extractor can be frozen by name.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

Builder = Callable[..., nn.Module]
MODELS: dict[str, Builder] = {}


def register(name: str) -> Callable[[Builder], Builder]:
    def deco(fn: Builder) -> Builder:
        MODELS[name] = fn
        return fn

    return deco


def build_model(spec, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    return MODELS[spec.arch](spec, input_shape, num_classes)


class GaussianNoise(nn.Module):
    """Adds N(0, std^2) noise in training mode only: the classic custom module that reads ``self.training``.
    The mode guard treats it like Dropout."""

    mode_dependent = True  # the guard's marker for custom layers whose forward depends on the mode

    def __init__(self, std: float):
        super().__init__()
        self.std = std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.std > 0:
            return x + torch.randn_like(x) * self.std
        return x

    def extra_repr(self) -> str:
        return f"std={self.std}"


def _head(in_features: int, hidden: list[int], num_classes: int, spec) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in hidden:
        layers.append(nn.Linear(in_features, width))
        if spec.batchnorm:
            layers.append(nn.BatchNorm1d(width))
        layers.append(nn.ReLU())
        if spec.dropout > 0:
            layers.append(nn.Dropout(spec.dropout))
        in_features = width
    layers.append(nn.Linear(in_features, num_classes))
    return nn.Sequential(*layers)


class Net(nn.Module):
    def __init__(self, features: nn.Module, classifier: nn.Module, noise_std: float = 0.0):
        super().__init__()
        self.noise = GaussianNoise(noise_std) if noise_std > 0 else nn.Identity()
        self.features = features
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(self.noise(x)), 1))


@register("lenet")
def lenet(spec, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """conv 6@5x5 -> pool -> conv 12@5x5 -> pool -> fc 120 -> fc 60 -> classes.

    28x28 inputs use unpadded convolutions as in the tutorial; small inputs (digits' 8x8) pad by 2 so
    both pools still fit."""
    c, h, w = input_shape
    pad = 0 if min(h, w) >= 16 else 2
    layers: list[nn.Module] = []
    for cin, cout in ((c, 6), (6, 12)):
        layers.append(nn.Conv2d(cin, cout, 5, padding=pad))
        if spec.batchnorm:
            layers.append(nn.BatchNorm2d(cout))
        layers += [nn.ReLU(), nn.MaxPool2d(2)]
    features = nn.Sequential(*layers)
    # Probe the flattened size in eval mode: in training mode BatchNorm would fold this dummy batch
    # of zeros into its running statistics before training starts.
    features.eval()
    with torch.no_grad():
        flat = features(torch.zeros(1, c, h, w)).numel()
    features.train()
    return Net(features, _head(flat, [120, 60], num_classes, spec), spec.noise_std)


@register("mlp")
def mlp(spec, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    c, h, w = input_shape
    features = nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, 256), nn.ReLU())
    return Net(features, _head(256, [128], num_classes, spec), spec.noise_std)
