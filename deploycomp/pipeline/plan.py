"""Planning: a study of a recipe -> its stage graph (the original branch first, then every variant).

Each branch is a row of the report: its compression steps, then evaluate, export, quantize (one stage
per precision) and build (one engine per ONNX when TensorRT is present). Benchmarking is per study, not
per branch: one bench stage per backend times every artifact of that backend's family (all variants,
all precisions) together, in interleaved rounds, so that every speed-up in the report is paired
(docs/bench-schema.md, "How comparisons are made"). Those stages run after all the branches' stages.
INT8 is quantized for the backend that runs it: the ONNX that ONNX Runtime times is made for
``ort-cpu``, the one a TensorRT engine is built from for ``tensorrt``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploycomp.pipeline.code import STAGE_REFS, code_identity, named_code, resolve_code_ref
from deploycomp.pipeline.configs import _given
from deploycomp.pipeline.recipe import ORIGINAL, Study, resolve_model_ref
from deploycomp.pipeline.schema import VARIANT_STEPS
from deploycomp.pipeline.stages import Stage


@dataclass
class Branch:
    """One row of the report: a variant's model stage and what hangs off it."""

    name: str
    description: str
    model: Stage
    steps: list[Stage]  # the compression stages from the original (empty for the original)
    evaluate: Stage | None = None
    export: Stage | None = None
    quantize: dict[str, Stage] = field(default_factory=dict)  # precision -> stage (the graph ONNX Runtime times)
    quantize_trt: dict[str, Stage] = field(default_factory=dict)  # precision -> INT8 graph made for TensorRT builds
    build: dict[str, Stage] = field(default_factory=dict)  # precision -> stage
    artifacts: list[tuple[str, Stage]] = field(default_factory=list)  # (precision, stage) of what gets timed
    bench: list[tuple[str, str, Stage, Stage]] = field(default_factory=list)  # (precision, backend, bench, source)

    def stages(self) -> list[Stage]:
        """The branch's own stages (the study's shared bench stages are not among them)."""
        out = [*self.steps, self.evaluate, self.export, *self.quantize.values(), *self.quantize_trt.values(),
               *self.build.values()]
        return [s for s in out if s is not None]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "model": self.model.id,
                "steps": [s.id for s in self.steps], "evaluate": self.evaluate.id if self.evaluate else None,
                "export": self.export.id if self.export else None,
                "quantize": {k: s.id for k, s in self.quantize.items()},
                "quantize_trt": {k: s.id for k, s in self.quantize_trt.items()},
                "build": {k: s.id for k, s in self.build.items()},
                "bench": [{"precision": p, "backend": b, "stage": s.id, "source": src.kind, "source_stage": src.id}
                          for p, b, s, src in self.bench]}


@dataclass
class StudyPlan:
    study: Study
    root: Stage
    branches: list[Branch]
    device: str | None
    data_dir: str | None
    notes: list[str]
    bench: list[Stage] = field(default_factory=list)  # one per backend: every artifact of the study, paired
    data_name: str | None = None  # the dataset the load stage settled on (the model's, unless the recipe says)
    data_size: tuple[int, int] | None = None  # (H, W) the model takes
    code: dict[str, str] = field(default_factory=dict)  # user code the recipe names (its consent): entry -> key
    _data: Any = None

    def consented_arch(self, path: str | Path) -> str | None:
        """The user code a checkpoint of this run was built from, when the recipe names it (else None)."""
        from deploycomp.checkpoint import recorded_code

        if not self.code:  # nothing named: nothing to read
            return None
        entry = recorded_code(path)
        return entry if entry in self.code else None

    @property
    def options(self) -> dict[str, Any]:
        return self.study.options

    def dataset(self, need_train: bool = False):
        """The study's dataset (test split; train split when asked), loaded once."""
        from deploycomp.data import load_dataset
        from deploycomp.inputs import Data

        if self._data is None:
            test, info = load_dataset(self.data_name, "test", self.data_dir, input_size=self.data_size)
            self._data = Data(info, test)
        if need_train and self._data.train is None:
            self._data.train = load_dataset(self.data_name, "train", self.data_dir, input_size=self.data_size)[0]
        return self._data

    def use_data(self, ds) -> None:
        """Take the dataset the load stage resolved (``ds``: an inputs.Data)."""
        self._data = ds
        self.set_data(ds.info.as_dict())

    def set_data(self, info: dict[str, Any]) -> None:
        self.data_name, self.data_size = info["dataset"], tuple(info["input_shape"][1:])

    def data_info(self):
        return self.dataset().info

    def stages(self) -> list[Stage]:
        seen, out = set(), []
        for s in [self.root, *(x for b in self.branches for x in b.stages()), *self.bench]:
            if s.key not in seen:
                seen.add(s.key)
                out.append(s)
        return out


def _file_identity(ref: str) -> str:
    """A file by its hash, user code by its entry point and its file's hash, a zoo name as it is."""
    from deploycomp.files import sha256

    return f"sha256:{sha256(ref)}" if Path(ref).is_file() else code_identity(ref)


CODE_OPTIONS = ("model", "student", "teacher", "teacher_arch", "distill_from_arch")  # step options naming code


def _code_refs(opts: dict[str, Any], base_dir: Path) -> tuple[dict[str, str], dict[str, str]]:
    """``(inputs, local)`` of a step's user code options: its identity (file hash) and where it is here."""
    from deploycomp.zoo import is_user_code

    inputs, local = {}, {}
    for k in CODE_OPTIONS:
        if isinstance(opts.get(k), str) and is_user_code(opts[k]):
            local[k] = resolve_code_ref(opts[k], base_dir)
            inputs[k] = code_identity(local[k])
    return inputs, local


def plan_study(study: Study, base_dir: Path, tensorrt: bool) -> StudyPlan:
    """The stage graph of one study: the original branch first, then every variant."""
    o = study.options
    d = o.get("data") or {}
    model = resolve_model_ref(o.get("model"), base_dir)
    data_dir = d.get("dir")
    if data_dir and not Path(data_dir).is_absolute() and (base_dir / data_dir).exists():
        data_dir = str((base_dir / data_dir).resolve())
    notes: list[str] = []
    load_opts = {"model": Path(model).name if Path(model).is_file() else model, "data": d.get("name"),
                 "input_size": d.get("input_size")}
    load_inputs, load_local = {"model": _file_identity(model)}, {"model_path": model, "data_dir": data_dir}
    if o.get("arch"):  # the code of a checkpoint built from user code, or a plain state dict's architecture
        load_opts["arch"] = o["arch"]
        load_local["arch"] = resolve_code_ref(o["arch"], base_dir)
        load_inputs["arch"] = code_identity(load_local["arch"])
    root = Stage("load", load_opts, None, f"{study.name}/{ORIGINAL}: load", load_inputs,
                 load_local)  # the file's hash is the identity, not its path
    original_model = root
    if o.get("train"):
        original_model = Stage("train", dict(o["train"]), root, f"{study.name}/{ORIGINAL}: train",
                               *_code_refs(o["train"], base_dir))
    eval_opts = {"eval_samples": d.get("eval_samples"), "eval_batch": d.get("eval_batch")}
    device = o.get("device")
    branches = [Branch(ORIGINAL, "the model as given" if not o.get("train") else "the trained baseline",
                       original_model, [original_model] if original_model is not root else [])]
    for v in study.variants:
        parent, steps = original_model, []
        for kind in VARIANT_STEPS:
            if not v.get(kind):
                continue
            opts = dict(v[kind])
            inputs, local = _code_refs(opts, base_dir)
            if kind == "distill":
                teacher = opts.setdefault("teacher", "parent")
                if teacher in STAGE_REFS:
                    inputs["teacher_stage"] = (original_model if teacher == "original" else parent).id
                else:  # a checkpoint file, a zoo name or user code
                    local["teacher"] = resolve_model_ref(teacher, base_dir)
                    inputs["teacher"] = _file_identity(local["teacher"])
            if kind == "prune":
                if opts.get("distill_from") in ("original", "parent"):
                    t = original_model if opts["distill_from"] == "original" else parent
                    inputs["teacher_stage"] = t.id
                elif opts.get("distill_from"):
                    ref = resolve_model_ref(opts["distill_from"], base_dir)
                    opts["distill_from"] = ref
                    inputs["teacher"] = _file_identity(ref)
                opts.update({k: val for k, val in eval_opts.items() if val is not None})
            parent = Stage(kind, opts, parent, f"{study.name}/{v['name']}: {kind}", inputs, local)
            steps.append(parent)
        branches.append(Branch(v["name"], v.get("description") or describe_steps(v), parent, steps))
    for b in branches:
        b.evaluate = Stage("evaluate", eval_opts, b.model, f"{study.name}/{b.name}: evaluate")
        _plan_deploy(b, o, study, tensorrt, eval_opts, notes)
    if not tensorrt and (o.get("build") or {}).get("enabled", True) and o.get("build") is not None:
        notes.append("TensorRT is not installed here: no engines were built and the trt backend was not measured")
    return StudyPlan(study, root, branches, device, data_dir, notes, _plan_bench(branches, o, study),
                     code=named_code(o, study.variants, base_dir))


def _plan_deploy(b: Branch, o: dict, study: Study, tensorrt: bool, eval_opts: dict, notes: list[str]) -> None:
    label = f"{study.name}/{b.name}"
    artifacts: list[tuple[str, Stage]] = [("fp32", b.model)]
    if o.get("export") is not None:
        b.export = Stage("export", _given(o["export"]), b.model, f"{label}: export")
        artifacts.append(("fp32", b.export))
        q = o.get("quantize")
        for prec in (q or {}).get("precisions") or ():
            b.quantize[prec] = _quantize_stage(b, q, prec, "ort-cpu", eval_opts, label)
            artifacts.append((prec, b.quantize[prec]))
        build = o.get("build")
        if tensorrt and build is not None and build.get("enabled", True):
            for prec, src in [("fp32", b.export), *b.quantize.items()]:
                if prec == "int8":  # TensorRT builds its own INT8 graph, not the one made for ONNX Runtime's CPU
                    src = b.quantize_trt[prec] = _quantize_stage(b, q, prec, "tensorrt", eval_opts, label)
                b.build[prec] = Stage("build", _given(build, ("enabled",)), src, f"{label}: build {prec}")
                artifacts.append((prec, b.build[prec]))
    if o.get("bench") is not None:
        b.artifacts = artifacts


NATURAL_BACKEND = {"export": "ort", "quantize": "ort", "build": "trt"}  # stage kind -> backend (else torch)


def _plan_bench(branches: list[Branch], o: dict, study: Study) -> list[Stage]:
    """One bench stage per backend, timing every branch's artifacts of that backend's family together.

    The artifacts are listed original first, then in branch order, FP32 before the other precisions of a
    branch, so the first of each backend is the original FP32 model: the reference of the comparison.
    Their stage ids are inputs of the bench stage, so a change anywhere upstream re-times that backend.
    """
    from deploycomp.bench.backends import get_backend

    bench = o.get("bench")
    if bench is None:
        return []
    backends = list(bench.get("backends") or ("torch", "ort"))
    options = _given(bench, ("backends",))
    stages = []
    for backend in backends:
        items = [(b, prec, src) for b in branches for prec, src in b.artifacts
                 if get_backend(backend).family == get_backend(NATURAL_BACKEND.get(src.kind, "torch")).family]
        if not items:
            continue
        listing = [{"branch": b.name, "precision": prec, "source": src.kind} for b, prec, src in items]
        stage = Stage("bench", {**options, "backend": backend, "artifacts": listing}, None,
                      f"{study.name}: bench {backend} ({len(items)} artifacts, paired)",
                      {"artifacts": [src.id for _, _, src in items]})
        for b, prec, src in items:
            b.bench.append((prec, backend, stage, src))
        stages.append(stage)
    return stages


def _quantize_stage(b: Branch, q: dict, precision: str, target: str, eval_opts: dict, label: str) -> Stage:
    """A quantize stage of ``b``'s export; INT8 is made for ``target`` (the backend that will run it)."""
    opts = {**_given(q, ("precisions",)), "precision": precision, "eval_samples": eval_opts["eval_samples"]}
    if precision == "int8":
        opts["target"] = target
    what = f"{precision} for {target}" if precision == "int8" else precision
    return Stage("quantize", opts, b.export, f"{label}: quantize {what}")


def describe_steps(v: dict[str, Any]) -> str:
    """A short human description of a variant's steps, e.g. ``train (sparsity 1e-4) -> prune slimming 0.5``."""
    parts = []
    t = v.get("train")
    if t:
        extra = [f"sparsity {t['sparsity']:g}" if t.get("sparsity") is not None else "",
                 f"from scratch: {t['model']}" if t.get("model") else "",
                 f"{t['epochs']} ep" if t.get("epochs") else ""]
        parts.append("train" + (f" ({', '.join(x for x in extra if x)})" if any(extra) else ""))
    dd = v.get("distill")
    if dd:
        parts.append(f"distill into {dd['student']}")
    p = v.get("prune")
    if p:
        amount = _prune_amount(p)
        ft = p.get("finetune", {}) or {}
        ft_text = "no fine-tune" if "finetune" in p and p["finetune"] is None else \
            f"fine-tune {ft.get('epochs', 1)} ep"
        parts.append(f"prune {p.get('method', 'magnitude')} {amount}, {ft_text}")
    q = v.get("qat")
    if q:
        parts.append(f"QAT for {q.get('target') or 'ort-cpu'}, {q.get('epochs', 1)} ep")
    return " -> ".join(parts)


def _prune_amount(p: dict[str, Any]) -> str:
    """``0.3``, ``1.2 GMACs``, ``2x MACs``, ``2x measured on ort`` or ``40 ms measured``: what a prune step asks."""
    on = f" on {p['latency_backend']}" if p.get("latency_backend") else ""
    if p.get("ratio") is not None:
        return f"{p['ratio']:g}"
    if p.get("target_macs_g") is not None:
        return f"{p['target_macs_g']:g} GMACs"
    if p.get("target_latency_ms") is not None:
        return f"{p['target_latency_ms']:g} ms measured{on}"
    if p.get("target_speedup") is not None:
        return f"{p['target_speedup']:g}x " + (f"measured{on}" if p.get("measured") else "MACs")
    return "default ratio"
