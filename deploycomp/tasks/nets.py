"""Networks of the dense tasks: the wrapper that makes torchvision's segmentation models return a tensor,
and the small UNet deploycomp ships as its segmentation baseline. Imported only when one is built."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from deploycomp.tasks.dense_det import DenseDetector, flatten_levels, init_head


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


# --------------------------------------------------------------------------------------------------
# Detection


def _cbr(cin: int, cout: int, stride: int = 1, k: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class _Residual(nn.Module):
    """Two 3x3 conv-BN-ReLU with an identity shortcut (the residual add ties the channels of both ends)."""

    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(_cbr(c, c), nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return F.relu(x + self.body(x))


class LightDet(DenseDetector, nn.Module):
    """deploycomp's shipped detector: a single-stage, anchor-free, dense-head detector for small images.

    Backbone: a stride-2 stem and three stride-2 stages (widths ``widths``) with a residual block each;
    neck: the stride-16 features upsampled and added to the stride-8 ones (an FPN of two levels, width
    ``neck``); head: decoupled class and box branches (a 3x3 conv-BN-ReLU each, shared by both levels),
    then a 1x1 conv to the classes and one to four distances (softplus, in strides). ReLU throughout:
    what INT8 and every runtime fuse. Output: the raw ``(N, A, 4 + C)`` of
    :mod:`deploycomp.tasks.dense_det` (A = 80 points at 64 px).
    """

    def __init__(self, num_classes: int, in_channels: int, widths: tuple[int, ...] = (16, 32, 64, 96),
                 neck: int = 48):
        super().__init__()
        self.num_classes, self.strides = num_classes, (8, 16)
        w0, w1, w2, w3 = widths
        self.stem = _cbr(in_channels, w0, stride=2)
        self.stage1 = nn.Sequential(_cbr(w0, w1, stride=2), _Residual(w1))  # stride 4
        self.stage2 = nn.Sequential(_cbr(w1, w2, stride=2), _Residual(w2))  # stride 8
        self.stage3 = nn.Sequential(_cbr(w2, w3, stride=2), _Residual(w3))  # stride 16
        self.lateral8, self.lateral16 = _cbr(w2, neck, k=1), _cbr(w3, neck, k=1)
        self.smooth8 = _cbr(neck, neck)
        self.cls_tower, self.box_tower = _cbr(neck, neck), _cbr(neck, neck)
        self.cls_pred, self.box_pred = nn.Conv2d(neck, num_classes, 1), nn.Conv2d(neck, 4, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        init_head(self.cls_pred, self.box_pred)

    def forward(self, x):
        c8 = self.stage2(self.stage1(self.stem(x)))
        c16 = self.stage3(c8)
        p16 = self.lateral16(c16)
        p8 = self.smooth8(self.lateral8(c8) + F.interpolate(p16, size=c8.shape[-2:], mode="nearest"))
        levels = (p8, p16)
        logits = flatten_levels([self.cls_pred(self.cls_tower(p)) for p in levels])
        distances = flatten_levels([F.softplus(self.box_pred(self.box_tower(p))) for p in levels])
        return torch.cat([self.decode(x, distances), logits], dim=-1)
