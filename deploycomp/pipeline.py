"""deploycomp pipeline: a recipe (YAML) -> every branch of the road -> one comparison report.

A recipe names a model (or a baseline to train), a dataset, a list of *variants* (compressions: sparsity
training, distillation, pruning with fine-tuning, depth pruning) and what every branch then goes
through: evaluate, export to ONNX (with parity), quantize, build a TensorRT engine (when TensorRT is
present) and benchmark. The original model is a branch too (the first row of the report).

Every step is a *stage* of a kind registered in :data:`STAGES` (load, train, distill, prune, evaluate,
export, quantize, build, bench). A stage is identified by a hash of its kind, its options, its
parent stage's hash, its other inputs and the deploycomp version; it writes its artifact and a
``record.json`` under ``RUN_DIR/stages/<kind>-<hash>/`` (atomically, record last). A stage whose
``record.json`` exists is done: re-running skips it, an interrupted run continues with the first
stage that has none, ``force`` redoes them all. Identical stages of two variants (say, the same
sparsity training before two pruning ratios) run once.

Recipe keys are checked before any work starts: an unknown key (with the closest valid one), a wrong
type or an impossible value is one line naming the file, the key path and what is allowed. The keys
of the stage sections are derived from the libraries' own config dataclasses and signatures
(:class:`~deploycomp.train.TrainConfig`, :class:`~deploycomp.prune.PruneConfig`,
:class:`~deploycomp.bench.BenchConfig`, :func:`~deploycomp.export.export_onnx`, ...), so an option
added there is accepted here without a second list.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import inspect
import json
import os
import time
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploycomp import __version__, console
from deploycomp.errors import DeploycompError, InputFileError, Interrupted, UnknownNameError, UsageError
from deploycomp.files import read_json, read_text, write_json
from deploycomp.registry import Registry

REPO_ROOT = Path(__file__).resolve().parent.parent
RECIPES_DIR = REPO_ROOT / "benchmarks" / "recipes"
DEFAULT_RECIPE = RECIPES_DIR / "default.yaml"
RUN_FORMAT = "deploycomp.pipeline"
RUN_FORMAT_VERSION = 1
ORIGINAL = "original"  # name of the branch without compression (always the first row)
MODEL_FILE = "model.pt"


# ==================================================================================================
# Recipe schema: sections whose keys come from the libraries' dataclasses and signatures


class RecipeError(UsageError):
    """A recipe that cannot run: one line with the file, the key path and what is allowed."""


@dataclass
class Section:
    """The keys a mapping in a recipe may have: key -> type hint (or a nested :class:`Section`).

    ``section | None`` allows null; ``[section]`` is a list of such mappings.
    """

    name: str
    fields: dict[str, Any]
    required: tuple[str, ...] = ()

    def __or__(self, other) -> _Nullable:
        return _Nullable(self)


@dataclass
class _Nullable:
    section: Section


def _hints_of(obj) -> dict[str, Any]:
    """Type hints of a dataclass's fields or of a function's keyword parameters."""
    if dataclasses.is_dataclass(obj):
        hints = typing.get_type_hints(obj)
        return {f.name: hints[f.name] for f in dataclasses.fields(obj)}
    sig = inspect.signature(obj, eval_str=True)
    return {n: p.annotation for n, p in sig.parameters.items() if p.kind == p.KEYWORD_ONLY}


def _section(name: str, source, *, drop: tuple[str, ...] = (), add: dict[str, Any] | None = None,
             replace: dict[str, Any] | None = None, required: tuple[str, ...] = ()) -> Section:
    fields = {k: v for k, v in _hints_of(source).items() if k not in drop}
    fields.update(replace or {})
    fields.update(add or {})
    return Section(name, fields, required)


def _train_section(name: str = "train") -> Section:
    from deploycomp.train import TrainConfig

    # device comes from the recipe's top-level `device`; the extras are `deploycomp train`'s own options.
    return _section(name, TrainConfig, drop=("device",), add={
        "sparsity": float,  # network slimming: lambda * sum |gamma| added to the loss
        "stochastic_depth": float,  # survival probability of the last residual block (Huang et al.)
        "freeze": str,  # module-name prefixes kept fixed, e.g. "stem,layer1"
        "model": str,  # a zoo name to train from scratch instead of continuing from the previous model
    })


def _prune_section() -> Section:
    from deploycomp.prune import PruneConfig

    # eval_samples / eval_batch / device come from the recipe's data and device sections.
    return _section("prune", PruneConfig, drop=("device", "eval_samples", "eval_batch"),
                    replace={"finetune": _train_section("finetune") | None,
                             "ignore": tuple[str, ...], "distill_from": str})


def _distill_section() -> Section:
    from deploycomp.distill import run_distillation

    sig = inspect.signature(run_distillation, eval_str=True)
    kd = {k: sig.parameters[k].annotation for k in ("temperature", "alpha", "lam")}
    return Section("distill", {"student": str, "teacher": str, **kd, "train": _train_section()},
                   required=("student",))


def _export_section() -> Section:
    from deploycomp.export import export_onnx

    return _section("export", export_onnx, drop=("data", "data_dir", "dataset"),
                    replace={"input_size": tuple[int, int] | None})


def _quantize_section() -> Section:
    from deploycomp.quantize import quantize_onnx

    return _section("quantize", quantize_onnx, drop=("output", "precision", "data", "data_dir", "evaluate",
                                                     "eval_samples"),
                    add={"precisions": tuple[str, ...]})


def _build_section() -> Section:
    from deploycomp.trt import build_engine

    return _section("build", build_engine, drop=("output", "data", "data_dir", "calib_samples", "calib_method"),
                    add={"enabled": bool})


def _bench_section() -> Section:
    from deploycomp.bench import BenchConfig

    return _section("bench", BenchConfig, drop=("backend", "device"),
                    add={"backends": tuple[str, ...]}, replace={"batches": tuple[int, ...]})


def _data_section() -> Section:
    return Section("data", {"name": str, "dir": str, "input_size": tuple[int, int], "eval_samples": int,
                            "eval_batch": int})


def _report_section() -> Section:
    return Section("report", {"backend": str, "batch": int, "precision": str})


def _variant_section() -> Section:
    return Section("variant", {"name": str, "description": str, "train": _train_section(),
                               "distill": _distill_section(), "prune": _prune_section()}, required=("name",))


# The steps a variant may take, in the order they run (sparsity training before the pruning it prepares).
VARIANT_STEPS = ("train", "distill", "prune")


def _study_fields() -> dict[str, Any]:
    return {"name": str, "description": str, "scale": str, "model": str, "train": _train_section() | None,
            "data": _data_section(), "device": str, "variants": [_variant_section()],
            "export": _export_section() | None, "quantize": _quantize_section() | None,
            "build": _build_section() | None, "bench": _bench_section() | None, "report": _report_section()}


def recipe_section() -> Section:
    """The schema of a whole recipe (a study, or shared defaults plus ``studies``)."""
    fields = _study_fields()
    fields["studies"] = [Section("study", _study_fields(), required=("name",))]
    return Section("recipe", fields)


class _Mismatch(Exception):
    pass


def _describe(hint) -> str:
    if isinstance(hint, Section):
        return f"a mapping ({hint.name} options)"
    if isinstance(hint, _Nullable):
        return f"{_describe(hint.section)} or null"
    if isinstance(hint, list):
        return f"a list of {_describe(hint[0])}s"
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        parts = [_describe(a) for a in args if a is not type(None)]
        return " or ".join(parts) + (" or null" if type(None) in args else "")
    if origin in (tuple, list):
        if len(args) == 2 and args[1] is Ellipsis or origin is list:
            return f"a list of {_describe(args[0])}s"
        return f"a list of {len(args)} {_describe(args[0])}s"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            type(None): "null", Any: "anything"}.get(hint, "a string" if hint is os.PathLike else str(hint))


def _coerce(value, hint, path: str, where: str):
    """``value`` checked against ``hint`` (YAML lists become tuples where a tuple is wanted)."""
    if hint is Any or hint is typing.Any:
        return value
    if isinstance(hint, Section):
        return _check_mapping(value, hint, path, where)
    if isinstance(hint, _Nullable):
        return None if value is None else _coerce(value, hint.section, path, where)
    if isinstance(hint, list):
        if not isinstance(value, list):
            raise _Mismatch(_describe(hint))
        return [_coerce(v, hint[0], f"{path}[{i}]", where) for i, v in enumerate(value)]
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise _Mismatch(_describe(hint))
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, path, where)
            except _Mismatch:
                continue
        raise _Mismatch(_describe(hint))
    if origin in (tuple, list):
        if isinstance(value, (str, int, float)) and not isinstance(value, bool) and len(args) == 2 \
                and args[1] is Ellipsis:
            value = [value]  # a single value where a list is wanted: batches: 8
        if not isinstance(value, (list, tuple)):
            raise _Mismatch(_describe(hint))
        variable = len(args) == 2 and args[1] is Ellipsis or origin is list
        if not variable and len(value) != len(args):
            raise _Mismatch(_describe(hint))
        out = []
        for i, v in enumerate(value):
            try:
                out.append(_coerce(v, args[0] if variable else args[i], f"{path}[{i}]", where))
            except _Mismatch as e:
                raise RecipeError(f"{where}: {path}[{i}]: expected {e}, got {_type_name(v)} {_short(v)}") from None
        return tuple(out)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch("true or false")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch("an integer")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise _Mismatch("a number")
    if hint is str or hint is os.PathLike:
        if isinstance(value, str):
            return value
        raise _Mismatch("a string")
    if hint is type(None):
        if value is None:
            return None
        raise _Mismatch("null")
    return value


def _check_mapping(value, section: Section, path: str, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise RecipeError(f"{where}: {path or 'the recipe'} must be a mapping of {section.name} options "
                          f"({_allowed(section)}), got {_type_name(value)}")
    out = {}
    for key, v in value.items():
        sub = f"{path}.{key}" if path else str(key)
        if key not in section.fields:
            close = difflib.get_close_matches(str(key), section.fields, n=1, cutoff=0.5)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise RecipeError(f"{where}: {sub}: unknown key; {hint}allowed in {section.name}: {_allowed(section)}")
        try:
            out[key] = _coerce(v, section.fields[key], sub, where)
        except _Mismatch as e:
            raise RecipeError(f"{where}: {sub}: expected {e}, got {_type_name(v)} {_short(v)}") from None
    for key in section.required:
        if out.get(key) is None:
            raise RecipeError(f"{where}: {path + '.' if path else ''}{key}: required in {section.name} "
                              f"({_describe(section.fields[key])})")
    return out


def _allowed(section: Section) -> str:
    return ", ".join(section.fields)


def _type_name(v) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a mapping", type(None): "null"}.get(type(v), type(v).__name__)


def _short(v) -> str:
    s = json.dumps(v, default=str) if not isinstance(v, str) else repr(v)
    return s if len(s) <= 40 else s[:37] + "..."


# ==================================================================================================
# Recipes: load, merge studies, validate values


@dataclass
class Study:
    """One model + dataset + variants: one table in the report."""

    name: str
    options: dict[str, Any]  # the validated recipe keys of this study (defaults merged in)
    where: str  # "recipe.yaml" or "recipe.yaml: studies[1]" for messages
    path: str  # key-path prefix for messages ("" or "studies[1].")

    @property
    def variants(self) -> list[dict[str, Any]]:
        return self.options.get("variants") or []


@dataclass
class Recipe:
    path: Path
    name: str
    description: str
    studies: list[Study]
    raw: dict[str, Any]
    sha256: str


def load_recipe(path: str | os.PathLike | None = None) -> Recipe:
    """Read and validate a recipe; every problem is a one-line :class:`RecipeError` before any work."""
    import yaml

    p = Path(path) if path is not None else DEFAULT_RECIPE
    if not os.path.lexists(p):
        raise InputFileError(f"recipe {p} does not exist" + (
            f"; shipped recipes: {', '.join(sorted(x.name for x in RECIPES_DIR.glob('*.yaml')))} in {RECIPES_DIR}"
            if RECIPES_DIR.is_dir() else ""))
    text = read_text(p, "recipe", allow_empty=False)
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise RecipeError(f"{p}: not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None
    where = str(p)
    raw = {} if raw is None else raw
    top = _check_mapping(raw, recipe_section(), "", where)
    shared = {k: v for k, v in top.items() if k != "studies"}
    studies = []
    if top.get("studies"):
        for i, s in enumerate(top["studies"]):
            merged = {**{k: v for k, v in shared.items() if k not in ("name", "description")}, **s}
            studies.append(Study(s["name"], merged, where, f"studies[{i}]."))
    else:
        studies.append(Study(shared.get("name") or p.stem, shared, where, ""))
    recipe = Recipe(p, top.get("name") or p.stem, top.get("description", ""), studies, raw,
                    hashlib.sha256(text.encode()).hexdigest())
    _check_names(recipe)
    for study in studies:
        validate_values(study, p.parent)
    return recipe


def _check_names(recipe: Recipe) -> None:
    names = [s.name for s in recipe.studies]
    for n in names:
        if names.count(n) > 1:
            raise RecipeError(f"{recipe.path}: studies: the name {n!r} is used twice; study names must be unique")
    for s in recipe.studies:
        if not s.variants:
            raise RecipeError(f"{s.where}: {s.path}variants: the study has no variants; list at least one "
                              f"(e.g. `- {{name: magnitude-30, prune: {{method: magnitude, ratio: 0.3}}}}`)")
        seen = [ORIGINAL]
        for i, v in enumerate(s.variants):
            at = f"{s.where}: {s.path}variants[{i}]"
            if v["name"] in seen:
                raise RecipeError(f"{at}.name: {v['name']!r} is used twice (or is the reserved {ORIGINAL!r}); "
                                  "variant names must be unique")
            seen.append(v["name"])
            if not any(v.get(k) for k in VARIANT_STEPS):
                raise RecipeError(f"{at}: says nothing to do; give at least one of {', '.join(VARIANT_STEPS)}")


def _value_error(where: str, path: str, section: dict | None, e: DeploycompError) -> RecipeError:
    """A library's validation message, placed at the key it is about when the message names a --flag."""
    import re

    msg = str(e)
    flag = re.search(r"--([a-z][a-z0-9-]*)", msg)
    named = [k for k, v in (section or {}).items() if isinstance(e, UnknownNameError) and v == e.name]
    if named:  # an unknown registry name: the key whose value it is
        path = f"{path}.{named[0]}"
    elif flag and section is not None:
        key = flag.group(1).replace("-", "_")
        key = {"target_macs": "target_macs_g", "global": "global_pruning", "lambda": "lam"}.get(key, key)
        if key in section:
            path = f"{path}.{key}"
        else:  # a nested section's key, e.g. prune.finetune.train_samples
            sub = next((k for k, v in section.items() if isinstance(v, dict) and key in v), None)
            path = f"{path}.{sub}.{key}" if sub else path
    return RecipeError(f"{where}: {path}: {msg}")


def _checked(where: str, path: str, section: dict | None, fn: Callable[[], Any]):
    try:
        return fn()
    except RecipeError:
        raise
    except DeploycompError as e:
        raise _value_error(where, path, section, e) from None


def validate_values(study: Study, base_dir: Path) -> None:
    """Impossible values and unknown names, by building every config and calling its ``validate()``."""
    from deploycomp import data as data_mod
    from deploycomp.bench.backends import BACKENDS

    o, w, p = study.options, study.where, study.path
    d = o.get("data") or {}
    if d.get("name"):
        _checked(w, f"{p}data.name", None, lambda: data_mod.DATASETS.get(d["name"]))
    for k in ("eval_samples", "eval_batch"):
        if d.get(k) is not None and d[k] <= 0:
            raise RecipeError(f"{w}: {p}data.{k}: must be a positive integer, got {d[k]}")
    if d.get("input_size") is not None and min(d["input_size"]) <= 0:
        raise RecipeError(f"{w}: {p}data.input_size: must be two positive integers [H, W], got {list(d['input_size'])}")
    _checked(w, f"{p}model", None, lambda: resolve_model_ref(o.get("model"), base_dir))
    if o.get("device") is not None:
        from deploycomp.train import resolve_device

        _checked(w, f"{p}device", None, lambda: resolve_device(o["device"]))
    if o.get("train"):
        _checked(w, f"{p}train", o["train"], lambda: train_config(o["train"]).validate())
    for i, v in enumerate(study.variants):
        at = f"{p}variants[{i}]"
        if v.get("train"):
            _checked(w, f"{at}.train", v["train"], lambda v=v: train_config(v["train"]).validate())
            _check_train_extras(w, f"{at}.train", v["train"])
        if v.get("distill"):
            _checked(w, f"{at}.distill", v["distill"], lambda v=v: _distill_params(v["distill"]))
        if v.get("prune"):
            _checked(w, f"{at}.prune", v["prune"], lambda v=v: prune_config(v["prune"], None).validate())
    if o.get("export") is not None:
        from deploycomp.export import resolve_exporter

        e = o["export"]
        _checked(w, f"{p}export", e, lambda: resolve_exporter(e.get("exporter"), e.get("opset")))
        if e.get("batch") is not None and e["batch"] < 1:
            raise RecipeError(f"{w}: {p}export.batch: must be a positive integer, got {e['batch']}")
    if o.get("quantize"):
        from deploycomp.quantize import CALIBRATION_METHODS, PRECISIONS

        q = o["quantize"]
        for j, prec in enumerate(q.get("precisions") or ()):
            _checked(w, f"{p}quantize.precisions[{j}]", None, lambda prec=prec: PRECISIONS.get(prec))
        if q.get("calib_method"):
            _checked(w, f"{p}quantize.calib_method", None, lambda: CALIBRATION_METHODS.get(q["calib_method"]))
        for k in ("calib_samples", "calib_batch"):
            if q.get(k) is not None and q[k] <= 0:
                raise RecipeError(f"{w}: {p}quantize.{k}: must be a positive integer, got {q[k]}")
    if o.get("build"):
        from deploycomp.trt import PRECISIONS as TRT_PRECISIONS

        b = o["build"]
        if b.get("precision") is not None and b["precision"] not in TRT_PRECISIONS:
            raise RecipeError(f"{w}: {p}build.precision: must be one of {', '.join(TRT_PRECISIONS)} or null "
                              f"(the graph's own), got {b['precision']!r}")
    if o.get("bench"):
        b = o["bench"]
        for j, name in enumerate(b.get("backends") or ()):
            _checked(w, f"{p}bench.backends[{j}]", None, lambda name=name: BACKENDS.get(name))
        _checked(w, f"{p}bench", b, lambda: bench_config(b, "torch", None).validate())
    r = o.get("report") or {}
    if r.get("backend"):
        _checked(w, f"{p}report.backend", None, lambda: BACKENDS.get(r["backend"]))


def _check_train_extras(where: str, path: str, t: dict) -> None:
    if t.get("sparsity") is not None and t["sparsity"] < 0:
        raise RecipeError(f"{where}: {path}.sparsity: must be >= 0 (the L1 weight lambda), got {t['sparsity']}")
    sd = t.get("stochastic_depth")
    if sd is not None and not 0 < sd <= 1:
        raise RecipeError(f"{where}: {path}.stochastic_depth: the last block's survival probability must be in "
                          f"(0, 1], got {sd}")


# -- recipe sections -> library configs ("None means default": only the keys given are passed) ------


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

    return BenchConfig(backend=backend, device=device, **_given(b, ("backends", "backend")))


def resolve_model_ref(ref: str | None, base_dir: Path) -> str:
    """``baseline``/None: the shipped baseline; a path (tried as given, beside the recipe, in the repo); a zoo name."""
    from deploycomp.checkpoint import _looks_like_path, default_model
    from deploycomp.zoo import get_spec

    if ref in (None, "baseline"):
        path = Path(default_model())
        if not path.exists():
            raise InputFileError(f"the shipped baseline {path} is missing; train it (see models/README.md) or "
                                 "name another model in the recipe")
        return str(path)
    if _looks_like_path(ref):
        for candidate in (Path(ref), base_dir / ref, REPO_ROOT / ref):
            if candidate.exists():
                return str(candidate.resolve())
        raise InputFileError(f"model file {ref} not found (looked in the current directory, {base_dir} and "
                             f"{REPO_ROOT})")
    get_spec(ref)  # unknown -> one line with the closest zoo name
    return ref


# ==================================================================================================
# Stages


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

    def load_parent_checkpoint(self):
        from deploycomp.checkpoint import load_checkpoint

        return load_checkpoint(self.parent_artifact())

    def data(self, need_train: bool = False):
        return self.study.dataset(need_train)


def _save_model(ckpt, run: StageRun) -> Path:
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
                           need_train=False, input_size=tuple(o["input_size"]) if o.get("input_size") else None)
    run.study.use_data(ds)
    ckpt.source = None  # a copy inside the run: its lineage continues from here
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


def _fit_stage(run: StageRun, ckpt, config, *, loss_fn=None, penalties=(), op: str, lineage: dict) -> dict:
    """Train ``ckpt.model`` with the one shared ``fit()``; resumable from the stage directory."""
    from deploycomp.train import fit

    ds = run.data(need_train=True)
    resume_path = run.dir / "train.resume.pt"
    result = fit(ckpt.model, ds.train, None, config, loss_fn=loss_fn, penalties=penalties,
                 resume_path=resume_path, resume=resume_path.exists())
    params = {"dataset": ds.info.name, **dataclasses.asdict(config), **lineage}
    ckpt.add_lineage(op, **params)
    _save_model(ckpt, run)
    return {"command": op, "params": params, "history": result.history, "train_seconds": result.seconds,
            "synthetic": ds.info.synthetic}


@register_stage("train", MODEL_FILE, produces_model=True)
def _stage_train(run: StageRun) -> dict[str, Any]:
    """Train the previous model (or a fresh zoo model): plain, sparse (slimming), stochastic depth, frozen."""
    o = run.options
    ckpt = _fresh_model(o["model"], run) if o.get("model") else run.load_parent_checkpoint()
    ckpt.source = None
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
    from deploycomp.checkpoint import load_checkpoint
    from deploycomp.distill import kd_loss

    o = run.options
    teacher = load_checkpoint(run.runner.artifact_of_key(run.stage.inputs["teacher_stage"]))
    student = run.load_parent_checkpoint() if o["student"] == "parent" else _fresh_model(o["student"], run)
    student.source = None
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
    return _fit_stage(run, student, config, loss_fn=kd_loss(teacher.model.eval(), **kd), op="distill",
                      lineage=lineage)


@register_stage("prune", MODEL_FILE, produces_model=True)
def _stage_prune(run: StageRun) -> dict[str, Any]:
    """Structured pruning (any registered criterion, depth included) and its fine-tuning."""
    from deploycomp.prune import prune_checkpoint

    o = dict(run.options)
    if o.get("distill_from") in ("original", "parent"):
        o["distill_from"] = str(run.runner.artifact_of_key(run.stage.inputs["teacher_stage"]))
    d = run.study.options.get("data") or {}
    cfg = prune_config(o, run.study.device, d.get("eval_samples"), d.get("eval_batch"))
    ckpt = run.load_parent_checkpoint()
    what = f"ratio {cfg.ratio}" if cfg.ratio is not None else "target"
    console.info(f"{run.stage.label}: pruning with {cfg.method} ({what}), fine-tuning {cfg.finetune_epochs} epoch(s)")
    pruned, record = prune_checkpoint(ckpt, run.data(need_train=True), cfg)
    pruned.source = None
    _save_model(pruned, run)
    return record


@register_stage("evaluate", None)
def _stage_evaluate(run: StageRun) -> dict[str, Any]:
    """Top-1 of the saved checkpoint, reloaded from disk, on the study's evaluation subset; size and MACs."""
    from deploycomp.files import file_size_mib
    from deploycomp.metrics import model_metrics
    from deploycomp.train import evaluate

    o = run.options
    ckpt = run.load_parent_checkpoint()
    ds = run.data()
    acc = evaluate(ckpt.model, ds.test, o.get("eval_batch") or 256, run.study.device, samples=o.get("eval_samples"),
                   description=f"{run.stage.label}: eval")
    console.info(f"{run.stage.label}: top-1 {acc['top1_pct']:.2f}% on {acc['samples']:,} test images")
    return {"test": acc, "dataset": ds.info.name, "synthetic": ds.info.synthetic,
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
    console.info(f"{run.stage.label}: quantizing to {o['precision']}")
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


@register_stage("bench", "bench.json")
def _stage_bench(run: StageRun) -> dict[str, Any]:
    """Latency and throughput of the parent's artifact with one backend at every batch size."""
    from deploycomp import bench

    o = run.options
    cfg = bench_config(o, o["backend"], run.study.device)
    console.info(f"{run.stage.label}: benchmarking ({o['backend']}, batch {', '.join(map(str, cfg.batches))})")
    results = bench.benchmark([str(run.parent_artifact())], cfg)
    bench.write_json(str(run.dir / "bench.json"), results)
    return {"backend": o["backend"], "results": results}


# ==================================================================================================
# Planning: recipe -> stage graph


@dataclass
class Branch:
    """One row of the report: a variant's model stage and what hangs off it."""

    name: str
    description: str
    model: Stage
    steps: list[Stage]  # the compression stages from the original (empty for the original)
    evaluate: Stage | None = None
    export: Stage | None = None
    quantize: dict[str, Stage] = field(default_factory=dict)  # precision -> stage
    build: dict[str, Stage] = field(default_factory=dict)  # precision -> stage
    bench: list[tuple[str, str, Stage]] = field(default_factory=list)  # (precision, backend, stage)

    def stages(self) -> list[Stage]:
        out = [*self.steps, self.evaluate, self.export, *self.quantize.values(), *self.build.values(),
               *(s for _, _, s in self.bench)]
        return [s for s in out if s is not None]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "model": self.model.id,
                "steps": [s.id for s in self.steps], "evaluate": self.evaluate.id if self.evaluate else None,
                "export": self.export.id if self.export else None,
                "quantize": {k: s.id for k, s in self.quantize.items()},
                "build": {k: s.id for k, s in self.build.items()},
                "bench": [{"precision": p, "backend": b, "stage": s.id, "source": s.parent.kind,
                           "source_stage": s.parent.id} for p, b, s in self.bench]}


@dataclass
class StudyPlan:
    study: Study
    root: Stage
    branches: list[Branch]
    device: str | None
    data_dir: str | None
    notes: list[str]
    data_name: str | None = None  # the dataset the load stage settled on (the model's, unless the recipe says)
    data_size: tuple[int, int] | None = None  # (H, W) the model takes
    _data: Any = None

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
        for s in [self.root, *(x for b in self.branches for x in b.stages())]:
            if s.key not in seen:
                seen.add(s.key)
                out.append(s)
        return out


def _file_identity(ref: str) -> str:
    from deploycomp.files import sha256

    return f"sha256:{sha256(ref)}" if Path(ref).is_file() else ref


def plan_study(study: Study, base_dir: Path, tensorrt: bool) -> StudyPlan:
    """The stage graph of one study: the original branch first, then every variant."""
    o = study.options
    d = o.get("data") or {}
    model = resolve_model_ref(o.get("model"), base_dir)
    data_dir = d.get("dir")
    if data_dir and not Path(data_dir).is_absolute() and (base_dir / data_dir).exists():
        data_dir = str((base_dir / data_dir).resolve())
    notes: list[str] = []
    root = Stage("load", {"model": Path(model).name if Path(model).is_file() else model, "data": d.get("name"),
                          "input_size": d.get("input_size")},
                 None, f"{study.name}/{ORIGINAL}: load", {"model": _file_identity(model)},
                 {"model_path": model, "data_dir": data_dir})  # the file's hash is the identity, not its path
    original_model = root
    if o.get("train"):
        original_model = Stage("train", dict(o["train"]), root, f"{study.name}/{ORIGINAL}: train")
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
            inputs = {}
            if kind == "distill":
                teacher = opts.get("teacher", "parent")
                inputs["teacher_stage"] = (original_model if teacher in ("original",) else parent).id
                opts.setdefault("teacher", "parent")
            if kind == "prune":
                if opts.get("distill_from") in ("original", "parent"):
                    t = original_model if opts["distill_from"] == "original" else parent
                    inputs["teacher_stage"] = t.id
                elif opts.get("distill_from"):
                    ref = resolve_model_ref(opts["distill_from"], base_dir)
                    opts["distill_from"] = ref
                    inputs["teacher"] = _file_identity(ref)
                opts.update({k: val for k, val in eval_opts.items() if val is not None})
            parent = Stage(kind, opts, parent, f"{study.name}/{v['name']}: {kind}", inputs)
            steps.append(parent)
        branches.append(Branch(v["name"], v.get("description") or describe_steps(v), parent, steps))
    for b in branches:
        b.evaluate = Stage("evaluate", eval_opts, b.model, f"{study.name}/{b.name}: evaluate")
        _plan_deploy(b, o, study, tensorrt, eval_opts, notes)
    if not tensorrt and (o.get("build") or {}).get("enabled", True) and o.get("build") is not None:
        notes.append("TensorRT is not installed here: no engines were built and the trt backend was not measured")
    return StudyPlan(study, root, branches, device, data_dir, notes)


def _plan_deploy(b: Branch, o: dict, study: Study, tensorrt: bool, eval_opts: dict, notes: list[str]) -> None:
    label = f"{study.name}/{b.name}"
    bench = o.get("bench")
    backends = list((bench or {}).get("backends") or ("torch", "ort"))
    bench_opts = _given(bench, ("backends",)) if bench is not None else None
    artifacts: list[tuple[str, Stage]] = [("fp32", b.model)]
    if o.get("export") is not None:
        b.export = Stage("export", _given(o["export"]), b.model, f"{label}: export")
        artifacts.append(("fp32", b.export))
        q = o.get("quantize")
        for prec in (q or {}).get("precisions") or ():
            qopts = {**_given(q, ("precisions",)), "precision": prec, "eval_samples": eval_opts["eval_samples"]}
            b.quantize[prec] = Stage("quantize", qopts, b.export, f"{label}: quantize {prec}")
            artifacts.append((prec, b.quantize[prec]))
        build = o.get("build")
        if tensorrt and build is not None and build.get("enabled", True):
            for prec, src in [("fp32", b.export), *b.quantize.items()]:
                b.build[prec] = Stage("build", _given(build, ("enabled",)), src, f"{label}: build {prec}")
                artifacts.append((prec, b.build[prec]))
    if bench_opts is None:
        return
    from deploycomp.bench.backends import get_backend

    for prec, stage in artifacts:
        natural = {"export": "ort", "quantize": "ort", "build": "trt"}.get(stage.kind, "torch")
        for backend in backends:
            if get_backend(backend).family != get_backend(natural).family:
                continue
            opts = {**bench_opts, "backend": backend}
            b.bench.append((prec, backend, Stage("bench", opts, stage, f"{label}: bench {backend} {prec}")))


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
        amount = f"{p['ratio']:g}" if p.get("ratio") is not None else (
            f"{p['target_macs_g']:g} GMACs" if p.get("target_macs_g") else f"{p.get('target_speedup')}x")
        ft = p.get("finetune", {}) or {}
        ft_text = "no fine-tune" if "finetune" in p and p["finetune"] is None else \
            f"fine-tune {ft.get('epochs', 1)} ep"
        parts.append(f"prune {p.get('method', 'magnitude')} {amount}, {ft_text}")
    return " -> ".join(parts)


# ==================================================================================================
# Running


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
                         "bench": _given(p.options.get("bench")), "branches": [b.to_dict() for b in p.branches]}
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
