"""Detection post-processing (eager and ONNX), COCO mAP and detection parity, on hand-computable cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from deploycomp.errors import DeploycompError, UsageError
from deploycomp.tasks.det_metrics import MeanAP, coco_map
from deploycomp.tasks.det_post import (
    OUTPUT_NAMES,
    DetectionExport,
    NonMaxSuppression,
    as_dense,
    detections_from_onnx,
    match_detections,
    postprocess,
)


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def raw_of(boxes, probs):
    """Raw ``(1, A, 4 + C)`` from A boxes and their (A, C) class probabilities."""
    probs = torch.tensor(probs, dtype=torch.float64)
    return torch.cat([torch.tensor(boxes, dtype=torch.float32),
                      torch.log(probs / (1 - probs)).float()], dim=1)[None]


FAR = [50.0, 50.0, 60.0, 60.0]
A_BOX, B_BOX = [0.0, 0.0, 10.0, 10.0], [1.0, 0.0, 11.0, 10.0]  # IoU 90 / 110 = 0.82


# --------------------------------------------------------------------------------------------------
# Eager post-processing


def test_overlapping_boxes_of_one_class_keep_the_best():
    num, boxes, scores, labels = postprocess(raw_of([A_BOX, B_BOX, FAR], [[.9, .01], [.8, .01], [.7, .01]]))
    assert num.tolist() == [2] and num.dtype == torch.int64 and labels.dtype == torch.int64
    assert boxes.shape == (1, 6, 4) and scores.shape == (1, 6)  # K = min(100, C * A)
    assert labels[0].tolist() == [0, 0, -1, -1, -1, -1]
    assert boxes[0, :2].tolist() == [A_BOX, FAR]
    torch.testing.assert_close(scores[0, :2], torch.tensor([.9, .7]))
    assert (boxes[0, 2:] == 0).all() and (scores[0, 2:] == 0).all()  # padding


def test_overlapping_boxes_of_different_classes_are_both_kept():
    num, boxes, scores, labels = postprocess(raw_of([A_BOX, B_BOX], [[.9, .01], [.01, .8]]))
    assert num.tolist() == [2] and labels[0, :2].tolist() == [0, 1]
    assert boxes[0, :2].tolist() == [A_BOX, B_BOX]


def test_one_box_may_be_kept_for_two_classes():
    num, boxes, scores, labels = postprocess(raw_of([A_BOX], [[.9, .6]]))
    assert num.tolist() == [2] and labels[0].tolist() == [0, 1] and boxes[0].tolist() == [A_BOX, A_BOX]


def test_score_threshold_and_iou_threshold():
    raw = raw_of([A_BOX, FAR], [[.06, .04], [.5, .01]])
    num, _, scores, labels = postprocess(raw, score_threshold=0.05)
    assert num.tolist() == [2] and labels[0, :2].tolist() == [0, 0]
    assert postprocess(raw, score_threshold=0.1)[0].tolist() == [1]
    both = raw_of([A_BOX, B_BOX], [[.9], [.8]])
    assert postprocess(both, iou_threshold=0.5)[0].tolist() == [1]
    assert postprocess(both, iou_threshold=0.85)[0].tolist() == [2]  # IoU 0.82 is not above 0.85


def test_fewer_outputs_than_candidates_keeps_the_highest_scores():
    raw = raw_of([A_BOX, FAR, [100, 100, 110, 110]], [[.5, .01], [.9, .01], [.01, .7]])
    num, boxes, scores, labels = postprocess(raw, max_det=2)
    assert boxes.shape == (1, 2, 4) and num.tolist() == [2]
    assert labels[0].tolist() == [0, 1] and boxes[0, 0].tolist() == FAR
    torch.testing.assert_close(scores[0], torch.tensor([.9, .7]))


def test_pre_nms_top_k_counts_box_class_pairs_per_image():
    raw = raw_of([A_BOX, FAR, [100, 100, 110, 110]], [[.5, .6], [.9, .01], [.01, .7]])
    assert postprocess(raw, pre_nms_top_k=2)[0].tolist() == [2]
    assert postprocess(raw, pre_nms_top_k=2)[3][0, :2].tolist() == [0, 1]  # .9 and .7 survive
    assert postprocess(raw, pre_nms_top_k=1000)[0].tolist() == [4]


def test_batch_with_an_empty_image_and_dense_form():
    raw = torch.cat([raw_of([A_BOX, FAR], [[.9, .01], [.01, .8]]), raw_of([A_BOX, FAR], [[.01, .01], [.02, .01]])])
    num, boxes, scores, labels = postprocess(raw, max_det=3)
    assert num.tolist() == [2, 0] and labels[1].tolist() == [-1, -1, -1] and (scores[1] == 0).all()
    dense = as_dense(num, boxes, scores, labels)
    assert dense.shape == (2, 3, 6) and dense.dtype == torch.float32
    assert dense[0, 0].tolist() == pytest.approx(A_BOX + [.9, 0.0])
    assert dense[0, 1].tolist() == pytest.approx(FAR + [.8, 1.0])
    assert dense[0, 2].tolist() == [0, 0, 0, 0, 0, -1] and (dense[1, :, 5] == -1).all()


def test_as_dense_pads_past_num_detections():
    dense = as_dense(np.array([1]), np.ones((1, 2, 4), np.float32), np.array([[.9, .8]], np.float32),
                     np.array([[3, 4]]))
    assert dense[0].tolist() == [[1, 1, 1, 1, pytest.approx(.9), 3], [0, 0, 0, 0, 0, -1]]


def test_bad_options_and_shapes_are_one_line_errors():
    raw = raw_of([A_BOX], [[.9]])
    for kwargs in ({"max_det": 0}, {"iou_threshold": 1.5}, {"score_threshold": -0.1}, {"pre_nms_top_k": 0}):
        with pytest.raises(UsageError):
            postprocess(raw, **kwargs)
    with pytest.raises(UsageError, match="4 \\+ classes"):
        postprocess(torch.zeros(1, 5, 4))


# --------------------------------------------------------------------------------------------------
# NonMaxSuppression: eager against the ONNX operator in ONNX Runtime

NMS_BOXES = [[0, 0, 3, 1], [1, 0, 4, 1], [0.5, 0, 3.5, 1], [10, 10, 12, 12]]  # IoU(0,1) = .5, IoU(0,2) = .71
NMS_SCORES = [[[.9, .8, .85, .25], [.1, .3, .2, .7]],  # image 0: class 0, class 1
              [[.26, .5, .75, .4], [0, 0, 0, 0]]]  # image 1
# Image 0, class 0: box 0 (.9); box 2 (.85) suppressed (IoU .71 > .5); box 1 (.8) kept (IoU .5 is not above .5);
# box 3 (.25) not a candidate (a score must exceed .25). Class 1: box 3, then box 1. Image 1: box 2, then 3
# (1 and 0 overlap box 2 by .71). Rows: batch, then class, then descending score.
NMS_EXPECTED = [[0, 0, 0], [0, 0, 1], [0, 1, 3], [0, 1, 1], [1, 0, 2], [1, 0, 3]]


class _NMS(nn.Module):
    def __init__(self, max_out: int):
        super().__init__()
        self.max_out = max_out

    def forward(self, boxes, scores):
        return NonMaxSuppression.apply(boxes, scores, self.max_out, 0.5, 0.25)


def _ort(path, **feeds):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return session.run(None, {k: v.numpy() for k, v in feeds.items()})


def _export(module, args, path, input_names, output_names, dynamic=True):
    import warnings

    axes = {name: {0: "batch"} for name in (*input_names, *output_names)} if dynamic else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), dynamo=False, opset_version=17, input_names=list(input_names),
                          output_names=list(output_names), dynamic_axes=axes)


@pytest.mark.parametrize("max_out, expected", [(100, NMS_EXPECTED), (1, [[0, 0, 0], [0, 1, 3], [1, 0, 2]])])
def test_nms_matches_the_onnx_operator(tmp_path, max_out, expected):
    boxes = torch.tensor([NMS_BOXES, NMS_BOXES], dtype=torch.float32)
    scores = torch.tensor(NMS_SCORES, dtype=torch.float32)
    module = _NMS(max_out)
    assert module(boxes, scores).tolist() == expected
    _export(module, (boxes, scores), tmp_path / "nms.onnx", ("boxes", "scores"), ("selected",), dynamic=False)
    (selected,) = _ort(tmp_path / "nms.onnx", boxes=boxes, scores=scores)
    assert selected.tolist() == expected


# --------------------------------------------------------------------------------------------------
# Exported post-processing: ONNX Runtime against eager, dynamic batch


class TinyDenseHead(nn.Module):
    """A stride-8 convolution on 64x64 images: 64 points, boxes of a few strides around each, 3 classes."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(3, 4 + classes, 3, stride=8, padding=1)
        ys, xs = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
        self.register_buffer("points", torch.stack([(xs.flatten() + 0.5) * 8, (ys.flatten() + 0.5) * 8], 1))

    def forward(self, x):
        out = self.conv(x).flatten(2).transpose(1, 2)
        d = nn.functional.softplus(out[..., :4]) * 8
        return torch.cat([self.points - d[..., :2], self.points + d[..., 2:], 3 * out[..., 4:]], dim=-1)


def _assert_same(eager, onnx_out):
    num, boxes, scores, labels = eager
    assert [o.dtype for o in onnx_out] == [np.int64, np.float32, np.float32, np.int64]
    assert onnx_out[0].tolist() == num.tolist()
    assert onnx_out[3].tolist() == labels.tolist()
    torch.testing.assert_close(torch.from_numpy(onnx_out[1]), boxes, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(onnx_out[2]), scores, rtol=1e-5, atol=1e-5)


def test_exported_detector_matches_eager_at_any_batch(tmp_path):
    import onnx

    model = DetectionExport(TinyDenseHead().eval(), max_det=20, pre_nms_top_k=50).eval()
    path = tmp_path / "det.onnx"
    _export(model, (torch.randn(1, 3, 64, 64),), path, ("input",), OUTPUT_NAMES)
    graph = onnx.load(str(path)).graph
    assert "NonMaxSuppression" in [n.op_type for n in graph.node]
    assert [o.name for o in graph.output] == list(OUTPUT_NAMES)
    for batch in (1, 3):
        x = torch.randn(batch, 3, 64, 64)
        with torch.no_grad():
            eager = model(x)
        out = _ort(path, input=x)
        assert eager[0].min() > 0 and eager[1].shape == (batch, 20, 4)
        _assert_same(eager, out)
        torch.testing.assert_close(detections_from_onnx(out), as_dense(*eager), rtol=1e-5, atol=1e-5)


def test_exported_postprocessing_on_hand_built_raw(tmp_path):
    """The graph of the post-processing alone (the model is the identity): suppression, two classes of
    one box, padding, an image with nothing above the threshold and a batch with no detection at all."""
    path = tmp_path / "post.onnx"
    raw = torch.cat([raw_of([A_BOX, B_BOX, FAR], [[.9, .6], [.8, .01], [.7, .01]]),
                     raw_of([A_BOX, B_BOX, FAR], [[.01, .01], [.02, .01], [.03, .01]])])
    model = DetectionExport(nn.Identity(), max_det=5)
    _export(model, (raw,), path, ("raw",), OUTPUT_NAMES)
    eager = model(raw)
    assert eager[0].tolist() == [3, 0] and eager[3].tolist() == [[0, 0, 1, -1, -1], [-1] * 5]
    _assert_same(eager, _ort(path, raw=raw))
    _assert_same(model(raw[1:]), _ort(path, raw=raw[1:]))  # nothing selected anywhere


# --------------------------------------------------------------------------------------------------
# COCO mAP (pycocotools)


def targets_of(*images, m: int = 3):
    """Dense targets (N, m, 5) from lists of ``(label, box)`` per image."""
    out = torch.full((len(images), m, 5), 0.0)
    out[..., 0] = -1
    for i, rows in enumerate(images):
        for j, (label, box) in enumerate(rows):
            out[i, j] = torch.tensor([label, *box])
    return out


def dets_of(*images, k: int = 4):
    """Dense detections (N, k, 6) from lists of ``(label, box, score)`` per image."""
    out = torch.zeros((len(images), k, 6))
    out[..., 5] = -1
    for i, rows in enumerate(images):
        for j, (label, box, score) in enumerate(rows):
            out[i, j] = torch.tensor([*box, score, label])
    return out


BOX2 = [20.0, 20.0, 30.0, 40.0]


def test_perfect_detections_score_100():
    t = targets_of([(0, A_BOX), (1, BOX2)], [(1, FAR)])
    d = dets_of([(0, A_BOX, .9), (1, BOX2, .8)], [(1, FAR, .7)])
    assert coco_map(d, t, 2) == {"map_pct": 100.0, "map50_pct": 100.0, "map75_pct": 100.0, "samples": 2}


def test_one_of_two_found_scores_51_of_101_recall_points():
    t = targets_of([(0, A_BOX), (0, BOX2)])
    r = coco_map(dets_of([(0, A_BOX, .9)]), t, 1)
    assert r["map_pct"] == pytest.approx(100 * 51 / 101) and r["map50_pct"] == pytest.approx(100 * 51 / 101)


def test_a_box_at_iou_062_counts_at_50_not_at_75():
    r = coco_map(dets_of([(0, [0, 0, 10, 6.2], .9)]), targets_of([(0, A_BOX)]), 1)
    assert r["map50_pct"] == 100.0 and r["map75_pct"] == 0.0
    assert r["map_pct"] == pytest.approx(30.0)  # matched at .50, .55 and .60 of ten thresholds


def test_false_positives_duplicates_and_absent_classes():
    t = targets_of([(0, A_BOX)], [])
    # A lower-scored duplicate and a detection on an image with no ground truth cost nothing when they rank
    # below the true positive; a class with no ground truth (1) is left out of the mean.
    d = dets_of([(0, A_BOX, .9), (0, A_BOX, .5), (1, FAR, .99)], [(0, FAR, .3)])
    assert coco_map(d, t, 2)["map_pct"] == 100.0
    # A false positive (on the image without ground truth) ranked first: precision 1/2 at recall 1.
    d = dets_of([(0, A_BOX, .9)], [(0, FAR, .95)])
    assert coco_map(d, t, 2)["map_pct"] == pytest.approx(50.0)


def test_no_detections_and_no_ground_truth_are_zero():
    t = targets_of([(0, A_BOX)])
    assert coco_map(dets_of([]), t, 1) == {"map_pct": 0.0, "map50_pct": 0.0, "map75_pct": 0.0, "samples": 1}
    assert coco_map(dets_of([(0, A_BOX, .9)]), targets_of([]), 1)["map_pct"] == 0.0


def test_meter_accumulates_batches_like_one_evaluation(capsys):
    t = targets_of([(0, A_BOX), (0, BOX2)], [(1, FAR)], [(0, FAR), (1, A_BOX)])
    d = dets_of([(0, A_BOX, .9), (1, BOX2, .6)], [(1, FAR, .5)], [(0, [50, 50, 60, 57], .8), (1, A_BOX, .4)])
    meter = MeanAP(2)
    meter.update(d[:2], t[:2])
    meter.update(d[2:, :2].numpy(), t[2:, :2].numpy())  # numpy, and another K and M
    assert meter.result() == coco_map(d, t, 2)
    assert meter.result()["samples"] == 3
    assert capsys.readouterr().out == ""  # pycocotools' printing is silenced


def test_out_of_range_labels_are_one_line_errors():
    with pytest.raises(DeploycompError, match="class 2 but there are 2 classes"):
        coco_map(dets_of([]), targets_of([(2, A_BOX)]), 2)
    with pytest.raises(UsageError, match="images of detections"):
        coco_map(dets_of([]), targets_of([], []), 2)


# --------------------------------------------------------------------------------------------------
# Parity by matched detections


def test_identical_detections_all_match():
    d = dets_of([(0, A_BOX, .9), (1, FAR, .5), (1, BOX2, .1)])
    r = match_detections(d, d.clone())
    assert r["matched"] == r["total"] == 2 and r["matched_pct"] == 100.0  # .1 is below min_score
    assert r["max_score_diff"] == 0.0 and r["min_iou"] == pytest.approx(1.0)
    assert r["got_matched_pct"] == 100.0 and r["extra"] == 0


def test_mismatches_by_box_label_and_score():
    ref = dets_of([(0, A_BOX, .9), (0, BOX2, .8), (1, FAR, .7), (0, [70, 70, 80, 80], .31)])
    got = dets_of([(0, B_BOX, .9), (1, BOX2, .8), (1, FAR, .65), (0, [70, 70, 80, 80], .295)])
    r = match_detections(ref, got)
    # A_BOX vs B_BOX: IoU .82 < .9; BOX2: another label; FAR: .05 apart; the last matches (.015 apart)
    assert (r["matched"], r["total"]) == (1, 4) and r["matched_pct"] == 25.0
    assert r["max_score_diff"] == pytest.approx(.015, abs=1e-6)
    assert r["got_total"] == 3 and r["got_matched"] == 0 and r["extra"] == 3  # .295 is below min_score
    assert match_detections(ref, got, iou_threshold=0.8)["matched"] == 2


def test_matching_is_one_to_one_and_counts_extras():
    ref = dets_of([(0, A_BOX, .9), (0, A_BOX, .89)])
    got = dets_of([(0, A_BOX, .9), (1, FAR, .6)])
    r = match_detections(ref, got)
    assert (r["matched"], r["total"], r["got_matched"], r["got_total"], r["extra"]) == (1, 2, 1, 2, 1)
    assert match_detections(dets_of([]), dets_of([]))["matched_pct"] == 100.0
    with pytest.raises(UsageError):
        match_detections(dets_of([], []), dets_of([]))
