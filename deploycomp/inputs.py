"""Resolve the model and dataset a command works on, and make them agree with each other."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from deploycomp import console
from deploycomp.checkpoint import Checkpoint, _looks_like_path, default_model, load_model
from deploycomp.data import DatasetInfo, load_dataset
from deploycomp.errors import UsageError

DEFAULT_DATASET = "fashion-mnist"


@dataclass
class Data:
    info: DatasetInfo
    test: Any  # torch Dataset
    train: Any = None  # torch Dataset (None when the command needs no training data)


def load_inputs(model: str | None = None, *, data: str | None = None, data_dir: str | None = None,
                need_train: bool = True, augment: bool = False, input_size: tuple[int, int] | None = None,
                **model_options) -> tuple[Checkpoint, Data]:
    """The checkpoint (or fresh zoo model) and its dataset.

    A fresh zoo model takes its classes and input channels from the dataset; a checkpoint's dataset
    (from its metadata) is the default dataset. A class-count mismatch is an error.
    """
    ref = model or default_model()
    fresh = not _looks_like_path(ref)
    if fresh:
        name = data or DEFAULT_DATASET
        test, info = load_dataset(name, "test", data_dir, input_size=input_size)
        model_options.setdefault("num_classes", info.num_classes)
        model_options.setdefault("in_channels", info.input_shape[0])
        ckpt = load_model(ref, **{k: v for k, v in model_options.items() if v is not None})
    else:
        ckpt = load_model(ref, **{k: v for k, v in model_options.items() if v is not None})
        name = data or ckpt.metadata.get("dataset") or DEFAULT_DATASET
        if input_size is None and ckpt.metadata.get("input_shape"):
            input_size = tuple(ckpt.metadata["input_shape"][1:])
        test, info = load_dataset(name, "test", data_dir, input_size=input_size)
    if ckpt.num_classes is not None and ckpt.num_classes != info.num_classes:
        raise UsageError(f"model {ref} has {ckpt.num_classes} classes but dataset {name} has {info.num_classes}; "
                         "pick the matching --data, or a fresh model with --num-classes")
    channels = ckpt.model_kwargs.get("in_channels")
    if channels is not None and channels != info.input_shape[0]:
        raise UsageError(f"model {ref} takes {channels}-channel input but dataset {name} has "
                         f"{info.input_shape[0]} channels; use a model built with --in-channels {info.input_shape[0]}")
    for key, value in info.as_dict().items():
        ckpt.metadata.setdefault(key, value)
    ckpt.metadata["input_shape"] = list(info.input_shape)
    if info.synthetic:
        console.warn(f"dataset {name!r} is synthetic random data: accuracies computed on it mean nothing")
    train = load_dataset(name, "train", data_dir, augment=augment, input_size=input_size)[0] if need_train else None
    return ckpt, Data(info, test, train)
