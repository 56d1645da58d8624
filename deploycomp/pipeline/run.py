"""Running: the planned stages of a recipe in a run directory, skipping those already done; ``run.json``."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploycomp import __version__, console
from deploycomp.errors import DeploycompError, InputFileError, Interrupted, UsageError
from deploycomp.files import read_json, write_json
from deploycomp.pipeline.code import code_record
from deploycomp.pipeline.configs import _given
from deploycomp.pipeline.plan import StudyPlan, plan_study
from deploycomp.pipeline.recipe import Recipe, load_recipe
from deploycomp.pipeline.stages import STAGES, Stage, StageRun

RUN_FORMAT = "deploycomp.pipeline"
RUN_FORMAT_VERSION = 1


@dataclass
class RunOptions:
    force: bool = False  # redo every stage, cached or not
    plots: bool = True  # write the PNG plots with the report


class PipelineRun:
    """Runs the planned stages of a recipe in ``run_dir``, skipping the ones already done."""

    def __init__(self, recipe: Recipe, run_dir: Path, options: RunOptions | None = None):
        self.recipe, self.run_dir, self.options = recipe, Path(run_dir), options or RunOptions()
        self.stages_dir = self.run_dir / "stages"
        self._by_key: dict[str, Stage] = {}
        self.log: list[dict[str, Any]] = []

    def stage_dir(self, stage: Stage) -> Path:
        return self.stages_dir / stage.id

    def record_path(self, stage: Stage) -> Path:
        return self.stage_dir(stage) / "record.json"

    def artifact_of(self, stage: Stage) -> Path:
        kind = STAGES.get(stage.kind)
        if kind.artifact is None:
            raise DeploycompError(f"stage {stage.kind} has no artifact")
        return self.stage_dir(stage) / kind.artifact

    def artifact_of_key(self, stage_id: str) -> Path:
        return self.artifact_of(self._by_key[stage_id])

    def record_of(self, stage: Stage) -> dict[str, Any]:
        return read_json(self.record_path(stage))["record"]

    def done(self, stage: Stage) -> bool:
        kind = STAGES.get(stage.kind)
        return self.record_path(stage).exists() and (kind.artifact is None or self.artifact_of(stage).exists())

    def run_stage(self, stage: Stage, plan: StudyPlan, index: int, total: int) -> None:
        where = f"[{index}/{total}]"
        if self.done(stage) and not self.options.force:
            console.info(f"{where} {stage.label}: done before, skipped ({stage.id})")
            self.log.append({"stage": stage.id, "label": stage.label, "status": "cached", "seconds": 0.0})
            return
        console.info(f"{where} {stage.label} ({stage.id})")
        d = self.stage_dir(stage)
        d.mkdir(parents=True, exist_ok=True)
        if self.record_path(stage).exists():
            self.record_path(stage).unlink()  # --force: the old record must not survive a failed redo
        t0 = time.perf_counter()
        record = STAGES.get(stage.kind).run(StageRun(stage, d, self, plan))
        seconds = time.perf_counter() - t0
        write_json(self.record_path(stage), {
            "format": RUN_FORMAT, "stage": stage.kind, "key": stage.key, "label": stage.label,
            "options": stage.options, "parent": stage.parent.id if stage.parent else None, "inputs": stage.inputs,
            "deploycomp": __version__, "finished_utc": _utc_now(), "seconds": seconds,
            "artifact": STAGES.get(stage.kind).artifact, "record": record})
        self.log.append({"stage": stage.id, "label": stage.label, "status": "ran", "seconds": seconds})

    def execute(self) -> dict[str, Any]:
        from deploycomp.train import TrainingInterrupted
        from deploycomp.trt import tensorrt_available

        t0 = time.perf_counter()
        tensorrt = tensorrt_available()
        plans = [plan_study(s, self.recipe.path.parent, tensorrt) for s in self.recipe.studies]
        for p in plans:
            for s in p.stages():
                self._by_key[s.id] = s
        total = sum(len(p.stages()) for p in plans)
        console.info(f"pipeline {self.recipe.name}: {len(plans)} stud{'y' if len(plans) == 1 else 'ies'}, "
                     f"{sum(len(p.branches) for p in plans)} branches, {total} stages -> {self.run_dir}")
        run_doc = self._run_doc(plans, tensorrt, None, "running")
        write_json(self.run_dir / "run.json", run_doc)
        i = 0
        try:
            for p in plans:
                for s in p.stages():
                    i += 1
                    self.run_stage(s, p, i, total)
                    if s is p.root and p.data_name is None:  # cached: the dataset is in its record
                        p.set_data(self.record_of(s)["dataset"])
        except (KeyboardInterrupt, TrainingInterrupted):
            write_json(self.run_dir / "run.json", self._run_doc(plans, tensorrt, time.perf_counter() - t0,
                                                                "interrupted"))
            raise Interrupted(f"pipeline interrupted in stage {i} of {total}; finished stages are kept: run "
                              "the same command again to continue where it stopped") from None
        except DeploycompError:
            write_json(self.run_dir / "run.json", self._run_doc(plans, tensorrt, time.perf_counter() - t0, "failed"))
            raise
        wall = time.perf_counter() - t0
        run_doc = self._run_doc(plans, tensorrt, wall, "finished")
        write_json(self.run_dir / "run.json", run_doc)
        return run_doc

    def _run_doc(self, plans: list[StudyPlan], tensorrt: bool, wall: float | None, status: str) -> dict[str, Any]:
        from deploycomp.bench import env

        ran = [e for e in self.log if e["status"] == "ran"]
        return {
            "format": RUN_FORMAT, "format_version": RUN_FORMAT_VERSION, "status": status,
            "recipe": str(self.recipe.path), "recipe_sha256": self.recipe.sha256, "name": self.recipe.name,
            "description": self.recipe.description, "recipe_content": self.recipe.raw,
            "deploycomp": __version__, "finished_utc": _utc_now(), "wall_s": wall,
            "stages_run": len(ran), "stages_cached": len(self.log) - len(ran), "force": self.options.force,
            "tensorrt_available": tensorrt, "environment": env.capture("cpu"), "versions": _versions(),
            "studies": [{"name": p.study.name, "description": p.options.get("description", ""),
                         "scale": p.options.get("scale", ""), "model": p.options.get("model") or "baseline",
                         "device": p.device, "data": p.options.get("data") or {}, "root": p.root.id,
                         "notes": p.notes, "report": p.options.get("report") or {},
                         "bench": _given(p.options.get("bench")), "code": code_record(p.code),
                         "branches": [b.to_dict() for b in p.branches]}
                        for p in plans],
            "log": self.log,
        }


def _utc_now() -> str:
    import datetime as dt

    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _versions() -> dict[str, str | None]:
    from importlib import metadata

    out = {}
    for name, dists in (("torch", ("torch",)), ("torchvision", ("torchvision",)),
                        ("torch-pruning", ("torch-pruning", "torch_pruning")), ("onnx", ("onnx",)),
                        ("onnxruntime", ("onnxruntime-gpu", "onnxruntime")),
                        ("tensorrt", ("tensorrt", "tensorrt-cu12", "tensorrt-cu13"))):
        out[name] = None
        for d in dists:
            try:
                out[name] = metadata.version(d)
                break
            except metadata.PackageNotFoundError:
                continue
    return out


def run_pipeline(recipe_path: str | os.PathLike | None = None, run_dir: str | os.PathLike | None = None, *,
                 force: bool = False, plots: bool = True, wait: float | None = 0) -> dict[str, Any]:
    """Validate ``recipe_path`` (default: the shipped default recipe), run it in ``run_dir``, write the report.

    The run directory is locked while the pipeline runs: another pipeline on it refuses (``wait`` 0) or
    waits up to ``wait`` seconds (None: as long as it takes). Returns ``{"run": <run.json>, "report":
    <report paths>, "run_dir": <Path>}``.
    """
    from deploycomp import report
    from deploycomp.lock import LOCK_NAME, directory_lock

    recipe = load_recipe(recipe_path)
    out = Path(run_dir) if run_dir else Path("runs") / recipe.name
    if out.exists() and not out.is_dir():
        raise UsageError(f"-o {out} is a file; give a directory for the run")
    existing = out / "run.json"
    if existing.exists():
        try:
            prev = read_json(existing)
        except InputFileError:
            prev = {}
        if prev.get("format") != RUN_FORMAT:
            raise UsageError(f"{out} holds something that is not a deploycomp pipeline run; choose another -o")
    elif out.exists() and any(f.name != LOCK_NAME for f in out.iterdir()):
        raise UsageError(f"{out} is not empty and holds no pipeline run; choose another -o directory")
    with directory_lock(out, wait=wait, what="run directory", hint="use --wait, or choose another -o directory"):
        run_doc = PipelineRun(recipe, out, RunOptions(force=force, plots=plots)).execute()
        paths = report.write_report(out, formats=("md", "csv", "json"), plots=plots)
    return {"run": run_doc, "report": paths, "run_dir": out}
