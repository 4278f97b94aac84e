"""The paper's CIFAR architectures, built from plain conv-BN (ACB comes from convert()).

Every builder takes ``in_channels`` and ``num_classes`` so the same nets run on Fashion-MNIST
(1×28×28) and CIFAR (3×32×32); pooling uses ceil_mode / global pooling so any size ≥ 8 works.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = [
    "cifar_quick",
    "densenet40",
    "resnet20",
    "resnet56",
    "resnet110",
    "vgg16",
    "vgg16_quarter",
    "wrn16_8",
]


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, relu: bool = True) -> nn.Sequential:
    """conv (no bias) → BN (→ ReLU): the unit convert() turns into an ACBlock."""
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, bias=False),
                               nn.BatchNorm2d(cout)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def _init(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return model


def cifar_quick(*, in_channels: int = 3, num_classes: int = 10) -> nn.Module:
    """Cifar-quick with BN (the official ACNet PyTorch repo's 'cfqkbnc'): three 5×5 convs."""
    return _init(nn.Sequential(
        conv_bn(in_channels, 32, 5), nn.MaxPool2d(3, 2, ceil_mode=True),
        conv_bn(32, 32, 5), nn.AvgPool2d(3, 2, ceil_mode=True),
        conv_bn(32, 64, 5), nn.AvgPool2d(3, 2, ceil_mode=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 64), nn.ReLU(inplace=True),
        nn.Linear(64, num_classes),
    ))


_VGG16: list[int | str] = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
                           512, 512, 512, "M"]


def _vgg(width: float, in_channels: int, num_classes: int) -> nn.Module:
    """VGG-16 with every width scaled by ``width``: BN after every conv, an FC-FC classifier."""
    layers: list[nn.Module] = []
    c = in_channels
    for v in _VGG16:
        if isinstance(v, str):  # "M"
            layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
        else:
            layers.append(conv_bn(c, int(v * width)))
            c = int(v * width)
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, c), nn.ReLU(inplace=True),
               nn.Linear(c, num_classes)]
    return _init(nn.Sequential(*layers))


def vgg16(*, in_channels: int = 3, num_classes: int = 10) -> nn.Module:
    """VGG-16 for CIFAR with BN after every conv, a 512-512 classifier."""
    return _vgg(1.0, in_channels, num_classes)


def vgg16_quarter(*, in_channels: int = 3, num_classes: int = 10) -> nn.Module:
    """VGG-16 at a quarter of the width (16-32-64-128-128 channels, a 128-128 classifier): the
    same 13 convs, 1/16 of the compute, for CPU studies."""
    return _vgg(0.25, in_channels, num_classes)


class BasicBlock(nn.Module):
    """ResNet basic block, post-activation, conv-BN projection shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.conv1 = conv_bn(cin, cout, 3, stride)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = conv_bn(cout, cout, 3, 1, relu=False)
        self.shortcut = (conv_bn(cin, cout, 1, stride, relu=False)
                         if stride != 1 or cin != cout else nn.Identity())
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv2(self.drop(self.conv1(x))) + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) of He et al. for CIFAR (16-32-64), or a wide variant (WRN-d-k)."""

    def __init__(self, blocks: int, widths: tuple[int, int, int], *, in_channels: int = 3,
                 num_classes: int = 10, stem: int = 16, dropout: float = 0.0) -> None:
        super().__init__()
        self.stem = conv_bn(in_channels, stem)
        stages, c = [], stem
        for i, w in enumerate(widths):
            layers = []
            for j in range(blocks):
                layers.append(BasicBlock(c, w, 2 if (i > 0 and j == 0) else 1, dropout))
                c = w
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)
        _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.stages(self.stem(x))), 1))


def resnet20(*, in_channels: int = 3, num_classes: int = 10) -> nn.Module:
    return CifarResNet(3, (16, 32, 64), in_channels=in_channels, num_classes=num_classes)


def resnet56(*, in_channels: int = 3, num_classes: int = 10) -> nn.Module:
    return CifarResNet(9, (16, 32, 64), in_channels=in_channels, num_classes=num_classes)


def resnet110(*, in_channels: int = 3, num_classes: int = 10) -> nn.Module:
    return CifarResNet(18, (16, 32, 64), in_channels=in_channels, num_classes=num_classes)


def wrn16_8(*, in_channels: int = 3, num_classes: int = 10) -> nn.Module:
    """WRN-16-8 (2 blocks per stage, widths 128-256-512), conv-BN ordering, dropout 0.3."""
    return CifarResNet(2, (128, 256, 512), in_channels=in_channels, num_classes=num_classes,
                       dropout=0.3)


class _DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.conv = conv_bn(cin, growth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.conv(x)], 1)


class DenseNet40(nn.Module):
    """DenseNet-40 (k=12, three blocks of 12 layers), each layer conv3×3-BN-ReLU."""

    def __init__(self, *, in_channels: int = 3, num_classes: int = 10, growth: int = 12,
                 layers: int = 12) -> None:
        super().__init__()
        c = 2 * growth
        body: list[nn.Module] = [conv_bn(in_channels, c)]
        for b in range(3):
            for _ in range(layers):
                body.append(_DenseLayer(c, growth))
                c += growth
            if b < 2:
                body += [conv_bn(c, c, 1), nn.AvgPool2d(2, ceil_mode=True)]
        self.features = nn.Sequential(*body)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)
        _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def densenet40(*, in_channels: int = 3, num_classes: int = 10) -> nn.Module:
    return DenseNet40(in_channels=in_channels, num_classes=num_classes)
