"""Detection metrics: COCO mAP@[.5:.95], mAP@.5 and mAP@.75 with pycocotools.

pycocotools is the reference implementation: the numbers detection papers report and the ones
torchvision's detection references (``references/detection/coco_eval.py``) compute. faster-coco-eval
gives the same numbers faster, but deploycomp's test sets are small enough that the reference is not
the slow part. The ground truth and the results are built in memory (no JSON files) and its printing
(it prints to stdout) is silenced.

Conventions, all pycocotools' own:

- boxes are matched at IoU >= each threshold of .50:.05:.95, at most 100 detections per image and
  class (COCO's ``maxDets``), area range "all", 101-point interpolated precision;
- a ground-truth box's area is its box area (there are no segmentations), and no box is a crowd;
- a class with no ground-truth box anywhere in the evaluated set has no AP and is left out of the mean
  (its detections do not count against it); an image with no ground truth still counts: its
  detections are false positives for their classes;
- pycocotools answers -1 when no class has any ground truth at all (mAP undefined); this module
  reports 0 then, so that a metric stays a number (``samples`` still says how many images were seen);
- percentages are rounded to 1e-9 points: pycocotools divides by ``tp + fp + machine epsilon``, so
  perfect detections would otherwise read 99.99999999999999.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any


class MeanAP:
    """A :class:`deploycomp.tasks.Meter`: ``update(detections, targets)`` per batch, then ``result()``.

    ``detections`` (N, K, 6) rows ``[x1, y1, x2, y2, score, label]`` (label -1: padding), ``targets``
    (N, M, 5) rows ``[label, x1, y1, x2, y2]`` (label -1: padding); tensors (any device) or numpy arrays.
    Each batch is turned into COCO records at once, so batches may differ in K and M.
    """

    def __init__(self, num_classes: int):
        self.num_classes = int(num_classes)
        self.images: list[dict] = []
        self.gts: list[dict] = []
        self.dts: list[dict] = []

    def update(self, detections, targets) -> None:
        dets, tgts = _numpy(detections), _numpy(targets)
        _check_shapes(dets, tgts)
        for det, tgt in zip(dets, tgts, strict=True):
            image = len(self.images) + 1  # COCO ids start at 1: pycocotools reads 0 as "unmatched"
            self.images.append({"id": image})
            self.gts += _ground_truth(tgt, image, len(self.gts) + 1, self.num_classes)
            self.dts += _results(det, image, len(self.dts) + 1, self.num_classes)

    def result(self) -> dict[str, Any]:
        stats = _evaluate(self.images, self.gts, self.dts, self.num_classes)
        keys = ("map_pct", "map50_pct", "map75_pct")
        return {**{k: round(100.0 * max(s, 0.0), 9) for k, s in zip(keys, stats, strict=True)},
                "samples": len(self.images)}


def coco_map(detections, targets, num_classes: int) -> dict[str, Any]:
    """``map_pct``, ``map50_pct``, ``map75_pct`` (percent) and ``samples`` of dense detections (N, K, 6)
    against dense targets (N, M, 5) (see :class:`MeanAP`)."""
    meter = MeanAP(num_classes)
    meter.update(detections, targets)
    return meter.result()


def _numpy(x):
    import numpy as np

    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _check_shapes(dets, tgts) -> None:
    from deploycomp.errors import check

    check(dets.ndim == 3 and dets.shape[-1] == 6, f"detections are (images, K, 6) rows [x1, y1, x2, y2, score, "
                                                  f"label], not {dets.shape}")
    check(tgts.ndim == 3 and tgts.shape[-1] == 5, f"detection targets are (images, M, 5) rows [label, x1, y1, x2, "
                                                  f"y2], not {tgts.shape}")
    check(len(dets) == len(tgts), f"{len(dets)} images of detections for {len(tgts)} of targets")


def _labels(labels, num_classes: int, what: str):
    """Integer labels of the non-padding rows (label >= 0); a label out of range is a one-line error."""
    from deploycomp.errors import DeploycompError

    labels = labels.round().astype(int)
    if len(labels) and labels.max() >= num_classes:
        raise DeploycompError(f"{what} holds class {labels.max()} but there are {num_classes} classes "
                              f"(0..{num_classes - 1})")
    return labels


def _xywh(boxes) -> list[list[float]]:
    return [[x1, y1, x2 - x1, y2 - y1] for x1, y1, x2, y2 in boxes.tolist()]


def _ground_truth(tgt, image: int, first_id: int, num_classes: int) -> list[dict]:
    rows = tgt[tgt[:, 0] >= 0]
    labels = _labels(rows[:, 0], num_classes, "a detection target")
    return [{"id": first_id + i, "image_id": image, "category_id": int(c) + 1, "bbox": b, "area": b[2] * b[3],
             "iscrowd": 0} for i, (c, b) in enumerate(zip(labels, _xywh(rows[:, 1:5]), strict=True))]


def _results(det, image: int, first_id: int, num_classes: int) -> list[dict]:
    rows = det[det[:, 5] >= 0]
    labels = _labels(rows[:, 5], num_classes, "a detection")
    return [{"id": first_id + i, "image_id": image, "category_id": int(c) + 1, "bbox": b, "area": b[2] * b[3],
             "score": float(s), "iscrowd": 0}
            for i, (c, b, s) in enumerate(zip(labels, _xywh(rows[:, :4]), rows[:, 4], strict=True))]


def _evaluate(images: list[dict], gts: list[dict], dts: list[dict], num_classes: int) -> list[float]:
    """pycocotools' first three bbox stats (mAP@[.5:.95], @.5, @.75; -1 where undefined)."""
    from deploycomp.errors import MissingDependencyError

    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as e:
        raise MissingDependencyError("COCO mAP needs pycocotools: pip install pycocotools") from e

    if not gts:
        return [-1.0, -1.0, -1.0]
    categories = [{"id": c + 1} for c in range(num_classes)]
    with contextlib.redirect_stdout(io.StringIO()):
        gt, dt = COCO(), COCO()
        gt.dataset = {"images": images, "annotations": gts, "categories": categories}
        dt.dataset = {"images": images, "annotations": dts, "categories": categories}
        gt.createIndex()
        dt.createIndex()
        ev = COCOeval(gt, dt, iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [float(s) for s in ev.stats[:3]]
