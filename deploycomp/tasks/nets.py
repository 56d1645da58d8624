"""Networks of the dense tasks: the wrapper that makes torchvision's segmentation models return a tensor,
and the small UNet deploycomp ships as its segmentation baseline. Imported only when one is built."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class DenseOutput(nn.Module):
    """A torchvision segmentation model returning its ``out`` logits (N, classes, H, W) instead of a dict:
    what pruning, export and every runtime take. The auxiliary head is not built (``aux_loss=False``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)["out"]


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class _Stage(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(_conv_bn_relu(cin, cout), _conv_bn_relu(cout, cout))


class LightUNet(nn.Module):
    """A UNet for small images, at half resolution inside: a stride-2 stem, an encoder of ``len(widths)``
    stages (two 3x3 conv-BN-ReLU each, 2x2 max-pool between them), a decoder that upsamples bilinearly
    and concatenates the encoder's features at each scale, a 1x1 convolution to the classes, and a
    bilinear upsampling of the logits to the input's size. The input sides must be divisible by
    ``2 ** len(widths)``."""

    def __init__(self, num_classes: int, in_channels: int, widths: tuple[int, ...] = (16, 32, 64)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        self.down = nn.ModuleList()
        cin = widths[0]
        for w in widths:
            self.down.append(_Stage(cin, w))
            cin = w
        self.up = nn.ModuleList(_Stage(widths[i + 1] + widths[i], widths[i]) for i in reversed(range(len(widths) - 1)))
        self.head = nn.Conv2d(widths[0], num_classes, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        size = x.shape[-2:]
        x = self.stem(x)
        skips = []
        for i, stage in enumerate(self.down):
            x = stage(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        for stage, skip in zip(self.up, reversed(skips[:-1]), strict=True):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = stage(torch.cat([x, skip], dim=1))
        return F.interpolate(self.head(x), size=size, mode="bilinear", align_corners=False)
