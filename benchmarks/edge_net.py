"""A small edge-style CNN for benchmarks/int8_accuracy.py (user code: ``--model benchmarks/edge_net.py:build``).

MobileNetV3's ingredients at Fashion-MNIST size: depthwise-separable blocks, hard-swish, squeeze-excite
(hard-sigmoid gate); BatchNorm with PyTorch's default momentum, so that it trains in a few CPU minutes.
"""

import torch.nn as nn


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, r: int = 4):
        super().__init__()
        self.fc = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, c // r, 1), nn.ReLU(),
                                nn.Conv2d(c // r, c, 1), nn.Hardsigmoid())

    def forward(self, x):
        return x * self.fc(x)


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin), nn.Hardswish(),
        SqueezeExcite(cin),
        nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.Hardswish())


def build(num_classes: int = 10, in_channels: int = 1, width: int = 16) -> nn.Module:
    w = width
    return nn.Sequential(
        nn.Conv2d(in_channels, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.Hardswish(),
        _block(w, 2 * w, 2), _block(2 * w, 4 * w, 2), _block(4 * w, 4 * w, 1), _block(4 * w, 6 * w, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6 * w, num_classes))


build.input_size = (1, 28, 28)
