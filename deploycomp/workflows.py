"""Library entry points behind the CLI commands: each loads, runs, records and saves one stage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deploycomp import console
from deploycomp.files import ensure_not_input, sidecar_path, write_json


def default_output(name: str, suffix: str, ext: str = ".pt") -> Path:
    return Path(f"{name}-{suffix}{ext}")


def run_training(model: str | None, config, *, output: str | None = None, data: str | None = None,
                 data_dir: str | None = None, resume: bool = False, loss_fn=None, penalties=(),
                 lineage: dict[str, Any] | None = None, prepare=None, op: str = "train",
                 **model_options) -> dict[str, Any]:
    """Train ``model`` with ``config``; save the checkpoint and its JSON record on the main process.

    ``prepare(ckpt, data)``, when given, edits or checks the loaded model before training (freezing,
    stochastic depth, a teacher/student check); ``op`` names the operation in the lineage and record.
    """
    from deploycomp.inputs import load_inputs
    from deploycomp.metrics import model_metrics
    from deploycomp.train import distributed_rank, fit

    ckpt, ds = load_inputs(model, data=data, data_dir=data_dir, augment=True, **model_options)
    out = Path(output) if output else default_output(ckpt.name, "trained")
    ensure_not_input(out, ckpt.source)
    if prepare is not None:
        prepare(ckpt, ds)
    if ds.info.synthetic:
        console.warn(f"{op} on synthetic data: the model learns random tensors; use the result only to test the "
                     "plumbing")
    console.info(f"training {ckpt.source or ckpt.arch} on {ds.info.name} for {config.epochs} epochs -> {out}")
    result = fit(ckpt.model, ds.train, ds.test, config, loss_fn=loss_fn, penalties=penalties,
                 resume_path=f"{out}.resume.pt", resume=resume)
    params = {"dataset": ds.info.name, **vars(config), **(lineage or {})}
    ckpt.add_lineage(op, **params)
    ckpt.metadata["metrics"] = {"test": result.final}
    record = {"command": op, "output": str(out), "params": params, "history": result.history,
              "test": result.final, "train_seconds": result.seconds, "synthetic": ds.info.synthetic,
              **model_metrics(ckpt.model, ckpt.input_shape)}
    if distributed_rank() == 0:
        ckpt.save(out)
        write_json(sidecar_path(out), record)
        console.info(f"wrote {out}: test top-1 {result.final.get('top1_pct', float('nan')):.2f}% "
                     f"after {config.epochs} epochs ({result.seconds:.0f} s)")
    return record
