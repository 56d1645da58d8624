"""Resolve the model and dataset a command works on, and make them agree with each other."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from deploycomp import console
from deploycomp.checkpoint import Checkpoint, _looks_like_path, default_model, load_model
from deploycomp.data import DatasetInfo, ModelInputs, get_dataset_spec, load_dataset
from deploycomp.errors import UsageError
from deploycomp.tasks import check_same_task, task_of_checkpoint

DEFAULT_DATASET = "fashion-mnist"
DEFAULT_DATASETS = {"classification": DEFAULT_DATASET, "segmentation": "fashion-scenes",
                    "detection": "fashion-scenes-det"}  # per task


@dataclass
class Data:
    info: DatasetInfo
    test: Any  # torch Dataset
    train: Any = None  # torch Dataset (None when the command needs no training data)

    @property
    def task(self):
        """The :class:`deploycomp.tasks.Task` of this data (its loss, metrics, protected layers)."""
        from deploycomp.tasks import task_for_data

        return task_for_data(self.info)


def default_dataset(task: str | None) -> str:
    return DEFAULT_DATASETS.get(task or "classification", DEFAULT_DATASET)


def load_inputs(model: str | None = None, *, data: str | None = None, data_dir: str | None = None,
                need_train: bool = True, augment: bool = False, input_size: tuple[int, int] | None = None,
                **model_options) -> tuple[Checkpoint, Data]:
    """The checkpoint (or fresh model) and its dataset, made to agree.

    A fresh model takes its classes and input channels from the dataset, except from a dataset that
    follows the model (synthetic), which takes the model's classes, channels and input size instead.
    A checkpoint's dataset (from its metadata) is the default dataset. A mismatch is an error.
    """
    ref = model or default_model()
    options = {k: v for k, v in model_options.items() if v is not None}
    ckpt = None
    if _looks_like_path(ref):
        ckpt = load_model(ref, **options)
        name = data or ckpt.metadata.get("dataset") or default_dataset(task_of_checkpoint(ckpt))
        if input_size is None and ckpt.metadata.get("input_shape"):
            input_size = tuple(ckpt.metadata["input_shape"][1:])
    else:
        name = data or default_dataset(model_task(ref))
        if get_dataset_spec(name).follows_model:
            ckpt = load_model(ref, input_size=input_size, **options)
            input_size = input_size or tuple(ckpt.input_shape[1:])
    fit = model_inputs(ckpt, input_size) if ckpt is not None else ModelInputs(channels=options.get("in_channels"))
    test, info = load_dataset(name, "test", data_dir, input_size=input_size, fit=fit)
    if ckpt is None:
        options.setdefault("num_classes", info.num_classes)
        options.setdefault("in_channels", info.input_shape[0])
        ckpt = load_model(ref, input_size=tuple(info.input_shape[1:]), **options)
    check_same_task(task_of_checkpoint(ckpt), info.task, ref, name)
    if ckpt.num_classes is not None and ckpt.num_classes != info.num_classes:
        raise UsageError(f"model {ref} has {ckpt.num_classes} classes but dataset {name} has {info.num_classes}; "
                         "pick the matching --data, or a fresh model with --num-classes")
    channels = ckpt.in_channels
    if channels is not None and channels != info.input_shape[0]:
        raise UsageError(f"model {ref} takes {channels}-channel input but dataset {name} has "
                         f"{info.input_shape[0]} channels; use a model built with --in-channels {info.input_shape[0]}")
    for key, value in info.as_dict().items():
        ckpt.metadata.setdefault(key, value)
    ckpt.metadata["input_shape"] = list(info.input_shape)
    if info.synthetic:
        console.warn(f"dataset {name!r} is synthetic random data: accuracies computed on it mean nothing")
    train = None
    if need_train:
        train = load_dataset(name, "train", data_dir, augment=augment, input_size=input_size, fit=fit)[0]
    return ckpt, Data(info, test, train)


def model_inputs(ckpt: Checkpoint, input_size: tuple[int, int] | None = None) -> ModelInputs:
    """What ``ckpt`` takes (channels, size, classes, normalisation), for datasets that adapt to the model."""
    meta = ckpt.metadata
    mean, std = meta.get("mean"), meta.get("std")
    return ModelInputs(channels=ckpt.in_channels, size=tuple(input_size or ckpt.input_shape[1:]),
                       num_classes=ckpt.num_classes, mean=tuple(mean) if mean else None,
                       std=tuple(std) if std else None)


def model_task(ref: str) -> str:
    """The task a zoo model, ``timm:NAME`` or user code declares (classification when it declares none)."""
    from deploycomp.zoo import get_spec

    return get_spec(ref).task
