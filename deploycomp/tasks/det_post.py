"""Post-processing of a dense-head detector, the same in eager torch and in its exported ONNX graph.

From the raw output ``(N, A, 4 + C)`` (boxes xyxy in input pixels, then C class logits) to a fixed
number K of detections per image: ``(num_detections (N,), boxes (N, K, 4), scores (N, K), labels (N, K))``,
sorted by score, padded with score 0, label -1 and box 0. ``K = min(max_det, C * A)``.

The steps, each an operator ONNX Runtime and TensorRT 10 both run:

1. scores = sigmoid(logits), one per (box, class) pair (no background class);
2. pre-NMS top-k *per image over all (box, class) pairs*: scores below the ``pre_nms_top_k``-th largest
   of the image are set to 0 (ties at the k-th are kept). Per image rather than per class because
   that is what TensorRT's NMS layer limits: it considers at most its "TopK box limit" candidates per
   image (default 5000, across classes; the ONNX parser leaves the default), so with
   ``pre_nms_top_k <= 5000`` TensorRT sees the same candidates as ONNX Runtime and eager torch (its
   TopK layer also bounds k: 3840 per its operator docs, not checked here);
3. class-wise NMS (ONNX ``NonMaxSuppression``): boxes of one class suppress each other, boxes of
   different classes never do, so one box may be kept for two classes (as COCO evaluation expects:
   it scores each class separately). ``max_output_boxes_per_class = K``: no class can contribute more
   than K to the final top-K, so this cap loses nothing and only bounds the work;
4. fixed size: the kept scores are scattered into a zero ``(N, C * A)`` tensor, ``topk(K)`` of it gives
   the detections (label = index // A, box = index % A); entries with score 0 are padding. This does not
   depend on the order NMS lists its selections in (TensorRT's order differs from ONNX Runtime's).

ONNX ``NonMaxSuppression`` semantics (opset 11+, checked against ONNX Runtime's CPU kernel and its
tests here): a box is a candidate when its score is *strictly greater* than ``score_threshold``; a
candidate is suppressed when its IoU with a box already selected for the class is *strictly greater*
than ``iou_threshold`` (IoU equal to the threshold is kept, as in ``torchvision.ops.nms``); the output
``(S, 3)`` rows ``[batch, class, box]`` come batch by batch, class by class, by descending score within a
class; ``center_point_box = 0`` means two opposite corners (the spec writes ``[y1, x1, y2, x2]``; IoU is
symmetric in x and y, so xyxy gives the same selection). Which of two boxes with *equal* scores is
taken first is unspecified in ONNX Runtime, TensorRT and torchvision alike. Boxes are expected with
``x1 <= x2`` and ``y1 <= y2`` (ONNX Runtime would reorder the corners of a flipped box, torchvision
does not).

:class:`DetectionExport` wraps a detector for export; the graph exports with the TorchScript exporter
(``torch.onnx.export(..., dynamo=False, opset_version >= 11)``) through the ``symbolic`` of
:class:`NonMaxSuppression`; the batch axis may be dynamic.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torchvision.ops import box_iou, nms  # here, not in nms_indices: torchvision cannot load inside a trace

from deploycomp.errors import check
from deploycomp.tasks.dense_det import IOU_THRESHOLD, MAX_DET, PRE_NMS_TOP_K, SCORE_THRESHOLD

OUTPUT_NAMES = ("num_detections", "boxes", "scores", "labels")
RAW_OUTPUT_NAMES = ("raw",)


def _f32(x: float) -> float:
    """``x`` rounded to float32, as the ONNX graph stores it: eager comparisons then match exactly."""
    return float(torch.tensor(float(x), dtype=torch.float32))


def nms_indices(boxes, scores, max_output_boxes_per_class: int, iou_threshold: float, score_threshold: float):
    """ONNX ``NonMaxSuppression`` in eager torch: ``(S, 3)`` int64 rows ``[batch, class, box]``.

    ``boxes`` (N, A, 4) xyxy, ``scores`` (N, C, A). One ``torchvision.ops.nms`` per image and class that
    has candidates (not the coordinate-offset trick of ``batched_nms``, whose large offsets round the
    float32 coordinates and could change an IoU at the threshold).
    """
    iou, thr = _f32(iou_threshold), _f32(score_threshold)
    n, c, a = scores.shape
    empty = torch.zeros((0, 3), dtype=torch.int64, device=scores.device)
    if max_output_boxes_per_class <= 0:
        return empty
    if boxes.dtype != torch.float32 or scores.dtype != torch.float32:  # not always: a trace would record it
        boxes, scores = boxes.float(), scores.float()
    cand = (scores > thr).nonzero()  # rows [b, c, a], sorted: batch, then class, then box
    if not len(cand):
        return empty
    group = cand[:, 0] * c + cand[:, 1]
    _, counts = torch.unique_consecutive(group, return_counts=True)
    kept = []
    for rows in cand.split(counts.tolist()):
        b, k, idx = int(rows[0, 0]), int(rows[0, 1]), rows[:, 2]
        keep = nms(boxes[b, idx], scores[b, k, idx], iou)[:max_output_boxes_per_class]
        kept.append(rows[keep])
    return torch.cat(kept)


class NonMaxSuppression(torch.autograd.Function):
    """ONNX ``NonMaxSuppression``: :func:`nms_indices` when run, the ONNX operator when exported."""

    @staticmethod
    def forward(ctx, boxes, scores, max_output_boxes_per_class: int, iou_threshold: float,
                score_threshold: float):
        out = nms_indices(boxes, scores, max_output_boxes_per_class, iou_threshold, score_threshold)
        ctx.mark_non_differentiable(out)
        return out

    @staticmethod
    def symbolic(g, boxes, scores, max_output_boxes_per_class, iou_threshold, score_threshold):
        def const(value, dtype):
            return g.op("Constant", value_t=torch.tensor([value], dtype=dtype))

        return g.op("NonMaxSuppression", boxes, scores, const(int(max_output_boxes_per_class), torch.int64),
                    const(float(iou_threshold), torch.float32), const(float(score_threshold), torch.float32),
                    center_point_box_i=0)


def _check_options(max_det: int, score_threshold: float, iou_threshold: float, pre_nms_top_k: int) -> None:
    check(int(max_det) >= 1, f"max detections must be at least 1, not {max_det}")
    check(0.0 <= iou_threshold <= 1.0, f"the NMS IoU threshold must lie in [0, 1], not {iou_threshold}")
    check(0.0 <= score_threshold < 1.0, f"the score threshold must lie in [0, 1), not {score_threshold}")
    check(int(pre_nms_top_k) >= 1, f"the pre-NMS top-k must be at least 1, not {pre_nms_top_k}")


def postprocess(raw, max_det: int = MAX_DET, score_threshold: float = SCORE_THRESHOLD,
                iou_threshold: float = IOU_THRESHOLD, pre_nms_top_k: int = PRE_NMS_TOP_K):
    """``(num_detections, boxes, scores, labels)`` of the raw output ``(N, A, 4 + C)`` (module docstring).

    Shapes ``(N,)`` int64, ``(N, K, 4)``, ``(N, K)``, ``(N, K)`` int64 with ``K = min(max_det, C * A)``.
    """
    _check_options(max_det, score_threshold, iou_threshold, pre_nms_top_k)
    check(raw.ndim == 3 and raw.shape[-1] > 4, f"a dense-head detector returns (batch, points, 4 + classes), "
                                               f"not {tuple(raw.shape)}")
    raw = raw.float()
    a, c = int(raw.shape[1]), int(raw.shape[2]) - 4
    boxes = raw[..., :4]
    scores = raw[..., 4:].sigmoid().transpose(1, 2)  # (N, C, A), as NonMaxSuppression takes them
    flat = scores.flatten(1)  # (N, C * A): index = class * A + box
    if pre_nms_top_k < c * a:
        kth = flat.topk(int(pre_nms_top_k), dim=1).values[:, -1:]
        flat = torch.where(flat >= kth, flat, torch.zeros_like(flat))
        scores = flat.view_as(scores)
    k = min(int(max_det), c * a)
    selected = NonMaxSuppression.apply(boxes, scores, k, iou_threshold, score_threshold)
    index = (selected[:, 0] * c + selected[:, 1]) * a + selected[:, 2]  # into scores.reshape(-1)
    every = scores.reshape(-1)
    kept = torch.zeros_like(every).scatter(0, index, every.gather(0, index)).view_as(flat)
    top, at = kept.topk(k, dim=1)
    valid = top > 0
    labels = torch.where(valid, at // a, torch.full_like(at, -1))
    picked = boxes.gather(1, (at % a).unsqueeze(-1).expand(-1, -1, 4))
    out_boxes = torch.where(valid.unsqueeze(-1), picked, torch.zeros_like(picked))
    return valid.long().sum(1), out_boxes, top, labels


class DetectionExport(nn.Module):
    """A dense-head detector (``forward`` -> raw ``(N, A, 4 + C)``) followed by :func:`postprocess`: its
    forward returns the four outputs named :data:`OUTPUT_NAMES`."""

    def __init__(self, model: nn.Module, max_det: int = MAX_DET, score_threshold: float = SCORE_THRESHOLD,
                 iou_threshold: float = IOU_THRESHOLD, pre_nms_top_k: int = PRE_NMS_TOP_K):
        super().__init__()
        _check_options(max_det, score_threshold, iou_threshold, pre_nms_top_k)
        self.model = model
        self.max_det, self.score_threshold = int(max_det), float(score_threshold)
        self.iou_threshold, self.pre_nms_top_k = float(iou_threshold), int(pre_nms_top_k)

    def forward(self, x):
        return postprocess(self.model(x), self.max_det, self.score_threshold, self.iou_threshold, self.pre_nms_top_k)

    def options(self) -> dict[str, Any]:
        """The post-processing options, for an export's sidecar."""
        return {"max_det": self.max_det, "score_threshold": self.score_threshold,
                "iou_threshold": self.iou_threshold, "pre_nms_top_k": self.pre_nms_top_k}


# --------------------------------------------------------------------------------------------------
# Dense detections and parity


def as_dense(num_detections, boxes, scores, labels):
    """Detections ``(N, K, 6)`` float32 rows ``[x1, y1, x2, y2, score, label]`` from the four outputs.

    Rows at or past ``num_detections`` of their image become padding (zeros, label -1) whatever they
    held. Accepts tensors or numpy arrays; returns a tensor on the device of ``boxes``.
    """
    num, boxes, scores, labels = (torch.as_tensor(t) for t in (num_detections, boxes, scores, labels))
    keep = torch.arange(boxes.shape[1], device=boxes.device) < num.to(boxes.device).reshape(-1, 1)
    boxes = torch.where(keep.unsqueeze(-1), boxes.float(), torch.zeros((), device=boxes.device))
    scores = torch.where(keep, scores.float(), torch.zeros((), device=boxes.device))
    labels = torch.where(keep, labels.float(), torch.full((), -1.0, device=boxes.device))
    return torch.cat([boxes, scores.unsqueeze(-1), labels.unsqueeze(-1)], dim=-1)


def detections_from_onnx(outputs: list):
    """Dense detections ``(N, K, 6)`` from the four outputs of an exported detector (numpy, graph order)."""
    import numpy as np

    check(len(outputs) == len(OUTPUT_NAMES), f"an exported detector has {len(OUTPUT_NAMES)} outputs "
                                             f"{OUTPUT_NAMES}, not {len(outputs)}")
    return as_dense(*(torch.from_numpy(np.ascontiguousarray(o)) for o in outputs))


def _greedy_matches(ref, got, iou_threshold: float, score_tolerance: float, min_score: float):
    """One image: ``[(iou, |score diff|)]`` of the one-to-one matches of ``ref``'s detections scoring at
    least ``min_score`` (by descending score) to ``got``'s, and how many of ``ref`` were looked for."""
    ref, got = ref[ref[:, 5] >= 0], got[got[:, 5] >= 0]
    ref = ref[ref[:, 4] >= min_score]
    ref = ref[ref[:, 4].argsort(descending=True, stable=True)]
    if not len(ref) or not len(got):
        return [], len(ref)
    iou = box_iou(ref[:, :4].double(), got[:, :4].double())
    diff = (ref[:, 4:5].double() - got[:, 4].double()).abs()
    ok = (ref[:, 5:6] == got[:, 5]) & (iou >= iou_threshold) & (diff <= score_tolerance)
    free = torch.ones(len(got), dtype=torch.bool)
    matches = []
    for i in range(len(ref)):
        cand = ok[i] & free
        if cand.any():
            j = int(torch.where(cand, iou[i], torch.full_like(iou[i], -1.0)).argmax())
            free[j] = False
            matches.append((float(iou[i, j]), float(diff[i, j])))
    return matches, len(ref)


def match_detections(ref, got, iou_threshold: float = 0.9, score_tolerance: float = 0.02,
                     min_score: float = 0.3) -> dict[str, Any]:
    """How many of ``ref``'s detections ``got`` reproduces: the parity of an export or an INT8 model.

    Both are dense ``(N, K, 6)`` detections of the same N images. A detection of ``ref`` scoring at least
    ``min_score`` is *matched* when ``got`` has, in the same image, a detection of the same label with
    IoU >= ``iou_threshold`` and a score within ``score_tolerance``; matching is greedy and one-to-one (by
    descending score, each taking its highest-IoU free candidate). The same is counted the other way
    (``got``'s detections scoring at least ``min_score`` against ``ref``): ``extra`` are those with no
    reference. Returns ``matched``, ``total``, ``matched_pct`` (100 when there is nothing to match),
    ``max_score_diff`` and ``min_iou`` over the matches (None without matches), ``got_matched``,
    ``got_total``, ``got_matched_pct`` and ``extra``.
    """
    ref, got = torch.as_tensor(ref).detach().cpu().float(), torch.as_tensor(got).detach().cpu().float()
    check(ref.ndim == 3 and got.ndim == 3 and ref.shape[-1] == 6 and got.shape[-1] == 6,
          f"detections are (images, K, 6), not {tuple(ref.shape)} and {tuple(got.shape)}")
    check(len(ref) == len(got), f"detections of {len(ref)} and {len(got)} images cannot be compared")
    forward, backward, total, got_total = [], [], 0, 0
    for r, g in zip(ref, got, strict=True):
        m, n = _greedy_matches(r, g, iou_threshold, score_tolerance, min_score)
        forward += m
        total += n
        m, n = _greedy_matches(g, r, iou_threshold, score_tolerance, min_score)
        backward += m
        got_total += n

    def pct(k: int, n: int) -> float:
        return 100.0 * k / n if n else 100.0

    return {"matched": len(forward), "total": total, "matched_pct": pct(len(forward), total),
            "max_score_diff": max((d for _, d in forward), default=None),
            "min_iou": min((i for i, _ in forward), default=None),
            "got_matched": len(backward), "got_total": got_total, "got_matched_pct": pct(len(backward), got_total),
            "extra": got_total - len(backward)}
