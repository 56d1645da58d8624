"""Dense-head detectors: the anchor-point grid, box decoding and the training loss they share.

A *dense-head* detector predicts, at every point of one or more feature maps (strides ``s``), the
distances from that point to the four sides of a box and one logit per class (sigmoid, no background).
Its ``forward`` returns the *raw* output ``(N, A, 4 + C)``: boxes already decoded to ``x1, y1, x2, y2``
in input pixels, then the C class logits; A counts the points of every level, level by level, row-major.
Post-processing (scores, class-wise NMS, a fixed number of detections) is :mod:`deploycomp.tasks.det_post`,
shared by evaluation in torch and by the exported ONNX graph.

:class:`DenseDetector` is the small mixin a model (deploycomp's ``light_det``, a user's YOLO-style file)
inherits to get ``detection_loss``; it only needs ``self.strides`` and a ``forward`` that decodes with
:meth:`DenseDetector.decode`.

The loss (``dense_detection_loss``) is FCOS's assignment with center sampling and YOLOX/GFL-style terms:

- a point is a *candidate* for a ground-truth box when it lies inside the box and within ``radius``
  strides of its center (FCOS center sampling); a box with no candidate gets its nearest point, so
  that small objects always train; a point claimed by several boxes takes the smallest (FCOS);
- classification: quality focal loss (GFL, Li et al. 2020) whose target for a positive is the IoU of
  its predicted box with its ground truth (so scores rank by localisation quality, which mAP@[.5:.95]
  rewards), 0 elsewhere; summed and divided by the number of positives;
- boxes: GIoU loss on positives, weight ``box_weight`` (2.0).
"""

from __future__ import annotations

import math

RADIUS = 2.5  # center sampling radius, in strides (FCOS)
# Post-processing defaults (det_post and the detection task; here because this module imports nothing heavy)
MAX_DET, SCORE_THRESHOLD, IOU_THRESHOLD, PRE_NMS_TOP_K = 100, 0.05, 0.5, 1000
BOX_WEIGHT = 2.0
PRIOR_PROB = 0.01  # initial class probability (RetinaNet's prior)


def anchor_points(height: int, width: int, strides, device=None):
    """(A, 3) rows ``[cx, cy, stride]``: the centers of every cell of each level's grid, level by level,
    row-major; a level of stride ``s`` has ``ceil(H/s) x ceil(W/s)`` cells (stride-2 convolutions with
    padding 1 halve a size rounding up)."""
    import torch

    rows = []
    for s in strides:
        h, w = math.ceil(height / s), math.ceil(width / s)
        ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float32),
                                torch.arange(w, device=device, dtype=torch.float32), indexing="ij")
        rows.append(torch.stack([(xs.flatten() + 0.5) * s, (ys.flatten() + 0.5) * s,
                                 torch.full((h * w,), float(s), device=device)], 1))
    return torch.cat(rows)


def decode_ltrb(distances, points):
    """Boxes ``x1, y1, x2, y2`` from ``(N, A, 4)`` non-negative distances (left, top, right, bottom) in
    strides and the (A, 3) points."""
    import torch

    s = points[:, 2:3]
    d = distances * s
    return torch.cat([points[:, :2] - d[..., :2], points[:, :2] + d[..., 2:]], dim=-1)


def flatten_levels(maps):
    """``[(N, K, h, w), ...]`` -> ``(N, sum(h*w), K)``, level by level, row-major (the points' order)."""
    import torch

    return torch.cat([m.flatten(2) for m in maps], dim=2).transpose(1, 2)


def pair_iou(a, b, eps: float = 1e-7):
    """IoU of boxes ``a[i]`` and ``b[i]`` (same shapes, ``(..., 4)`` xyxy)."""
    lt = a[..., :2].maximum(b[..., :2])
    rb = a[..., 2:].minimum(b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[..., 2:] - a[..., :2]).clamp(min=0).prod(-1)
    area_b = (b[..., 2:] - b[..., :2]).clamp(min=0).prod(-1)
    return inter / (area_a + area_b - inter + eps)


def assign(points, targets, radius: float = RADIUS):
    """Match every point to at most one ground-truth box.

    ``points`` (A, 3), ``targets`` (N, M, 5) rows ``[label, x1, y1, x2, y2]`` (label -1: padding).
    Returns ``(positive (N, A) bool, box (N, A, 4), label (N, A) long)``.
    """
    import torch

    labels, boxes = targets[..., 0], targets[..., 1:]
    valid = labels >= 0  # (N, M)
    px, py, s = points[:, 0], points[:, 1], points[:, 2]  # (A,)
    x1, y1, x2, y2 = (boxes[..., i, None] for i in range(4))  # (N, M, 1)
    inside = (px > x1) & (px < x2) & (py > y1) & (py < y2)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    near = ((px - cx).abs() < radius * s) & ((py - cy).abs() < radius * s)
    cand = inside & near & valid[..., None]  # (N, M, A)
    # A box with no candidate (smaller than its grid cell, or between points) takes its nearest point.
    lonely = valid & ~cand.any(-1)
    if lonely.any():
        dist = ((px - cx) ** 2 + (py - cy) ** 2) / s ** 2  # (N, M, A)
        nearest = torch.nn.functional.one_hot(dist.argmin(-1), points.shape[0]).bool()
        cand = cand | (nearest & lonely[..., None])
    area = ((x2 - x1) * (y2 - y1)).expand_as(cand)
    area = torch.where(cand, area, torch.full_like(area, float("inf")))
    best_area, best = area.min(dim=1)  # (N, A): the smallest box claiming each point
    positive = torch.isfinite(best_area)
    box = torch.gather(boxes, 1, best[..., None].expand(-1, -1, 4))
    label = torch.gather(labels, 1, best).long()
    return positive, box, label


def dense_detection_loss(raw, points, targets, num_classes: int, radius: float = RADIUS,
                         box_weight: float = BOX_WEIGHT):
    """The training loss of a dense-head detector (see the module docstring); a scalar tensor."""
    import torch
    import torch.nn.functional as F
    from torchvision.ops import generalized_box_iou_loss

    raw = raw.float()
    pred_box, logits = raw[..., :4], raw[..., 4:]
    positive, gt_box, gt_label = assign(points, targets.float(), radius)
    n_pos = max(int(positive.sum()), 1)
    quality = torch.zeros_like(logits)
    if positive.any():
        pb, gb = pred_box[positive], gt_box[positive]
        iou = pair_iou(pb.detach(), gb).clamp(min=0.01)
        quality[positive] = F.one_hot(gt_label[positive], num_classes).to(quality.dtype) * iou[:, None]
        box_loss = generalized_box_iou_loss(pb, gb, reduction="sum") / n_pos
    else:  # an image set with no boxes: only the background term trains
        box_loss = pred_box.sum() * 0.0
    prob = logits.sigmoid()
    cls = F.binary_cross_entropy_with_logits(logits, quality, reduction="none") * (prob - quality).abs().pow(2)
    return cls.sum() / n_pos + box_weight * box_loss


class DenseDetector:
    """Mixin for an ``nn.Module`` dense-head detector: set ``self.strides`` and ``self.num_classes``;
    ``forward`` returns ``torch.cat([self.decode(x, distances), logits], -1)`` where ``distances``
    (N, A, 4) are non-negative (e.g. softplus of the box branch) in strides."""

    strides: tuple[int, ...] = (8, 16)
    num_classes: int = 1

    def points(self, x):
        return anchor_points(int(x.shape[-2]), int(x.shape[-1]), self.strides, x.device)

    def decode(self, x, distances):
        return decode_ltrb(distances, self.points(x))

    def detection_loss(self, images, targets, outputs=None):
        """The training loss on a batch: ``outputs`` the raw output of ``images`` if already computed."""
        raw = self(images) if outputs is None else outputs
        return dense_detection_loss(raw, self.points(images), targets, self.num_classes)


def init_head(cls_conv, box_conv=None, box_bias: float = 1.85) -> None:
    """RetinaNet's prior on the class logits (so the loss starts near the background rate) and a box
    branch starting at about two strides per side (``softplus(1.85) ~= 2``)."""
    import torch.nn as nn

    nn.init.normal_(cls_conv.weight, std=0.01)
    nn.init.constant_(cls_conv.bias, -math.log((1 - PRIOR_PROB) / PRIOR_PROB))
    if box_conv is not None:
        nn.init.normal_(box_conv.weight, std=0.01)
        nn.init.constant_(box_conv.bias, box_bias)


def distillation_loss(teacher, temperature: float, alpha: float, lam: float):
    """Knowledge distillation between two dense-head detectors with the same points and classes.

    Returns a loss *factory*: ``fit()`` calls it with the student (``needs_model``) to get the
    ``(outputs, inputs, targets) -> loss`` it trains with:
    ``alpha * (T^2 * soft-class + soft-box) + lam * student.detection_loss``, where soft-class is the
    binary cross-entropy of the student's class probabilities at temperature T against the teacher's
    (summed over classes, averaged over points: the sigmoid counterpart of the KL of classifiers), and
    soft-box the teacher-confidence-weighted GIoU loss of the student's boxes against the teacher's.
    """
    import torch
    import torch.nn.functional as F
    from torchvision.ops import generalized_box_iou_loss

    from deploycomp.distill import teacher_outputs
    from deploycomp.errors import UsageError

    def factory(student):
        def loss(outputs, inputs, targets):
            hard = student.detection_loss(inputs, targets, outputs) if lam else None
            if not alpha:
                return lam * hard
            t = teacher_outputs(teacher, inputs)
            if not isinstance(t, torch.Tensor) or t.shape != outputs.shape:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else "post-processed detections"
                raise UsageError(f"the teacher returns {got} where the student returns {tuple(outputs.shape)}: "
                                 "detection distillation needs two dense-head detectors with the same points "
                                 "(strides, input size) and classes")
            s_logits, t_logits = outputs[..., 4:].float(), t[..., 4:].float()
            soft_cls = F.binary_cross_entropy_with_logits(s_logits / temperature, (t_logits / temperature).sigmoid(),
                                                          reduction="sum") / s_logits[..., 0].numel()
            weight = t_logits.sigmoid().amax(-1).flatten()
            giou = generalized_box_iou_loss(outputs[..., :4].float().reshape(-1, 4), t[..., :4].float().reshape(-1, 4),
                                            reduction="none")
            soft_box = (weight * giou).sum() / weight.sum().clamp(min=1e-6)
            total = alpha * (temperature ** 2 * soft_cls + soft_box)
            return total + lam * hard if hard is not None else total

        return loss

    factory.needs_model = True
    return factory
