"""torchvision's detectors in deploycomp's detection contract: end-to-end models with their own post-processing.

:class:`TorchvisionDetector` wraps a torchvision detection model so that it takes what every deploycomp model
takes and returns what an end-to-end detector returns (``returns_detections = True``, see
:class:`deploycomp.tasks.Detection`):

- input: a float tensor (N, C, H, W) already normalised with the dataset's mean and std (the model's own
  transform does not normalise again: mean 0, std 1); one channel (grayscale scenes) is repeated to three
  inside ``forward``;
- output, in any mode: ``(num_detections (N,) int64, boxes (N, K, 4) float32, scores (N, K) float32,
  labels (N, K) int64)``, K = ``max_det``, sorted by score, padded with box 0, score 0, label -1, labels in
  deploycomp's contiguous 0..C-1 (Faster R-CNN and SSD score a background class 0: their labels shift by one;
  RetinaNet and FCOS score each class with a sigmoid and need none);
- ``detection_loss(images, targets)``: the sum of the model's own training losses on deploycomp's dense
  (N, M, 5) targets (padding rows and degenerate boxes dropped, images without boxes allowed), computed in
  train mode (the previous mode restored).

Input size, per family:

- Faster R-CNN, RetinaNet, FCOS and SSDlite keep the input size (torchvision would resize to 800 px, about 150
  times the MACs of a 64 px scene, or to 320 px for the ``_320`` and SSDlite variants). Their anchors are in pixels
  (R-CNN, RetinaNet: 32-512 px; FCOS: stride-scaled) or relative to the image (SSDlite), so small inputs work;
  the R-CNN and RetinaNet/FCOS transforms pad to a multiple of 32 (their FPN strides), boxes stay in input
  pixels.
- SSD300 (VGG-16) resizes to its fixed 300 x 300: its last extra layers are unpadded 3 x 3 convolutions that
  need the 5 x 5 and 3 x 3 maps of a 300 px input; boxes come back in input pixels.

``size=(H, W)`` gives any family a fixed input size instead (e.g. SSDlite's native 320 x 320).

Limits inherited from torchvision: SSDlite trains only on batches of two images or more (its last extra layers
have 1 x 1 maps followed by BatchNorm, at 64 px as at 320); post-processing loops over the images of a batch, so
an ONNX export holds one copy per image and runs at the batch it was exported with (a dynamic batch fails in
ONNX Runtime); a two-stage model's MACs depend on how many proposals its RPN keeps for the example input.

Masks and keypoints (``maskrcnn_*``, ``keypointrcnn_*``) are refused (:data:`REFUSED`): they train on
instance masks or keypoints, which box targets do not have.

Pruning (torch-pruning): :func:`protected_layers` are the class and box predictors; :func:`tracing_heads` is
the context under which ``forward`` returns the outputs of those predictors instead of the detections, so
that the dependency graph holds every layer. Without it, Faster R-CNN's RPN is missing from the graph (its
proposals are computed from detached outputs), and pruning the FPN's outputs leaves the RPN head's
convolution with its old 256 input channels.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from deploycomp.errors import UsageError, check


@dataclass(frozen=True)
class Family:
    """How one torchvision detector family is built and read."""

    kind: str  # "rcnn", "ssd", "retinanet" or "fcos" (which layers are its predictors)
    background: bool  # a softmax over a background class 0 and the C classes (labels shift by one)
    max_det_arg: str  # the builder argument for detections per image
    score_arg: str  # the builder argument for the score threshold
    native_size: tuple[int, int]  # (H, W) torchvision resizes to: what the zoo declares as its input size
    fixed: bool = False  # resized to native_size (SSD300); False: the input's own size is kept


def _rcnn(native: int) -> Family:
    return Family("rcnn", True, "box_detections_per_img", "box_score_thresh", (native, native))


_RETINA = Family("retinanet", False, "detections_per_img", "score_thresh", (800, 800))
DETECTORS: dict[str, Family] = {
    "ssdlite320_mobilenet_v3_large": Family("ssd", True, "detections_per_img", "score_thresh", (320, 320)),
    "ssd300_vgg16": Family("ssd", True, "detections_per_img", "score_thresh", (300, 300), fixed=True),
    "fcos_resnet50_fpn": Family("fcos", False, "detections_per_img", "score_thresh", (800, 800)),
    "retinanet_resnet50_fpn": _RETINA,
    "retinanet_resnet50_fpn_v2": _RETINA,
    "fasterrcnn_mobilenet_v3_large_fpn": _rcnn(800),
    "fasterrcnn_mobilenet_v3_large_320_fpn": _rcnn(320),
    "fasterrcnn_resnet50_fpn": _rcnn(800),
    "fasterrcnn_resnet50_fpn_v2": _rcnn(800),
}

_MASKS = ("it trains on instance masks (targets['masks']), which deploycomp's box targets do not have, and its "
          "mask outputs are no part of the box-detection contract")
REFUSED: dict[str, str] = {
    "maskrcnn_resnet50_fpn": f"{_MASKS}; use fasterrcnn_resnet50_fpn (the same detector without the mask head)",
    "maskrcnn_resnet50_fpn_v2": f"{_MASKS}; use fasterrcnn_resnet50_fpn_v2 (the same detector without the mask "
                                "head)",
    "keypointrcnn_resnet50_fpn": "it trains on keypoints (targets['keypoints']), which deploycomp's box targets do "
                                 "not have, and its keypoint outputs are no part of the box-detection contract; use "
                                 "fasterrcnn_resnet50_fpn (the same detector without the keypoint head)",
}


class SizedTransform(GeneralizedRCNNTransform):
    """torchvision's detection transform without normalisation (deploycomp's data is normalised already) and
    without resizing unless ``fixed_size`` is set; batching (padding to ``size_divisible``) is unchanged."""

    def normalize(self, image):
        return image

    def resize(self, image, target=None):
        if self.fixed_size is None:
            return image, target
        return super().resize(image, target)


class TorchvisionDetector(nn.Module):
    """A torchvision detector in deploycomp's end-to-end detection contract (see the module docstring)."""

    returns_detections = True
    exports_dynamic_batch = False  # torchvision's post-processing loops over the images: one batch size per graph
    _trace_heads = False  # set by tracing_heads(): forward returns the predictors' outputs

    def __init__(self, model: nn.Module, name: str, num_classes: int, in_channels: int, max_det: int):
        super().__init__()
        self.model = model
        self.arch, self.num_classes, self.in_channels, self.max_det = name, num_classes, in_channels, max_det
        self.label_offset = int(DETECTORS[name].background)

    def forward(self, x):
        if TorchvisionDetector._trace_heads:
            return self._head_outputs(x)
        with _inference_path(self.model):
            detections = self.model(list(self._rgb(x)))
        return pad_detections(detections, self.max_det, self.label_offset)

    def detection_loss(self, images, targets, outputs=None):
        """The sum of the model's training losses on ``targets`` (N, M, 5) rows ``[label, x1, y1, x2, y2]``
        (label -1: padding); ``outputs`` is not used (the model computes its losses in its own forward).
        Called in eval mode (Taylor's gradients), BatchNorm stays in eval mode: its statistics are not moved."""
        was_training = self.training
        self.train()
        if not was_training:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        try:
            losses = self.model(list(self._rgb(images)), torchvision_targets(targets, self.label_offset))
        finally:
            self.train(was_training)
        return torch.stack([v.float() for v in losses.values()]).sum()

    def protected_layers(self) -> list[nn.Module]:
        return protected_layers(self)

    def _rgb(self, x):
        return x.expand(-1, 3, -1, -1) if self.in_channels == 1 else x

    def _head_outputs(self, x):
        """The outputs of every call of the predictors on ``x`` (eval mode), for torch-pruning's trace."""
        captured: list = []
        hooks = [m.register_forward_hook(lambda m, i, o: captured.append(o)) for m in protected_layers(self)]
        try:
            with _inference_path(self.model):
                self.model(list(self._rgb(x)))
        finally:
            for h in hooks:
                h.remove()
        return tuple(captured)


@contextlib.contextmanager
def _inference_path(model: nn.Module) -> Iterator[None]:
    """The detector's inference path (detections, not losses) even in train mode; BatchNorm layers keep their
    mode, so that re-estimating their statistics (a forward pass in train mode, no targets) works."""
    changed = [m for m in model.modules() if m.training and not isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in changed:
        m.training = False
    try:
        yield
    finally:
        for m in changed:
            m.training = True


@contextlib.contextmanager
def tracing_heads() -> Iterator[None]:
    """While torch-pruning builds its dependency graph: a :class:`TorchvisionDetector` returns the outputs
    of its predictors (:func:`protected_layers`, every level) instead of its detections. The graph then
    holds every layer (Faster R-CNN's RPN head works on features its proposals are detached from), and no
    post-processing op (top-k, NMS, indexing) whose channel mapping torch-pruning would guess."""
    TorchvisionDetector._trace_heads = True
    try:
        yield
    finally:
        TorchvisionDetector._trace_heads = False


def pad_detections(detections: list[dict], k: int, label_offset: int):
    """torchvision's per-image dicts (sorted by score) as ``(num_detections, boxes, scores, labels)`` padded
    to ``k``: concatenation with ``k`` padding rows, then the first ``k`` (exportable with a dynamic count)."""
    nums, boxes, scores, labels = [], [], [], []
    for d in detections:
        b, s, lab = d["boxes"].float(), d["scores"].float(), d["labels"].long() - label_offset
        nums.append(torch.ones_like(lab).sum().clamp(max=k))
        boxes.append(torch.cat([b, b.new_zeros(k, 4)])[:k])
        scores.append(torch.cat([s, s.new_zeros(k)])[:k])
        labels.append(torch.cat([lab, lab.new_full((k,), -1)])[:k])
    return torch.stack(nums), torch.stack(boxes), torch.stack(scores), torch.stack(labels)


def torchvision_targets(targets, label_offset: int) -> list[dict]:
    """Dense (N, M, 5) targets as torchvision's list of ``{"boxes", "labels"}``: padding rows (label -1) and
    boxes without area (torchvision refuses them; they carry nothing to learn) dropped."""
    out = []
    for t in targets.float():
        keep = (t[:, 0] >= 0) & (t[:, 3] > t[:, 1]) & (t[:, 4] > t[:, 2])
        out.append({"boxes": t[keep, 1:], "labels": t[keep, 0].long() + label_offset})
    return out


def protected_layers(wrapper: TorchvisionDetector) -> list[nn.Module]:
    """The layers whose output channels are predictions (classes, boxes, objectness, centerness, per anchor):
    pruning must never remove their output channels."""
    model, kind = wrapper.model, DETECTORS[wrapper.arch].kind
    if kind == "rcnn":
        return [model.rpn.head.cls_logits, model.rpn.head.bbox_pred, model.roi_heads.box_predictor.cls_score,
                model.roi_heads.box_predictor.bbox_pred]
    if kind == "ssd":
        return [_last_conv(m) for head in (model.head.classification_head, model.head.regression_head)
                for m in head.module_list]
    layers = [model.head.classification_head.cls_logits, model.head.regression_head.bbox_reg]
    return layers + [model.head.regression_head.bbox_ctrness] if kind == "fcos" else layers


def _last_conv(module: nn.Module) -> nn.Module:
    return [m for m in module.modules() if isinstance(m, nn.Conv2d)][-1]


def check_detector(name: str) -> Family:
    """The family of detector ``name``; a one-line error for a refused or unknown one."""
    if name in REFUSED:
        raise UsageError(f"{name} cannot be trained or evaluated as a box detector: {REFUSED[name]}")
    check(name in DETECTORS, f"unknown torchvision detector {name!r}; valid: {', '.join(DETECTORS)}")
    return DETECTORS[name]


def build_torchvision_detector(name: str, num_classes: int, in_channels: int = 3, max_det: int = 100,
                               weights: str | None = None, size: tuple[int, int] | None = None,
                               score_threshold: float | None = None, **kwargs) -> TorchvisionDetector:
    """torchvision detector ``name`` for ``num_classes`` classes (no background) and ``in_channels`` (1 or 3)
    input channels, returning at most ``max_det`` detections per image. Randomly initialised (no weights
    are downloaded: ``weights`` and ``weights_backbone`` stay None; load a weights file afterwards).
    ``size``: a fixed (H, W) input size instead of the family's (see the module docstring);
    ``score_threshold``: the model's own (None: torchvision's default); ``kwargs`` go to torchvision's builder
    (e.g. ``rpn_post_nms_top_n_test``)."""
    import torchvision.models as tvm

    family = check_detector(name)
    check(weights is None, f"--weights {weights!r}: deploycomp builds torchvision detectors for your classes "
                           "without published weights (COCO's 91 classes would need a new head); give a weights "
                           "file (--weights FILE.pth) or train from scratch")
    check(num_classes >= 1, f"a detector needs at least one class, got {num_classes}")
    check(in_channels in (1, 3), f"{name} takes 1 (repeated) or 3 input channels, got {in_channels}")
    check(max_det >= 1, f"the number of detections per image must be at least 1, got {max_det}")
    args = {"weights": None, "weights_backbone": None, "num_classes": num_classes + family.background,
            "image_mean": [0.0, 0.0, 0.0], "image_std": [1.0, 1.0, 1.0], family.max_det_arg: max_det}
    if score_threshold is not None:
        args[family.score_arg] = score_threshold
    model = tvm.get_model(name, **{**args, **kwargs})
    old = model.transform
    fixed = tuple(size) if size is not None else family.native_size if family.fixed else None
    model.transform = SizedTransform(old.min_size, old.max_size, [0.0] * 3, [1.0] * 3,
                                     size_divisible=old.size_divisible,
                                     fixed_size=None if fixed is None else (fixed[1], fixed[0]))  # torchvision: (W, H)
    return TorchvisionDetector(model, name, num_classes, in_channels, max_det)
