"""Pipeline stages: the :data:`STAGES` registry, the stage graph node and one function per stage kind.

A stage is identified by a hash of its kind, its options, its parent stage's hash, its other inputs and
the deploycomp version (:attr:`Stage.key`); the runner stores its artifact and record under
``RUN_DIR/stages/<kind>-<key>/``. Adding a stage kind: a function taking a :class:`StageRun`, writing
its artifact into ``run.dir`` and returning its record, decorated with :func:`register_stage`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deploycomp import __version__, console
from deploycomp.errors import UsageError
from deploycomp.pipeline.configs import _distill_params, _given, bench_config, prune_config, train_config
from deploycomp.registry import Registry

if TYPE_CHECKING:
    from deploycomp.pipeline.plan import StudyPlan
    from deploycomp.pipeline.run import PipelineRun

MODEL_FILE = "model.pt"


@dataclass(frozen=True)
class StageKind:
    name: str
    run: Callable[..., dict[str, Any]]  # (StageRun) -> record; writes the artifact into run.dir
    artifact: str | None  # file name of the artifact inside the stage directory (None: the record only)
    produces_model: bool = False  # a checkpoint later stages continue from


STAGES: Registry[StageKind] = Registry("pipeline stage")


def register_stage(name: str, artifact: str | None, produces_model: bool = False):
    def wrap(fn):
        STAGES.register(name, StageKind(name, fn, artifact, produces_model))
        return fn

    return wrap


@dataclass
class Stage:
    """One node of the stage graph."""

    kind: str
    options: dict[str, Any]  # what the stage does (JSON-able; part of the key)
    parent: Stage | None
    label: str  # "magnitude-30: prune" in progress lines
    inputs: dict[str, str] = field(default_factory=dict)  # other inputs by identity (file hashes, stage keys)
    local: dict[str, Any] = field(default_factory=dict)  # facts of this machine that are not identity (paths)
    key: str = ""

    def __post_init__(self):
        ident = {"kind": self.kind, "options": self.options, "parent": self.parent.key if self.parent else None,
                 "inputs": self.inputs, "deploycomp": __version__}
        blob = json.dumps(ident, sort_keys=True, default=str)
        self.key = hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def id(self) -> str:
        return f"{self.kind}-{self.key}"


@dataclass
class StageRun:
    """What a stage function gets: its node, its directory, the study's data and the parent's outputs."""

    stage: Stage
    dir: Path
    runner: PipelineRun
    study: StudyPlan

    @property
    def options(self) -> dict[str, Any]:
        return self.stage.options

    def parent_artifact(self) -> Path:
        return self.runner.artifact_of(self.stage.parent)

    def parent_record(self) -> dict[str, Any]:
        return self.runner.record_of(self.stage.parent)

    def ref(self, key: str) -> Any:
        """Option ``key`` as this machine resolves it (user code found beside the recipe), else as written."""
        return self.stage.local.get(key, self.options.get(key))

    def load_checkpoint(self, path: Path):
        """A checkpoint of this run; one built from user code the recipe names is rebuilt with that code."""
        from deploycomp.checkpoint import load_checkpoint

        return load_checkpoint(path, arch=self.study.consented_arch(path))

    def load_parent_checkpoint(self):
        return self.load_checkpoint(self.parent_artifact())

    def data(self, need_train: bool = False):
        return self.study.dataset(need_train)


def _save_model(ckpt, run: StageRun) -> Path:
    """The stage's model, saved into its directory: a new artifact of the run (its lineage continues from here)."""
    ckpt.source = None
    out = run.dir / MODEL_FILE
    ckpt.save(out)
    return out


@register_stage("load", MODEL_FILE, produces_model=True)
def _stage_load(run: StageRun) -> dict[str, Any]:
    """The original model, with the dataset's metadata, saved into the run (every size compares like with like)."""
    from deploycomp.inputs import load_inputs
    from deploycomp.metrics import model_metrics

    o = run.options
    ckpt, ds = load_inputs(run.stage.local["model_path"], data=o.get("data"), data_dir=run.stage.local["data_dir"],
                           need_train=False, input_size=tuple(o["input_size"]) if o.get("input_size") else None,
                           arch=run.ref("arch"), code_option=f"the recipe key {run.study.study.path}arch:")
    run.study.use_data(ds)
    _save_model(ckpt, run)
    return {"model": o["model"], "arch": ckpt.arch, "dataset": ds.info.as_dict(),
            **model_metrics(ckpt.model, ckpt.input_shape)}


def _fresh_model(name: str, run: StageRun):
    from deploycomp.checkpoint import load_model

    info = run.study.data_info()
    ckpt = load_model(name, num_classes=info.num_classes, in_channels=info.input_shape[0],
                      input_size=tuple(info.input_shape[1:]))
    for k, v in info.as_dict().items():
        ckpt.metadata.setdefault(k, v)
    ckpt.metadata["input_shape"] = list(info.input_shape)
    return ckpt


def _fit_stage(run: StageRun, ckpt, config, *, loss_fn=None, penalties=(), op: str, lineage: dict,
               after_epoch=None, finish=None) -> dict:
    """Train ``ckpt.model`` with the one shared ``fit()``; resumable from the stage directory.
    ``after_epoch`` / ``finish``: as in :func:`deploycomp.workflows.run_training` (QAT's)."""
    from deploycomp.train import fit

    ds = run.data(need_train=True)
    resume_path = run.dir / "train.resume.pt"
    result = fit(ckpt.model, ds.train, None, config, loss_fn=loss_fn, penalties=penalties,
                 resume_path=resume_path, resume=resume_path.exists(), keep_resume=True, task=ds.task,
                 after_epoch=after_epoch)
    if finish is not None:
        finish(ckpt)
    params = {"dataset": ds.info.name, **dataclasses.asdict(config), **lineage}
    ckpt.add_lineage(op, **params)
    _save_model(ckpt, run)
    resume_path.unlink(missing_ok=True)  # only once the trained model is saved: a kill before loses nothing
    return {"command": op, "params": params, "history": result.history, "train_seconds": result.seconds,
            "synthetic": ds.info.synthetic}


@register_stage("train", MODEL_FILE, produces_model=True)
def _stage_train(run: StageRun) -> dict[str, Any]:
    """Train the previous model (or a fresh zoo model): plain, sparse (slimming), stochastic depth, frozen."""
    o = run.options
    ckpt = _fresh_model(run.ref("model"), run) if o.get("model") else run.load_parent_checkpoint()
    penalties, lineage = [], {}
    if o.get("sparsity") is not None:
        from deploycomp.prune.slimming import bn_sparsity_penalty

        penalties.append(bn_sparsity_penalty(o["sparsity"]))
        lineage["sparsity"] = o["sparsity"]
    if o.get("stochastic_depth") is not None or o.get("freeze") is not None:
        from deploycomp.distill import training_setup

        prepare, extra = training_setup(o.get("stochastic_depth"), o.get("freeze"))
        lineage.update(extra)
        prepare(ckpt, run.data())
    if o.get("model"):
        lineage["from_scratch"] = o["model"]
    config = train_config(o, run.study.device)
    console.info(f"{run.stage.label}: training for {config.epochs} epoch(s)"
                 + (f", sparsity lambda {o['sparsity']:g}" if o.get("sparsity") is not None else ""))
    return _fit_stage(run, ckpt, config, penalties=penalties, op="train", lineage=lineage)


@register_stage("distill", MODEL_FILE, produces_model=True)
def _stage_distill(run: StageRun) -> dict[str, Any]:
    """Knowledge distillation: the student learns from the teacher's soft targets and the labels."""
    from deploycomp.distill import kd_loss

    o = run.options
    teacher = _teacher(run)
    student = run.load_parent_checkpoint() if o["student"] == "parent" else _fresh_model(run.ref("student"), run)
    if teacher.num_classes is not None and student.num_classes is not None and \
            teacher.num_classes != student.num_classes:
        raise UsageError(f"{run.stage.label}: the teacher predicts {teacher.num_classes} classes but the student "
                         f"{o['student']} predicts {student.num_classes}; they must predict the same classes")
    kd = _distill_params(o)
    config = train_config(o.get("train"), run.study.device)
    if "optimizer" not in (o.get("train") or {}):
        config.optimizer = "adam"  # the KD report's setting, as `deploycomp distill` defaults to
    console.info(f"{run.stage.label}: distilling {teacher.arch} into {student.arch} (T {kd['temperature']}, "
                 f"alpha {kd['alpha']}, lambda {kd['lam']}) for {config.epochs} epoch(s)")
    lineage = {"teacher_arch": teacher.arch, "temperature": kd["temperature"], "alpha": kd["alpha"],
               "lambda": kd["lam"]}
    ignore = run.data().info.ignore_index
    return _fit_stage(run, student, config, loss_fn=kd_loss(teacher.model.eval(), **kd, ignore_index=ignore),
                      op="distill",
                      lineage=lineage)


def _teacher(run: StageRun):
    """A distill step's teacher: a stage of the run (parent, original), else the model the recipe names."""
    from deploycomp.checkpoint import _looks_like_path, load_model

    if "teacher_stage" in run.stage.inputs:
        return run.load_checkpoint(run.runner.artifact_of_key(run.stage.inputs["teacher_stage"]))
    ref = run.ref("teacher")
    if not _looks_like_path(ref):
        return _fresh_model(ref, run)
    return load_model(ref, arch=run.ref("teacher_arch"), code_option="the recipe key distill.teacher_arch:")


@register_stage("qat", MODEL_FILE, produces_model=True)
def _stage_qat(run: StageRun) -> dict[str, Any]:
    """Quantization-aware fine-tuning of the previous model for an INT8 target (``deploycomp train --qat``)."""
    from deploycomp.qat import DEFAULT_EPOCHS, qat_setup, set_default_lr

    o = dict(run.options)
    target, all_layers = o.pop("target", None) or "ort-cpu", bool(o.pop("all_layers", False))
    ckpt = run.load_parent_checkpoint()
    calib = (run.study.options.get("quantize") or {}).get("calib_samples")  # the images quantize will use
    prepare, after_epoch, finish, lineage = qat_setup(target, all_layers=all_layers, data_dir=run.study.data_dir,
                                                      **({"calib_samples": calib} if calib else {}))
    prepare(ckpt, run.data(need_train=True))
    config = train_config({"epochs": DEFAULT_EPOCHS, **o}, run.study.device)
    set_default_lr(config)
    console.info(f"{run.stage.label}: quantization-aware training for {target}, {config.epochs} epoch(s), "
                 f"lr {config.lr:g}")
    return _fit_stage(run, ckpt, config, op="qat", lineage=lineage, after_epoch=after_epoch, finish=finish)


@register_stage("prune", MODEL_FILE, produces_model=True)
def _stage_prune(run: StageRun) -> dict[str, Any]:
    """Structured pruning (any registered criterion, depth included) and its fine-tuning."""
    from deploycomp.prune import prune_checkpoint

    o = dict(run.options)
    if o.get("distill_from") in ("original", "parent"):
        o["distill_from"] = str(run.runner.artifact_of_key(run.stage.inputs["teacher_stage"]))
        o["distill_from_arch"] = run.study.consented_arch(o["distill_from"])
    elif o.get("distill_from_arch"):
        o["distill_from_arch"] = run.ref("distill_from_arch")
    d = run.study.options.get("data") or {}
    cfg = prune_config(o, run.study.device, d.get("eval_samples"), d.get("eval_batch"))
    ckpt = run.load_parent_checkpoint()
    what = f"ratio {cfg.ratio}" if cfg.ratio is not None else "target"
    console.info(f"{run.stage.label}: pruning with {cfg.method} ({what}), fine-tuning {cfg.finetune_epochs} epoch(s)")
    pruned, record = prune_checkpoint(ckpt, run.data(need_train=True), cfg)
    _save_model(pruned, run)
    return record


@register_stage("evaluate", None)
def _stage_evaluate(run: StageRun) -> dict[str, Any]:
    """The task's metrics (top-1; mIoU) of the saved checkpoint, reloaded from disk, on the study's
    evaluation subset; size and MACs."""
    from deploycomp.files import file_size_mib
    from deploycomp.metrics import model_metrics
    from deploycomp.train import evaluate

    o = run.options
    ckpt = run.load_parent_checkpoint()
    ds = run.data()
    acc = evaluate(ckpt.model, ds.test, o.get("eval_batch") or 256, run.study.device, samples=o.get("eval_samples"),
                   description=f"{run.stage.label}: eval", task=ds.task)
    console.info(f"{run.stage.label}: {ds.task.summary(acc)} on {acc['samples']:,} test images")
    return {"test": acc, "dataset": ds.info.name, "synthetic": ds.info.synthetic, "task": ds.task.name,
            "metric": ds.task.metric, "metric_label": ds.task.label,
            "checkpoint_size_mib": file_size_mib(run.parent_artifact()), "lineage": ckpt.metadata.get("lineage", []),
            **model_metrics(ckpt.model, ckpt.input_shape)}


@register_stage("export", "model.onnx")
def _stage_export(run: StageRun) -> dict[str, Any]:
    """ONNX export with the checker and the ONNX Runtime parity check."""
    from deploycomp.export import export_onnx

    ckpt = run.load_parent_checkpoint()
    ds = run.data()
    o = _given(run.options)
    if "input_size" in o:
        o["input_size"] = tuple(o["input_size"])
    console.info(f"{run.stage.label}: exporting to ONNX")
    return export_onnx(ckpt, run.dir / "model.onnx", data=ds.info.name, data_dir=run.study.data_dir,
                       dataset=ds.test, **o)


@register_stage("quantize", "model.quant.onnx")
def _stage_quantize(run: StageRun) -> dict[str, Any]:
    """FP16 / INT8 (Q/DQ) ONNX with its accuracy against the FP32 ONNX on the evaluation subset."""
    from deploycomp.quantize import quantize_onnx

    o = _given(run.options, ("eval_samples",))
    console.info(f"{run.stage.label}: quantizing to {o['precision']}"
                 + (f" for {o['target']}" if o.get("target") else ""))
    ds = run.data()
    return quantize_onnx(run.parent_artifact(), run.dir / "model.quant.onnx", data=ds.info.name,
                         data_dir=run.study.data_dir, eval_samples=run.options.get("eval_samples"), **o)


@register_stage("build", "model.engine")
def _stage_build(run: StageRun) -> dict[str, Any]:
    """A TensorRT engine from the ONNX (only planned when TensorRT is installed)."""
    from deploycomp.trt import build_engine

    ds = run.data()
    console.info(f"{run.stage.label}: building a TensorRT engine")
    return build_engine(run.parent_artifact(), run.dir / "model.engine", data=ds.info.name,
                        data_dir=run.study.data_dir, **_given(run.options, ("enabled",)))


def _bench_arch(paths: list[str], run: StageRun) -> str | None:
    """The user code that rebuilds the checkpoints timed here (bench takes one ``arch`` for all of them)."""
    codes = sorted({c for p in paths if Path(p).name == MODEL_FILE if (c := run.study.consented_arch(p))})
    if len(codes) > 1:
        raise UsageError(f"{run.stage.label}: its checkpoints are built from different user code ({', '.join(codes)}) "
                         "and a benchmark rebuilds them all with one; time them on ort (export) instead, or give "
                         "the variants the same code")
    return codes[0] if codes else None


@register_stage("bench", "bench.json")
def _stage_bench(run: StageRun) -> dict[str, Any]:
    """Every artifact of one backend's family in the study, timed together in interleaved rounds (paired)."""
    from deploycomp import bench

    o = run.options
    listing = o["artifacts"]
    paths = [str(run.runner.artifact_of_key(stage_id)) for stage_id in run.stage.inputs["artifacts"]]
    cfg = bench_config(_given(o, ("artifacts",)), o["backend"], run.study.device)
    if cfg.arch is None:
        cfg.arch = _bench_arch(paths, run)
    console.info(f"{run.stage.label}: timing {len(paths)} artifacts in alternation ({o['backend']}, batch "
                 f"{', '.join(map(str, cfg.batches))})")
    results = bench.benchmark(paths, cfg, names=[item["branch"] for item in listing])
    by_path = dict(zip(paths, zip(listing, run.stage.inputs["artifacts"], strict=True), strict=True))
    for r in results:  # which branch and precision each row is, for the report
        item, source_stage = by_path[r["artifact"]]
        r.update({"branch": item["branch"], "branch_precision": item["precision"], "source": item["source"],
                  "source_stage": source_stage})
    bench.write_json(str(run.dir / "bench.json"), results)
    return {"backend": o["backend"], "paired": True, "results": results}
