"""What ``deploycomp info`` reports about a model, as a plain dict."""

from __future__ import annotations

import os
from typing import Any


def describe(model: str | None, *, input_size: tuple[int, int] | None = None, batch: int = 1,
             **model_options) -> dict[str, Any]:
    from deploycomp.checkpoint import load_model
    from deploycomp.errors import check
    from deploycomp.metrics import layer_channels, memory_summary, model_metrics
    from deploycomp.resources import check_forward_fits

    check(batch > 0, f"--batch must be positive, got {batch}")
    ckpt = load_model(model, input_size=input_size, **model_options)
    shape = (ckpt.input_shape[0], *input_size) if input_size else ckpt.input_shape
    check_forward_fits(ckpt.model, shape, batch, "--batch or --input-size")
    from deploycomp.tasks import task_of_checkpoint

    report = {"model": ckpt.source or ckpt.arch, "arch": ckpt.arch, "task": task_of_checkpoint(ckpt),
              "model_kwargs": ckpt.model_kwargs,
              **model_metrics(ckpt.model, shape), "batch": batch, "memory": memory_summary(ckpt.model, shape, batch),
              "file_size_mib": os.path.getsize(ckpt.source) / 2**20 if ckpt.source else None,
              "layers": layer_channels(ckpt.model), "surgeries": [s["op"] for s in ckpt.surgeries]}
    for key in ("dataset", "metrics", "lineage", "synthetic"):
        if key in ckpt.metadata:
            report[key] = ckpt.metadata[key]
    return report


def list_registered(models: bool, datasets: bool) -> list[str]:
    from deploycomp.data import DATASETS
    from deploycomp.zoo import MODELS, get_spec, list_models

    lines = []
    if models:
        names = list_models()
        lines.append("deploycomp built-ins:")
        lines += [f"  {n:<22} {get_spec(n).description}" for n in names if MODELS.get(n).source == "deploycomp"]
        for task in ("classification", "segmentation", "detection"):
            lines.append(f"torchvision {task} models: " + ", ".join(
                n for n in names if MODELS.get(n).source == "torchvision" and MODELS.get(n).task == task))
        lines.append(f"timm models: timm:NAME ({_timm_status()})")
        lines.append("your own code: path/to/file.py:factory or package.module:factory (a callable returning an "
                     "nn.Module; --model-kwargs, --weights FILE)")
    if datasets:
        lines += [f"{n:<18} {DATASETS.get(n).description}" for n in DATASETS.names()]
    return lines


def _timm_status() -> str:
    try:
        import timm
    except ImportError:
        return 'timm is not installed: pip install "deploycomp[timm]"'
    return f"timm {timm.__version__}, {len(timm.list_models())} architectures"
