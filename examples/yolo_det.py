"""A YOLO-style single-stage detector written as user code, for deploycomp (docs/detection.md).

The model is plain PyTorch: a CSP-style backbone (cross-stage partial blocks: half of the channels go
through residual bottlenecks, half bypass them, both concatenated), a PAN neck (top-down then
bottom-up fusion of the stride-8 and stride-16 features) and a decoupled head per level (separate
class and box branches). SiLU activations, as in YOLOv5/v8.

What deploycomp asks of a detector (the dense-head contract, deploycomp.tasks.dense_det):
- ``forward(x)`` returns ``(N, A, 4 + C)``: boxes ``x1, y1, x2, y2`` in input pixels, then C class
  logits (sigmoid, no background), the points of every level level by level, row-major;
- ``detection_loss(images, targets, outputs=None)`` returns the training loss; inheriting
  ``DenseDetector`` (set ``strides`` and ``num_classes``, decode with ``self.decode``) provides it.

Use it:

    deploycomp train --model examples/yolo_det.py:yolo_det --data fashion-scenes-det --epochs 10 -o yolo.pt
    deploycomp prune --model yolo.pt --arch examples/yolo_det.py:yolo_det --method taylor --ratio 0.3 -o yolo-p.pt
    deploycomp export --model yolo-p.pt --arch examples/yolo_det.py:yolo_det -o yolo-p.onnx
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from deploycomp.tasks.dense_det import DenseDetector, flatten_levels, init_head


def conv(cin, cout, k=3, s=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, s, k // 2, bias=False), nn.BatchNorm2d(cout), nn.SiLU(inplace=True))


class Bottleneck(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.cv1, self.cv2 = conv(c, c, 1), conv(c, c, 3)

    def forward(self, x):
        return x + self.cv2(self.cv1(x))


class CSP(nn.Module):
    """Cross-stage partial block: two 1x1 branches, one through ``n`` bottlenecks, concatenated, fused."""

    def __init__(self, cin, cout, n=1):
        super().__init__()
        hidden = cout // 2
        self.main, self.bypass = conv(cin, hidden, 1), conv(cin, hidden, 1)
        self.blocks = nn.Sequential(*(Bottleneck(hidden) for _ in range(n)))
        self.fuse = conv(2 * hidden, cout, 1)

    def forward(self, x):
        return self.fuse(torch.cat([self.blocks(self.main(x)), self.bypass(x)], 1))


class Head(nn.Module):
    """Decoupled head of one level: class logits and four box distances (softplus, in strides)."""

    def __init__(self, c, num_classes):
        super().__init__()
        self.cls, self.box = conv(c, c), conv(c, c)
        self.cls_pred, self.box_pred = nn.Conv2d(c, num_classes, 1), nn.Conv2d(c, 4, 1)
        init_head(self.cls_pred, self.box_pred)

    def forward(self, x):
        return self.cls_pred(self.cls(x)), F.softplus(self.box_pred(self.box(x)))


class YoloDet(DenseDetector, nn.Module):
    def __init__(self, num_classes=10, in_channels=1, widths=(16, 32, 64, 96)):
        super().__init__()
        self.num_classes, self.strides = num_classes, (8, 16)
        w0, w1, w2, w3 = widths
        self.stem = conv(in_channels, w0, 3, 2)
        self.dark2 = nn.Sequential(conv(w0, w1, 3, 2), CSP(w1, w1))  # stride 4
        self.dark3 = nn.Sequential(conv(w1, w2, 3, 2), CSP(w2, w2))  # stride 8
        self.dark4 = nn.Sequential(conv(w2, w3, 3, 2), CSP(w3, w3))  # stride 16
        self.reduce = conv(w3, w2, 1)
        self.td8 = CSP(2 * w2, w2)  # top-down: stride-16 features upsampled into stride 8
        self.down = conv(w2, w2, 3, 2)
        self.bu16 = CSP(2 * w2, w3)  # bottom-up: stride-8 features downsampled into stride 16
        self.head8, self.head16 = Head(w2, num_classes), Head(w3, num_classes)

    def forward(self, x):
        c8 = self.dark3(self.dark2(self.stem(x)))
        c16 = self.dark4(c8)
        r16 = self.reduce(c16)
        p8 = self.td8(torch.cat([F.interpolate(r16, size=c8.shape[-2:], mode="nearest"), c8], 1))
        p16 = self.bu16(torch.cat([self.down(p8), r16], 1))
        (cls8, box8), (cls16, box16) = self.head8(p8), self.head16(p16)
        logits, distances = flatten_levels([cls8, cls16]), flatten_levels([box8, box16])
        return torch.cat([self.decode(x, distances), logits], -1)


def yolo_det(num_classes=10, in_channels=1):
    return YoloDet(num_classes, in_channels)


yolo_det.task = "detection"
