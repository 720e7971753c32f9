"""A small ResNet for Fashion-MNIST (28x28 grey images, 10 classes), trained here by ``lwfc train``.

Three residual stages of 24/48/96 channels (one basic block each, to keep training cheap on 2 cores),
ReLU activations, global average pooling and a linear classifier. Stages 2 and 3 halve the resolution: 28 -> 14 -> 7.
"""

from __future__ import annotations

import torch
from torch import nn

CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]

# Mean and standard deviation of the Fashion-MNIST training pixels (on a 0..1 scale).
MEAN = 0.2860
STD = 0.3530


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and a residual connection; ReLU after the sum."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNetFMNIST(nn.Module):
    """ResNet with a 3x3 stem and three stages; input N x 1 x 28 x 28 (normalized), output 10 logits."""

    def __init__(self, widths: tuple[int, int, int] = (24, 48, 96), blocks: int = 1, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        stages = []
        cin = widths[0]
        for i, w in enumerate(widths):
            layers = [BasicBlock(cin, w, stride=1 if i == 0 else 2)]
            layers += [BasicBlock(w, w) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*layers))
            cin = w
        self.stage1, self.stage2, self.stage3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.stage1(x)
        x = self.stage2(x)
        x = self.stage3(x)
        return self.fc(self.flatten(self.pool(x)))
