"""A CIFAR-style ResNet-18 (He et al., 2016; the variant of the SSD and Fisher-forgetting code).

3x3 stem convolution with stride 1 and no max-pool (for small images), four stages of two
BasicBlocks with ``width``, 2, 4 and 8 times ``width`` channels (strides 1, 2, 2, 2), global
average pooling and one linear layer. ``width=64`` is the standard ResNet-18 (11.2M parameters);
the experiments on 2 CPU cores use a reduced width (16: 0.7M parameters). Any input of shape
[C, H, W] with H, W >= 1 works (8x8 digits, 28x28 Fashion-MNIST).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR-style ResNet-18 for inputs of ``input_shape`` = (C, H, W); ``width`` = 64 is full."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, width: int = 16,
                 blocks: Sequence[int] = (2, 2, 2, 2)):
        super().__init__()
        channels = int(input_shape[0])
        self.conv1 = nn.Conv2d(channels, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers, in_planes = [], width
        for stage, (count, stride) in enumerate(zip(blocks, (1, 2, 2, 2))):
            planes = width * 2**stage
            stage_blocks = []
            for s in [stride] + [1] * (count - 1):
                stage_blocks.append(BasicBlock(in_planes, planes, s))
                in_planes = planes
            layers.append(nn.Sequential(*stage_blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(torch.flatten(self.pool(out), 1))


def resnet18(input_shape: Sequence[int], num_classes: int, width: int = 16) -> ResNet18:
    """``ResNet18(input_shape, num_classes, width)``; width 16 is the reduced default here."""
    return ResNet18(input_shape, num_classes, width=width)
