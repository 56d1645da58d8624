"""torchvision's detectors in deploycomp's end-to-end detection contract: outputs, loss, pruning, ONNX.

The two cheapest detectors (SSDlite and Faster R-CNN MobileNetV3-320) run by default at 64 px, one
thread; every other family runs with DEPLOYCOMP_SLOW_TESTS=1 (ResNet-50 FPNs, and SSD300 at its 300 px).
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

from deploycomp.errors import UsageError
from deploycomp.tasks.tv_detection import (
    DETECTORS,
    REFUSED,
    TorchvisionDetector,
    build_torchvision_detector,
    pad_detections,
    protected_layers,
    torchvision_targets,
    tracing_heads,
)

FAST = ["ssdlite320_mobilenet_v3_large", "fasterrcnn_mobilenet_v3_large_320_fpn"]
SLOW = [pytest.mark.slow, pytest.mark.skipif(not os.environ.get("DEPLOYCOMP_SLOW_TESTS"),
                                             reason="ResNet-50 and VGG-16 detectors take long on a CPU; set "
                                                    "DEPLOYCOMP_SLOW_TESTS=1 to run")]
EVERY = [pytest.param(n, marks=[] if n in FAST else SLOW) for n in DETECTORS]
C, SIZE, K = 3, 64, 100
# Score thresholds that leave some but not all of the K rows filled on the calibrated random models below.
THRESHOLD = {"ssdlite320_mobilenet_v3_large": 0.5, "fasterrcnn_mobilenet_v3_large_320_fpn": 0.25}


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


def _size(name: str) -> int:
    return 300 if DETECTORS[name].fixed else SIZE


def _detector(name: str, **kwargs) -> TorchvisionDetector:
    """A randomly initialised detector whose BatchNorm statistics are estimated on random images (as pruning's
    re-estimation does, through forward in train mode), so that its scores differ from box to box."""
    torch.manual_seed(0)
    kwargs.setdefault("score_threshold", THRESHOLD.get(name))
    w = build_torchvision_detector(name, C, in_channels=1, max_det=K, **kwargs)
    bns = [m for m in w.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    w.train()
    with torch.no_grad():
        for _ in range(2):
            w(torch.randn(4, 1, SIZE, SIZE))
    return w.eval()


def _targets() -> torch.Tensor:
    """Two images: two garments in the first (labels 0 and 2), none in the second (padding only)."""
    t = torch.zeros(2, 3, 5)
    t[..., 0] = -1
    t[0, 0] = torch.tensor([0, 5, 5, 30, 30])
    t[0, 1] = torch.tensor([2, 20, 10, 60, 50])
    return t


def _out_channels(m: nn.Module) -> int:
    return m.out_channels if isinstance(m, nn.Conv2d) else m.out_features


# --------------------------------------------------------------------------------------------------
# Names


def test_every_torchvision_detector_is_supported_or_refused():
    import torchvision.models as tvm

    assert set(DETECTORS) | set(REFUSED) == set(tvm.list_models(module=tvm.detection))
    assert not set(DETECTORS) & set(REFUSED)


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_mask_and_keypoint_models_are_refused_in_one_line(name):
    with pytest.raises(UsageError, match=r"box targets do not have.*use fasterrcnn_resnet50_fpn") as e:
        build_torchvision_detector(name, C)
    assert "\n" not in str(e.value)


def test_bad_arguments_are_one_line_errors():
    with pytest.raises(UsageError, match="unknown torchvision detector 'yolo'"):
        build_torchvision_detector("yolo", C)
    with pytest.raises(UsageError, match="weights file"):
        build_torchvision_detector(FAST[0], C, weights="DEFAULT")
    with pytest.raises(UsageError, match="1 \\(repeated\\) or 3 input channels, got 2"):
        build_torchvision_detector(FAST[0], C, in_channels=2)


# --------------------------------------------------------------------------------------------------
# Formats


def test_pad_detections_is_exact():
    dets = [{"boxes": torch.tensor([[1.0, 2, 3, 4], [5, 6, 7, 8]]), "scores": torch.tensor([0.9, 0.5]),
             "labels": torch.tensor([1, 3])},
            {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}]
    n, boxes, scores, labels = pad_detections(dets, 3, label_offset=1)
    assert (n.dtype, boxes.dtype, scores.dtype, labels.dtype) == (torch.int64, torch.float32, torch.float32,
                                                                 torch.int64)
    assert n.tolist() == [2, 0]
    assert boxes.tolist() == [[[1, 2, 3, 4], [5, 6, 7, 8], [0, 0, 0, 0]], [[0, 0, 0, 0]] * 3]
    assert scores.tolist() == [[pytest.approx(0.9), 0.5, 0.0], [0.0] * 3]
    assert labels.tolist() == [[0, 2, -1], [-1, -1, -1]]  # background class 0 dropped: labels shift by one
    n, _, _, labels = pad_detections(dets, 1, label_offset=0)  # sigmoid heads (RetinaNet, FCOS): no shift
    assert n.tolist() == [1, 0] and labels.tolist() == [[1], [-1]]


def test_targets_drop_padding_and_boxes_without_area():
    t = _targets()
    t[0, 2] = torch.tensor([1, 40, 40, 40, 50])  # no width: torchvision refuses it, nothing to learn
    first, second = torchvision_targets(t, label_offset=1)
    assert first["labels"].tolist() == [1, 3]
    assert first["boxes"].tolist() == [[5, 5, 30, 30], [20, 10, 60, 50]]
    assert second["boxes"].shape == (0, 4) and second["labels"].dtype == torch.int64
    assert torchvision_targets(t, label_offset=0)[0]["labels"].tolist() == [0, 2]


# --------------------------------------------------------------------------------------------------
# Forward and loss


@pytest.mark.parametrize("name", FAST)
def test_forward_returns_padded_detections_in_deploycomp_labels(name):
    w = _detector(name)
    x = torch.randn(2, 1, SIZE, SIZE)
    with torch.no_grad():
        n, boxes, scores, labels = w(x)
        raw = w.model(list(x.expand(-1, 3, -1, -1)))  # torchvision's own output on the repeated channels
    assert (n.shape, boxes.shape, scores.shape, labels.shape) == ((2,), (2, K, 4), (2, K), (2, K))
    assert (n.dtype, boxes.dtype, scores.dtype, labels.dtype) == (torch.int64, torch.float32, torch.float32,
                                                                 torch.int64)
    assert ((n > 0) & (n < K)).any(), "the score threshold should leave some rows padded"
    offset = int(DETECTORS[name].background)
    for i, k in enumerate(n.tolist()):
        assert k == len(raw[i]["scores"])
        assert torch.equal(labels[i, :k], raw[i]["labels"] - offset)
        assert torch.equal(boxes[i, :k], raw[i]["boxes"]) and torch.equal(scores[i, :k], raw[i]["scores"])
        assert labels[i, :k].min() >= 0 and labels[i, :k].max() < C
        assert (scores[i, :k] > 0).all() and (scores[i, :k].diff() <= 0).all()
        assert (boxes[i, :k] >= 0).all() and (boxes[i, :k] <= SIZE).all()
        assert (labels[i, k:] == -1).all() and (scores[i, k:] == 0).all() and (boxes[i, k:] == 0).all()


@pytest.mark.parametrize("name", FAST)
def test_forward_in_train_mode_returns_detections_and_updates_batchnorm(name):
    w = _detector(name).train()
    bn = next(m for m in w.modules() if isinstance(m, nn.BatchNorm2d))
    before = bn.running_mean.clone()
    with torch.no_grad():
        out = w(torch.randn(2, 1, SIZE, SIZE))
    assert [tuple(o.shape) for o in out] == [(2,), (2, K, 4), (2, K), (2, K)]
    assert w.training and w.model.training and bn.training
    assert not torch.equal(bn.running_mean, before)  # what BatchNorm re-estimation after pruning relies on


@pytest.mark.parametrize("name", FAST)
def test_detection_loss_trains_and_restores_the_mode(name):
    w = _detector(name)
    x = torch.randn(2, 1, SIZE, SIZE)
    bn = next(m for m in w.modules() if isinstance(m, nn.BatchNorm2d))
    before = bn.running_mean.clone()
    loss = w.detection_loss(x, _targets())
    assert loss.ndim == 0 and torch.isfinite(loss) and loss > 0
    assert not w.training  # eval before, eval after
    assert torch.equal(bn.running_mean, before)  # Taylor's gradients (eval mode) leave BatchNorm's statistics
    loss.backward()
    grads = [m.weight.grad for m in protected_layers(w)]  # (a level that no box matches may get zeros)
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and sum(g.abs().sum() for g in grads) > 0
    stem = next(m for m in w.modules() if isinstance(m, nn.Conv2d))
    assert stem.weight.grad is not None and stem.weight.grad.abs().sum() > 0  # down to the backbone's first layer
    empty = torch.zeros(2, 1, 5)
    empty[..., 0] = -1
    assert torch.isfinite(w.train().detection_loss(x, empty)) and w.training  # background only


@pytest.mark.parametrize("name", [n for n in DETECTORS if n not in FAST])
@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("DEPLOYCOMP_SLOW_TESTS"), reason="ResNet-50 and VGG-16 detectors take long "
                    "on a CPU; set DEPLOYCOMP_SLOW_TESTS=1 to run")
def test_every_other_detector_builds_runs_and_trains(name):
    torch.manual_seed(0)
    w = build_torchvision_detector(name, C, in_channels=1, max_det=10, score_threshold=0.0).eval()
    x = torch.randn(2, 1, _size(name), _size(name))
    with torch.no_grad():
        n, boxes, scores, labels = w(x)
    assert n.tolist() == [10, 10] and boxes.shape == (2, 10, 4)
    assert labels.min() >= 0 and labels.max() < C and (boxes <= _size(name)).all()
    t = _targets() * torch.tensor([1.0] + [_size(name) / SIZE] * 4)
    loss = w.detection_loss(x, t)
    loss.backward()
    assert torch.isfinite(loss) and protected_layers(w)[0].weight.grad is not None


# --------------------------------------------------------------------------------------------------
# Pruning


def _magnitude_pruner(w, example, ratio=0.3):
    import torch_pruning as tp

    with tracing_heads():
        return tp.pruner.MagnitudePruner(w, example, importance=tp.importance.MagnitudeImportance(p=1),
                                         pruning_ratio=ratio, ignored_layers=protected_layers(w))


def test_plain_trace_misses_the_rpn_and_tracing_heads_finds_it():
    """The cause of "an FPN conv gets 179 of its 256 input channels": Faster R-CNN computes its proposals from
    detached RPN outputs, so a trace from the detections never reaches the RPN head, whose convolution keeps
    256 inputs while the FPN outputs it reads are pruned."""
    import torch_pruning as tp

    w = _detector(FAST[1])
    x = torch.zeros(1, 1, SIZE, SIZE)
    layers = [m for m in w.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    plain = tp.DependencyGraph().build_dependency(w, example_inputs=x)
    assert {n for n, m in w.named_modules() if m in layers and m not in plain.module2node} == \
        {"model.rpn.head.conv.0.0", "model.rpn.head.cls_logits", "model.rpn.head.bbox_pred"}
    with tracing_heads():
        heads = tp.DependencyGraph().build_dependency(w, example_inputs=x)
    assert all(m in heads.module2node for m in layers)


@pytest.mark.parametrize("name", [*FAST, pytest.param("retinanet_resnet50_fpn_v2", marks=SLOW)])
def test_magnitude_pruning_keeps_the_predictors_and_the_model_runs(name):
    import torch_pruning as tp

    w = _detector(name, score_threshold=0.0)
    x = torch.zeros(1, 1, SIZE, SIZE)  # deploycomp's example input
    widths = [_out_channels(m) for m in protected_layers(w)]
    macs0, params0 = tp.utils.count_ops_and_params(w, x)
    pruner = _magnitude_pruner(w, x)
    pruner.step()
    macs1, params1 = tp.utils.count_ops_and_params(w, x)
    print(f"{name}: {macs0 / 1e6:.1f} -> {macs1 / 1e6:.1f} M MACs, {params0 / 1e6:.2f} -> {params1 / 1e6:.2f} M params")
    assert [_out_channels(m) for m in protected_layers(w)] == widths
    assert macs1 < 0.75 * macs0 and params1 < 0.75 * params0
    model = w.model
    if DETECTORS[name].kind == "rcnn":  # neck and both heads pruned alike: FPN outputs = RPN inputs = RoI inputs
        fpn = {m.out_channels for m in model.backbone.fpn.layer_blocks.modules() if isinstance(m, nn.Conv2d)}
        assert len(fpn) == 1 and (width := fpn.pop()) < 256
        assert model.rpn.head.conv[0][0].in_channels == width
        assert model.roi_heads.box_head.fc6.in_features == width * 7 * 7
    with torch.no_grad():
        n, boxes, _, _ = w(torch.randn(2, 1, SIZE, SIZE))
    assert boxes.shape == (2, K, 4) and (n > 0).all()
    loss = w.detection_loss(torch.randn(2, 1, SIZE, SIZE), _targets())
    loss.backward()
    assert torch.isfinite(loss)

    # a checkpoint reloads by replaying the history on a fresh model, traced the same way
    fresh = build_torchvision_detector(name, C, in_channels=1, max_det=K, score_threshold=0.0)
    with tracing_heads():
        graph = tp.DependencyGraph().build_dependency(fresh, example_inputs=x)
    graph.load_pruning_history(pruner.pruning_history())
    fresh.load_state_dict(w.state_dict())
    probe = torch.randn(1, 1, SIZE, SIZE)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(fresh.eval()(probe), w.eval()(probe), strict=True))


# --------------------------------------------------------------------------------------------------
# ONNX


def _matched(ref, out, tol: float = 1e-3) -> bool:
    """Every detection of ``ref`` has one in ``out`` with the same label, box and score within ``tol`` (rows of
    equal score may come in another order)."""
    for i, k in enumerate(ref[0].tolist()):
        got = np.concatenate([out[1][i, :k], out[2][i, :k, None]], 1)
        for j in range(k):
            want = np.concatenate([ref[1][i, j], ref[2][i, j:j + 1]])
            same = out[3][i, :k] == ref[3][i, j]
            if not same.any() or np.abs(got[same] - want).max(1).min() > tol:
                return False
    return True


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("name", FAST)
def test_onnx_export_matches_eager_in_onnxruntime(name, batch, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    w = _detector(name)
    names = ["num_detections", "boxes", "scores", "labels"]
    path = tmp_path / "det.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(w, (torch.randn(batch, 1, SIZE, SIZE),), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=names)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == names
    for seed in (1, 2):  # other inputs than the traced one: other counts, the padding follows
        x = torch.randn(batch, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            ref = [o.numpy() for o in w(x)]
        out = session.run(None, {"input": x.numpy()})
        assert [o.dtype for o in out] == [np.int64, np.float32, np.float32, np.int64]
        assert [o.shape for o in out] == [o.shape for o in ref]
        assert out[0].tolist() == ref[0].tolist() and ref[0].sum() > 0
        assert _matched(ref, out) and _matched(out, ref)
        for i, k in enumerate(out[0].tolist()):
            assert (out[3][i, k:] == -1).all() and (out[2][i, k:] == 0).all() and (out[1][i, k:] == 0).all()
