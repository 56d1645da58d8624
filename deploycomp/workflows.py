"""Library entry points behind the CLI commands: each loads, runs, records and saves one stage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deploycomp import console
from deploycomp.errors import UsageError
from deploycomp.files import check_output, write_sidecar


def default_output(name: str, suffix: str, ext: str = ".pt") -> Path:
    return Path(f"{name}-{suffix}{ext}")


def run_training(model: str | None, config, *, output: str | None = None, data: str | None = None,
                 data_dir: str | None = None, resume: bool = False, loss_fn=None, penalties=(),
                 lineage: dict[str, Any] | None = None, prepare=None, op: str = "train", after_epoch=None,
                 finish=None, **model_options) -> dict[str, Any]:
    """Train ``model`` with ``config``; save the checkpoint and its JSON record on the main process.

    ``prepare(ckpt, data)``, when given, edits or checks the loaded model before training (freezing,
    stochastic depth, a teacher/student check); ``op`` names the operation in the lineage and record.
    ``after_epoch()`` runs on every process after each epoch's training (QAT's range update);
    ``finish(ckpt)`` after training and the final evaluation, before the checkpoint is saved (QAT detaches
    its fake quantization there, and may add to ``lineage``).
    """
    from deploycomp.inputs import load_inputs
    from deploycomp.metrics import model_metrics
    from deploycomp.train import distributed_rank, fit

    config.validate()  # cheap checks before loading anything
    ckpt, ds = load_inputs(model, data=data, data_dir=data_dir, augment=True, **model_options)
    out = Path(output) if output else default_output(ckpt.name, "trained")
    check_output(out, ckpt.source)
    if prepare is not None:
        prepare(ckpt, ds)
    resume_path = Path(f"{out}.resume.pt")
    if resume_path.exists() and not resume:
        raise UsageError(f"{resume_path} holds the state of an interrupted run of this command; continue it with "
                         "--resume, or delete it to start over")
    if ds.info.synthetic:
        console.warn(f"{op} on synthetic data: the model learns random tensors; use the result only to test the "
                     "plumbing")
    console.info(f"training {ckpt.source or ckpt.arch} on {ds.info.name} for {config.epochs} epochs -> {out}")
    result = fit(ckpt.model, ds.train, ds.test, config, loss_fn=loss_fn, penalties=penalties,
                 resume_path=resume_path, resume=resume, keep_resume=True, task=ds.task, after_epoch=after_epoch)
    if config.val_samples is not None and config.val_samples < len(ds.test) and result.final:
        # the epochs were validated on a subset; what the checkpoint calls "test" is the whole test split
        from deploycomp.train import evaluate

        final = evaluate(ckpt.model, ds.test, device=config.device, description="test", task=ds.task)
        result.final = {k: v for k, v in final.items() if isinstance(v, (int, float))}
    if finish is not None:
        finish(ckpt)
    params = {"dataset": ds.info.name, **vars(config), **(lineage or {})}
    ckpt.add_lineage(op, **params)
    ckpt.metadata["metrics"] = {"test": result.final}
    record = {"command": op, "output": str(out), "params": params, "history": result.history,
              "test": result.final, "train_seconds": result.seconds, "synthetic": ds.info.synthetic,
              **model_metrics(ckpt.model, ckpt.input_shape)}
    if distributed_rank() == 0:
        ckpt.save(out)
        write_sidecar(out, record)
        resume_path.unlink(missing_ok=True)  # only now: an interruption before the save loses no training
        score = ds.task.summary(result.final) if ds.task.metric in result.final else "not evaluated"
        qat = (lineage or {}).get("qat")
        simulated = f" with INT8 simulated for {qat['target']}" if qat else ""
        console.info(f"wrote {out}: test {score}{simulated} "
                     f"after {config.epochs} epochs ({result.seconds:.0f} s)")
        if qat:
            console.info(f"its INT8 graph: deploycomp export --model {out} -o MODEL.onnx && "
                         f"deploycomp quantize MODEL.onnx -p int8 --target {qat['target']}"
                         + (" --quantize-all-layers" if qat.get("all_layers") else ""))
    return record
