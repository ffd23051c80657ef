"""BatchNorm ResNets for small images (CIFAR's 32x32, digits' 8x8), as feature extractors: each builder
returns ``(features, width)`` where ``features`` maps ``(N, C, H, W)`` to ``(N, width)``."""
from __future__ import annotations

from torch import nn


def small_image_resnet18(in_channels: int) -> tuple[nn.Sequential, int]:
    """torchvision's ``resnet18`` with the usual CIFAR adaptation: a 3x3 stride-1 stem and no max-pool
    (the ImageNet stem would shrink 32x32 inputs to 8x8 before the first block)."""
    from torchvision.models import resnet18

    net = resnet18(weights=None)
    stem = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(stem.weight, mode="fan_out", nonlinearity="relu")  # as torchvision inits convs
    features = nn.Sequential(stem, net.bn1, net.relu, net.layer1, net.layer2, net.layer3, net.layer4,
                             nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return features, net.fc.in_features


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and an identity (or 1x1 projection) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def cifar_resnet20(in_channels: int, blocks: int = 3) -> tuple[nn.Sequential, int]:
    """ResNet-(6n+2) of He et al. (2016), section 4.2; n = ``blocks`` = 3 gives ResNet-20."""
    layers: list[nn.Module] = [nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16),
                               nn.ReLU(inplace=True)]
    cin = 16
    for stage, cout in enumerate((16, 32, 64)):
        for b in range(blocks):
            layers.append(BasicBlock(cin, cout, stride=2 if stage > 0 and b == 0 else 1))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    features = nn.Sequential(*layers)
    for m in features.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return features, 64
