"""Segmentation metrics from a confusion matrix: mIoU, pixel accuracy, IoU per class.

Small code on ``torch.bincount`` rather than a dependency: the whole computation is ten lines, it runs on
the device the logits are on, it accumulates over batches exactly (integer counts, no averaging of
per-batch means), and its convention is stated here and tested. The convention is VOC's and
torchmetrics' ``JaccardIndex(average="macro")`` with absent classes left out: IoU of class c is
TP / (TP + FP + FN) over every scored pixel of the evaluation set; a class with no pixel in the targets
*and* none predicted (union 0) has no IoU and is left out of the mean; pixels whose target is
``ignore_index`` are not scored at all.
"""

from __future__ import annotations

from typing import Any


def confusion_matrix(pred, target, num_classes: int, ignore_index: int | None = None):
    """``(num_classes, num_classes)`` int64 counts, rows = target class, columns = predicted class.

    ``pred`` and ``target`` are integer tensors of the same shape (any shape). Target values outside
    ``[0, num_classes)`` other than ``ignore_index`` are an error (a mask with more classes than declared).
    """
    import torch

    from deploycomp.errors import DeploycompError

    target, pred = target.reshape(-1).long(), pred.reshape(-1).long()
    if ignore_index is not None:
        keep = target != ignore_index
        target, pred = target[keep], pred[keep]
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= num_classes):
        ignored = f", {ignore_index} ignored" if ignore_index is not None else ""
        raise DeploycompError(f"a target mask holds class {int(target.max())} but there are {num_classes} classes "
                              f"(0..{num_classes - 1}{ignored})")
    counts = torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).cpu()


def scores(conf) -> dict[str, Any]:
    """``miou_pct``, ``pixel_acc_pct`` and ``iou_per_class`` (percent; None for a class with union 0)."""
    conf = conf.double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    iou = [float(100.0 * t / u) if u > 0 else None for t, u in zip(tp.tolist(), union.tolist(), strict=True)]
    present = [v for v in iou if v is not None]
    total = float(conf.sum())
    return {"miou_pct": sum(present) / len(present) if present else float("nan"),
            "pixel_acc_pct": 100.0 * float(tp.sum()) / total if total else float("nan"),
            "iou_per_class": iou}
