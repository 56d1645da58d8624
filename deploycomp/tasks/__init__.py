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

from deploycomp.errors import UsageError
from deploycomp.registry import Registry

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
    def loss(self, label_smoothing: float = 0.0):
        """``(logits, inputs, targets) -> loss``: cross-entropy over the class axis (dim 1)."""
        import torch.nn.functional as F

        ignore = -100 if self.ignore_index is None else self.ignore_index

        def loss(logits, inputs, targets):
            return F.cross_entropy(logits, targets, label_smoothing=label_smoothing, ignore_index=ignore)

        return loss

    def meter(self) -> Meter:
        raise NotImplementedError

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
                "classification": "--data fashion-mnist (or another classification set)"}.get(model_task, "")
        raise UsageError(f"model {model} is a {model_task} model but dataset {data} is for {data_task}; "
                         f"give {model_task} data{': ' + hint if hint else ''}")
