"""Recipe sections -> library configs ("None means default": only the keys given are passed)."""

from __future__ import annotations

import inspect
from typing import Any


def _given(d: dict | None, drop: tuple[str, ...] = ()) -> dict[str, Any]:
    return {k: v for k, v in (d or {}).items() if v is not None and k not in drop}


TRAIN_EXTRAS = ("sparsity", "stochastic_depth", "freeze", "model")


def train_config(t: dict | None, device: str | None = None):
    from deploycomp.train import TrainConfig

    return TrainConfig(**_given(t, TRAIN_EXTRAS), **({"device": device} if device else {}))


def prune_config(p: dict, device: str | None, eval_samples: int | None = None, eval_batch: int | None = None):
    from deploycomp.prune import PruneConfig, finetune_config

    kw = _given(p, ("finetune",))
    if "finetune" in p:  # null: no fine-tuning; a mapping: these options (SGD lr 0.01 unless given)
        ft = p["finetune"]
        kw["finetune"] = None if ft is None else finetune_config(**_given(ft, TRAIN_EXTRAS),
                                                                 **({"device": device} if device else {}))
    else:  # the default fine-tuning of `deploycomp prune` (1 epoch, SGD lr 0.01)
        kw["finetune"] = finetune_config(1, **({"device": device} if device else {}))
    if device:
        kw["device"] = device
    if eval_samples is not None:
        kw["eval_samples"] = eval_samples
    if eval_batch is not None:
        kw["eval_batch"] = eval_batch
    return PruneConfig(**kw)


def _distill_params(d: dict) -> dict[str, Any]:
    from deploycomp.distill import check_kd_params, run_distillation

    sig = inspect.signature(run_distillation)
    kd = {k: d.get(k, sig.parameters[k].default) for k in ("temperature", "alpha", "lam")}
    check_kd_params(kd["temperature"], kd["alpha"], kd["lam"])
    train_config(d.get("train")).validate()
    return kd


def bench_config(b: dict, backend: str, device: str | None):
    from deploycomp.bench import BenchConfig

    given = _given(b, ("backends", "backend"))
    if isinstance(given.get("memory"), list | tuple):  # memory: [ort] -> only that backend's stage measures it
        given["memory"] = backend in given["memory"]
    return BenchConfig(backend=backend, device=device, **given)
