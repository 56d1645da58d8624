"""Tasks: what differs between classification, segmentation and detection (see ARCHITECTURE.md, "Tasks").

A task owns exactly what differs between them: what a target is, the loss, the metrics and the headline
one the reports compare, which output layers pruning must protect, how export parity is judged (argmax
agreement over labels or pixels) and the words the reports use. Everything else (pruning criteria,
export, INT8, benchmarks) runs on tensors and does not ask.

The task of a run comes from its dataset (``DatasetInfo.task``), is recorded in every checkpoint made
from it (``metadata["task"]``) and in the ONNX sidecar, and a model built fresh declares it in its zoo
entry (``ModelSpec.task``). ``--task`` says it where none of these does. A model of one task given data
of another is a one-line error (:func:`check_same_task`). Adding a task is one registered class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from deploycomp.errors import UsageError, check
from deploycomp.registry import Registry
from deploycomp.tasks.dense_det import IOU_THRESHOLD, MAX_DET, SCORE_THRESHOLD

TASKS: Registry[type[Task]] = Registry("task")
DEFAULT_TASK = "classification"


def register_task(name: str):
    def wrap(cls):
        cls.name = name
        TASKS.register(name, cls)
        return cls

    return wrap


def list_tasks() -> list[str]:
    return TASKS.names()


@dataclass
class Task:
    """One task, bound to a label set: ``num_classes`` and the target value that is not scored."""

    num_classes: int
    ignore_index: int | None = None

    name = "task"
    metric = ""  # key of the headline metric in evaluate()'s result: the reports compare it
    label = ""  # how tables name the headline metric ("top-1", "mIoU")
    train_metric = ""  # key of the running accuracy fit() prints per epoch
    agreement = ""  # how export parity names argmax agreement ("top-1 agreement", "pixel agreement")
    target = ""  # what one target is, for messages
    unit = "images"  # what the metric is computed over, for messages

    # -- training and evaluation
    def loss(self, label_smoothing: float = 0.0, model=None):
        """``(logits, inputs, targets) -> loss``: cross-entropy over the class axis (dim 1). ``model``: the
        model the outputs come from (detection asks it for its own loss; the others do not need it)."""
        import torch.nn.functional as F

        ignore = -100 if self.ignore_index is None else self.ignore_index

        def loss(logits, inputs, targets):
            return F.cross_entropy(logits, targets, label_smoothing=label_smoothing, ignore_index=ignore)

        return loss

    def meter(self) -> Meter:
        raise NotImplementedError

    def kd_loss(self, teacher, temperature: float, alpha: float, lam: float):
        """The distillation loss of this task (see :func:`deploycomp.distill.kd_loss`)."""
        from deploycomp.distill import kd_loss

        return kd_loss(teacher, temperature, alpha, lam, self.ignore_index)

    def train_step(self, net, x, y, criterion):
        """``(outputs, loss)`` of one training batch (``net`` in train mode)."""
        outputs = net(x)
        return outputs, criterion(outputs, x, y)

    def from_onnx(self, outputs: list):
        """What the meter takes, from the outputs of an ONNX session (numpy arrays, in graph order)."""
        import torch

        return torch.from_numpy(outputs[0])

    def predictions(self, outputs):
        """What export parity and INT8 agreement compare between two runs of one model: argmax labels."""
        return outputs.argmax(1).numpy()

    def agreement_pct(self, ref, new) -> float:
        """Percent of predictions two runs share (:meth:`predictions` of each)."""
        import numpy as np

        return 100.0 * float(np.mean(ref == new)) if np.size(ref) else 100.0

    def train_accuracy(self, logits, targets) -> tuple[int, int]:
        """(correct, counted) of argmax predictions in one training batch (labels or scored pixels)."""
        pred = logits.detach().argmax(1)
        valid = targets != self.ignore_index if self.ignore_index is not None else None
        hits = pred == targets
        if valid is not None:
            return int((hits & valid).sum()), int(valid.sum())
        return int(hits.sum()), int(targets.numel())

    def check_outputs(self, logits, targets, model_name: str = "the model") -> None:
        """A one-line error when the model's output does not fit this task's targets."""

    # -- pruning and export
    def output_layers(self, model) -> list:
        """The layers whose outputs are the predictions: pruning never removes their output channels."""
        raise NotImplementedError

    def export_module(self, model, raw: bool = False, exporter: str = "torchscript"):
        """``(module, output names)``: what export writes to ONNX for ``model`` (with ``exporter``)."""
        from deploycomp.export import OUTPUT_NAME

        check(not raw, f"--raw exports a detector's head without its post-processing; a {self.name} model has "
                       "none: drop --raw")
        return model, (OUTPUT_NAME,)

    def export_record(self, raw: bool = False) -> dict[str, Any]:
        """What the ONNX sidecar records about the task's outputs, beyond the common fields."""
        return {}

    def check_parity(self, module, onnx_path, groups: dict, atol: float, rtol: float) -> dict[str, Any]:
        """PyTorch (``module``) against ONNX Runtime on every group of inputs (see export.check_parity)."""
        from deploycomp.export import check_parity

        return check_parity(module, onnx_path, groups, atol, rtol)

    def summary(self, metrics: dict[str, Any]) -> str:
        """The metrics of one evaluation in a few words, for the console."""
        return f"{self.label} {metrics[self.metric]:.2f}%"

    def describe(self) -> dict[str, Any]:
        return {"task": self.name, "metric": self.metric, "num_classes": self.num_classes,
                "ignore_index": self.ignore_index}


class Meter:
    """Accumulates predictions over batches: ``update(logits, targets)``, then ``result()``."""

    def update(self, logits, targets) -> None:
        raise NotImplementedError

    def result(self) -> dict[str, Any]:
        raise NotImplementedError


def _last_linear(model) -> list:
    import torch.nn as nn

    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1:]


# --------------------------------------------------------------------------------------------------
# Classification: one label per image


class _TopK(Meter):
    def __init__(self):
        self.n = self.correct1 = self.correct5 = 0

    def update(self, logits, targets) -> None:
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        self.correct1 += int((top[:, 0] == targets).sum())
        self.correct5 += int((top == targets[:, None]).any(dim=1).sum())
        self.n += len(targets)

    def result(self) -> dict[str, Any]:
        n = max(self.n, 1)
        return {"top1_pct": 100.0 * self.correct1 / n, "top5_pct": 100.0 * self.correct5 / n, "samples": self.n}


@register_task("classification")
class Classification(Task):
    metric, label, train_metric = "top1_pct", "top-1", "top1_pct"
    agreement, target = "top-1 agreement", "a class label per image"

    def meter(self) -> Meter:
        return _TopK()

    def summary(self, metrics: dict[str, Any]) -> str:
        return f"top-1 {metrics['top1_pct']:.2f}%  top-5 {metrics['top5_pct']:.2f}%"

    def check_outputs(self, logits, targets, model_name: str = "the model") -> None:
        if logits.ndim != 2:
            raise UsageError(f"{model_name} returns {tuple(logits.shape)} outputs where a classifier returns "
                             "(batch, classes): is it a segmentation model? give segmentation data "
                             "(--data fashion-scenes or voc)")

    def output_layers(self, model) -> list:
        return _last_linear(model)


# --------------------------------------------------------------------------------------------------
# Semantic segmentation: a class per pixel


class _Confusion(Meter):
    def __init__(self, num_classes: int, ignore_index: int | None):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.conf = None
        self.n = 0

    def update(self, logits, targets) -> None:
        from deploycomp.tasks.seg_metrics import confusion_matrix

        conf = confusion_matrix(logits.argmax(1), targets, self.num_classes, self.ignore_index)
        self.conf = conf if self.conf is None else self.conf + conf
        self.n += len(targets)

    def result(self) -> dict[str, Any]:
        from deploycomp.tasks.seg_metrics import scores

        if self.conf is None:
            return {"miou_pct": float("nan"), "pixel_acc_pct": float("nan"), "samples": 0}
        return {**scores(self.conf), "samples": self.n}


@register_task("segmentation")
class Segmentation(Task):
    metric, label, train_metric = "miou_pct", "mIoU", "pixel_acc_pct"
    agreement, target = "pixel agreement", "a class mask per image"

    def meter(self) -> Meter:
        return _Confusion(self.num_classes, self.ignore_index)

    def summary(self, metrics: dict[str, Any]) -> str:
        return f"mIoU {metrics['miou_pct']:.2f}%  pixel accuracy {metrics['pixel_acc_pct']:.2f}%"

    def check_outputs(self, logits, targets, model_name: str = "the model") -> None:
        if logits.ndim != 4:
            raise UsageError(f"{model_name} returns {tuple(logits.shape)} outputs where a segmentation model returns "
                             "(batch, classes, height, width): is it a classifier? give classification data "
                             "(e.g. --data fashion-mnist) or a segmentation model")
        if tuple(logits.shape[-2:]) != tuple(targets.shape[-2:]):
            raise UsageError(f"{model_name} returns {tuple(logits.shape[-2:])} logit maps for "
                             f"{tuple(targets.shape[-2:])} masks: a segmentation model must upsample its "
                             "logits to the input size")

    def output_layers(self, model) -> list:
        """Every convolution that produces the classes (torchvision's ``classifier``/``aux_classifier``
        heads, LR-ASPP's ``low_classifier``/``high_classifier``, a UNet's last layer), else the last one.

        A convolution inside the network that happens to have ``num_classes`` outputs is protected too:
        that costs a little pruning, never a broken head.
        """
        import torch.nn as nn

        convs = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
        return [m for m in convs if m.out_channels == self.num_classes] or convs[-1:]


# --------------------------------------------------------------------------------------------------
# Object detection: boxes and their classes


class _MeanAP(Meter):
    def __init__(self, task):
        from deploycomp.tasks.det_metrics import MeanAP

        self.task, self.inner = task, MeanAP(task.num_classes)

    def update(self, outputs, targets) -> None:
        self.inner.update(self.task.detections(outputs), targets)

    def result(self) -> dict[str, Any]:
        return self.inner.result()


PARITY_MATCH_PCT = 99.0  # of confident detections, each way, for export parity of a post-processed detector


def _match_report(match: dict, images: int) -> dict[str, Any]:
    """One parity entry: the smaller of both directions' match rates (reference detections found, and
    found detections that match a reference), in the fields parity lines print."""
    pct = min(match["matched_pct"], match["got_matched_pct"])
    return {"agreement": "detection match", "top1_agreement_pct": pct, "samples": images,
            "max_abs_diff": match.get("max_score_diff") or 0.0, "diff_of": "scores of matched detections",
            "matched": match}


@register_task("detection")
class Detection(Task):
    """Targets are (M, 5) rows ``[label, x1, y1, x2, y2]`` (label -1: padding); a model returns either the
    raw ``(N, A, 4 + C)`` of a dense head (:mod:`deploycomp.tasks.dense_det`), post-processed here as in
    its exported graph, or, for end-to-end models (torchvision's, ``returns_detections = True``), the
    four post-processed outputs ``(num_detections, boxes, scores, labels)``. The loss is the model's own
    ``detection_loss(images, targets, outputs)``; the metric COCO mAP@[.5:.95] (pycocotools)."""

    metric, label, train_metric = "map_pct", "mAP", ""
    agreement, target = "detection match", "boxes and their classes per image"
    max_det, score_threshold, iou_threshold = MAX_DET, SCORE_THRESHOLD, IOU_THRESHOLD  # post-processing

    def loss(self, label_smoothing: float = 0.0, model=None):
        import torch

        if model is None or not hasattr(model, "detection_loss"):
            raise UsageError(f"{type(model).__name__} has no detection_loss(images, targets, outputs): a "
                             "detector deploycomp trains defines one (see docs/detection.md)")

        def loss(outputs, inputs, targets):
            if isinstance(outputs, (tuple, list)) and not torch.is_grad_enabled():
                return torch.tensor(float("nan"))  # an end-to-end model computes its losses in train mode only
            return model.detection_loss(inputs, targets, None if isinstance(outputs, (tuple, list)) else outputs)

        return loss

    def kd_loss(self, teacher, temperature: float, alpha: float, lam: float):
        """Dense-head to dense-head: soft classes and teacher-weighted boxes (:func:`dense_det.distillation_loss`)."""
        from deploycomp.tasks.dense_det import distillation_loss

        if getattr(teacher, "returns_detections", False):
            raise UsageError(f"{type(teacher).__name__} returns post-processed detections (torchvision's); detection "
                             "distillation needs a dense-head teacher (e.g. light_det or YOLO-style user code)")
        return distillation_loss(teacher, temperature, alpha, lam)

    def train_step(self, net, x, y, criterion):
        if getattr(getattr(net, "module", net), "returns_detections", False):
            return None, criterion((), x, y)  # its forward in train mode is its loss: run once, by the loss
        return super().train_step(net, x, y, criterion)

    def meter(self) -> Meter:
        return _MeanAP(self)

    def detections(self, outputs):
        """Dense detections (N, K, 6) ``[x1, y1, x2, y2, score, label]`` from a model's outputs."""
        from deploycomp.tasks.det_post import as_dense, postprocess

        if isinstance(outputs, (tuple, list)):
            return as_dense(*outputs)
        return as_dense(*postprocess(outputs, self.max_det, self.score_threshold, self.iou_threshold))

    def from_onnx(self, outputs: list):
        import torch

        tensors = [torch.from_numpy(o) for o in outputs]
        return tensors[0] if len(tensors) == 1 else tuple(tensors)

    def predictions(self, outputs):
        return self.detections(outputs)

    def agreement_pct(self, ref, new) -> float:
        from deploycomp.tasks.det_post import match_detections

        return float(match_detections(ref, new)["matched_pct"])

    def export_module(self, model, raw: bool = False, exporter: str = "torchscript"):
        """End-to-end models export as they are; a dense head with :class:`det_post.DetectionExport` (boxes,
        scores, labels after class-wise NMS, ``max_det`` of them), or alone with ``raw``. The in-graph NMS
        is written by the TorchScript exporter only (its symbolic emits ONNX NonMaxSuppression)."""
        from deploycomp.tasks.det_post import OUTPUT_NAMES, RAW_OUTPUT_NAMES, DetectionExport

        if getattr(model, "returns_detections", False):
            check(not raw, f"{type(model).__name__} computes its detections inside its forward (torchvision's "
                           "post-processing); it has no raw head output to export: drop --raw")
            return model, OUTPUT_NAMES
        if raw:
            return model, RAW_OUTPUT_NAMES
        check(exporter == "torchscript", f"a detector's post-processing (NMS) exports with the torchscript exporter "
                                         f"only, not {exporter}: drop --exporter, or export the head alone with --raw")
        wrapper = DetectionExport(model, self.max_det, self.score_threshold, self.iou_threshold)
        return wrapper.train(model.training), OUTPUT_NAMES  # a new module is in train mode: take the model's

    def export_record(self, raw: bool = False) -> dict[str, Any]:
        return {"postprocess": None if raw else {"nms": "class-wise", "max_detections": self.max_det,
                                                  "score_threshold": self.score_threshold,
                                                  "iou_threshold": self.iou_threshold}}

    def check_parity(self, module, onnx_path, groups: dict, atol: float, rtol: float) -> dict[str, Any]:
        """Raw heads: numerically, as logits. Post-processed graphs: by matched detections (same label,
        IoU and score within tolerance, :func:`det_post.match_detections`), both ways; passes when at
        least ``PARITY_MATCH_PCT`` of each side's confident detections are matched."""
        import torch

        from deploycomp.export import ort_run_all, ort_session
        from deploycomp.tasks.det_post import DetectionExport, match_detections

        if not (isinstance(module, DetectionExport) or getattr(module, "returns_detections", False)):
            return super().check_parity(module, onnx_path, groups, atol, rtol)  # a raw head: its tensor
        session = ort_session(onnx_path)
        report: dict[str, Any] = {"runtime": "onnxruntime CPU", "criterion": "matched detections",
                                  "min_match_pct": PARITY_MATCH_PCT}
        refs, outs = [], []
        for kind, batches in groups.items():
            with torch.no_grad():
                ref = torch.cat([self.detections(module(x)) for x in batches])
            out = torch.cat([self.detections(self.from_onnx(ort_run_all(session, x))) for x in batches])
            report[kind] = _match_report(match_detections(ref, out), len(ref))
            refs.append(ref)
            outs.append(out)
        ref, out = torch.cat(refs), torch.cat(outs)
        report.update(_match_report(match_detections(ref, out), len(ref)))
        report["passed"] = bool(report["top1_agreement_pct"] >= PARITY_MATCH_PCT)
        if not report["passed"]:
            report["failure"] = ("ONNX Runtime's detections match PyTorch's for only "
                                 f"{report['top1_agreement_pct']:.1f}% (at least {PARITY_MATCH_PCT:g}% needed)")
        return report

    def train_accuracy(self, logits, targets) -> tuple[int, int]:
        return 0, 0  # no running accuracy: the loss is what a detector's epoch line shows

    def summary(self, metrics: dict[str, Any]) -> str:
        return f"mAP {metrics['map_pct']:.2f}%  mAP@.5 {metrics['map50_pct']:.2f}%"

    def check_outputs(self, logits, targets, model_name: str = "the model") -> None:
        if isinstance(logits, (tuple, list)):
            if len(logits) != 4:
                raise UsageError(f"{model_name} returns {len(logits)} outputs where an end-to-end detector returns "
                                 "4 (num_detections, boxes, scores, labels)")
            return
        if logits.ndim != 3 or logits.shape[-1] != 4 + self.num_classes:
            raise UsageError(f"{model_name} returns {tuple(logits.shape)} outputs where a detector of "
                             f"{self.num_classes} classes returns (batch, points, 4 + {self.num_classes}): is it a "
                             "classifier or a segmenter? give it data of its task, or a detector")

    def output_layers(self, model) -> list:
        """The model's ``protected_layers()`` if it has one (torchvision detectors, user code), else every
        convolution producing the classes or the four box values (a dense head's predictors)."""
        import torch.nn as nn

        if hasattr(model, "protected_layers"):
            return list(model.protected_layers())
        convs = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        outs = {self.num_classes, 4}
        return [m for m in convs if getattr(m, "out_channels", getattr(m, "out_features", None)) in outs] \
            or convs[-1:]


# --------------------------------------------------------------------------------------------------
# Resolving the task of a run


def get_task(name: str | None, num_classes: int, ignore_index: int | None = None) -> Task:
    return TASKS.get(name or DEFAULT_TASK)(num_classes, ignore_index)


def task_for_data(info) -> Task:
    """The task of a dataset (:class:`deploycomp.data.DatasetInfo`)."""
    return get_task(getattr(info, "task", None), info.num_classes, getattr(info, "ignore_index", None))


def task_of_checkpoint(ckpt) -> str:
    """The task a checkpoint records, else the one its architecture declares, else classification."""
    recorded = ckpt.metadata.get("task")
    if recorded:
        return recorded
    try:
        from deploycomp.zoo import get_spec

        return get_spec(ckpt.arch).task
    except Exception:  # noqa: BLE001  an arch the zoo cannot resolve (a pickled module): the default
        return DEFAULT_TASK


def check_same_task(model_task: str, data_task: str, model: str, data: str) -> None:
    """A one-line error when a model of one task meets data of another (``model_task`` None: the model
    declares none, user code, and follows the data)."""
    if model_task is not None and model_task != data_task:
        hint = {"segmentation": "--data fashion-scenes (or voc with --data-dir)",
                "detection": "--data fashion-scenes-det (or coco with --data-dir)",
                "classification": "--data fashion-mnist (or another classification set)"}.get(model_task, "")
        raise UsageError(f"model {model} is a {model_task} model but dataset {data} is for {data_task}; "
                         f"give {model_task} data{': ' + hint if hint else ''}")
