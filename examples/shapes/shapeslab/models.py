"""A small CNN with BatchNorm and a custom mode-dependent layer: a model factory for the harness.

The harness calls ``small_cnn(input_shape=(C, H, W), num_classes=K, **model.args)``.
"""
from __future__ import annotations

import torch
from torch import nn


class ChannelShuffleNoise(nn.Module):
    """In training mode, scales each channel of each example by a random factor around 1; in eval mode,
    the identity. A custom layer whose forward reads ``self.training``: ``mode_dependent = True`` tells
    the harness's mode guard to watch it like Dropout."""

    mode_dependent = True

    def __init__(self, strength: float):
        super().__init__()
        self.strength = strength

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.strength == 0:
            return x
        scale = 1 + self.strength * torch.randn(x.shape[0], x.shape[1], 1, 1, device=x.device, dtype=x.dtype)
        return x * scale


def small_cnn(input_shape, num_classes, width: int = 16, noise: float = 0.2, hidden: int = 64) -> nn.Module:
    c, h, w = input_shape
    backbone = nn.Sequential(
        nn.Conv2d(c, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
        ChannelShuffleNoise(noise),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
    )
    head = nn.Sequential(nn.Linear(8 * width, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
    return SmallCNN(backbone, head)


class SmallCNN(nn.Module):
    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone  # freeze it by name: model.freeze: [backbone]
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))
