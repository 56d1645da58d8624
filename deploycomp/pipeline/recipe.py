"""Recipes: read the YAML, check it against the schema, merge shared keys into studies, validate values.

Values are checked by building every library config and calling its ``validate()``, so a recipe is
refused (one line naming the file and the key path) before any work starts.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploycomp.errors import DeploycompError, InputFileError, UnknownNameError
from deploycomp.files import read_text
from deploycomp.pipeline.configs import _distill_params, bench_config, prune_config, train_config
from deploycomp.pipeline.schema import VARIANT_STEPS, RecipeError, check_recipe

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
RECIPES_DIR = REPO_ROOT / "benchmarks" / "recipes"
DEFAULT_RECIPE = RECIPES_DIR / "default.yaml"
ORIGINAL = "original"  # name of the branch without compression (always the first row)


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
    top = check_recipe(raw, where)
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
    _registered(w, f"{p}data.name", d.get("name"), data_mod.DATASETS)
    _positive(w, f"{p}data", d, ("eval_samples", "eval_batch"))
    if d.get("input_size") is not None and min(d["input_size"]) <= 0:
        raise RecipeError(f"{w}: {p}data.input_size: must be two positive integers [H, W], got {list(d['input_size'])}")
    _check_model_refs(w, p, o, study.variants, base_dir)
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
        if v.get("qat"):
            from deploycomp.quantize import INT8_TARGETS

            q = dict(v["qat"])
            _registered(w, f"{at}.qat.target", q.pop("target", None), INT8_TARGETS)
            q.pop("all_layers", None)
            _checked(w, f"{at}.qat", v["qat"], lambda q=q: train_config(q).validate())
    if o.get("export") is not None:
        from deploycomp.export import resolve_exporter

        e = o["export"]
        _checked(w, f"{p}export", e, lambda: resolve_exporter(e.get("exporter"), e.get("opset")))
        _positive(w, f"{p}export", e, ("batch",))
    if o.get("quantize"):
        from deploycomp.quantize import CALIBRATION_METHODS, PRECISIONS

        q = o["quantize"]
        _registered(w, f"{p}quantize.precisions", q.get("precisions"), PRECISIONS)
        _registered(w, f"{p}quantize.calib_method", q.get("calib_method"), CALIBRATION_METHODS)
        _positive(w, f"{p}quantize", q, ("calib_samples", "calib_batch"))
    if o.get("build"):
        from deploycomp.trt import PRECISIONS as TRT_PRECISIONS

        b = o["build"]
        if b.get("precision") is not None and b["precision"] not in TRT_PRECISIONS:
            raise RecipeError(f"{w}: {p}build.precision: must be one of {', '.join(TRT_PRECISIONS)} or null "
                              f"(the graph's own), got {b['precision']!r}")
    if o.get("bench"):
        b = o["bench"]
        _registered(w, f"{p}bench.backends", b.get("backends"), BACKENDS)
        _checked(w, f"{p}bench", b, lambda: bench_config(b, "torch", None).validate())
    _registered(w, f"{p}report.backend", (o.get("report") or {}).get("backend"), BACKENDS)


def _check_model_refs(where: str, prefix: str, options: dict, variants: list[dict], base_dir: Path) -> None:
    """Every model reference resolves, and every checkpoint file built from user code has that code named."""
    from deploycomp.pipeline.code import (
        FILE_KEYS,
        STAGE_REFS,
        file_code_error,
        file_places,
        get_key,
        key_text,
        resolve_arch,
    )

    for section, at, file_key in file_places(options, variants, prefix):
        value, arch_key = get_key(section, file_key), FILE_KEYS[file_key]
        arch = get_key(section, arch_key)
        path = None
        if file_key == ("model",) or value not in (None, *STAGE_REFS):  # not a stage of the run
            path = _checked(where, key_text(file_key, at), None, lambda v=value: resolve_model_ref(v, base_dir))
        is_file = path is not None and Path(path).is_file()
        if arch is not None and not is_file:
            raise RecipeError(f"{where}: {key_text(arch_key, at)}: is for a checkpoint or state-dict file given as "
                              f"{key_text(file_key, at)}, and {value or STAGE_REFS[0]!r} is not a file (it is built "
                              "from its own name, or is a stage of the run); drop it")
        if arch is not None:
            _checked(where, key_text(arch_key, at), None, lambda a=arch: resolve_arch(a, base_dir))
        if is_file and (error := file_code_error(where, at, file_key, path, arch)) is not None:
            raise error


def _positive(where: str, path: str, section: dict, keys: tuple[str, ...]) -> None:
    for k in keys:
        if section.get(k) is not None and section[k] <= 0:
            raise RecipeError(f"{where}: {path}.{k}: must be a positive integer, got {section[k]}")


def _registered(where: str, path: str, names: str | tuple[str, ...] | None, registry) -> None:
    """Each of ``names`` (one name, or a list: ``path[i]`` in messages) is in ``registry``."""
    items = [(path, names)] if isinstance(names, str) else [(f"{path}[{j}]", n) for j, n in enumerate(names or ())]
    for at, name in items:
        _checked(where, at, None, lambda name=name: registry.get(name))


def _check_train_extras(where: str, path: str, t: dict) -> None:
    if t.get("sparsity") is not None and t["sparsity"] < 0:
        raise RecipeError(f"{where}: {path}.sparsity: must be >= 0 (the L1 weight lambda), got {t['sparsity']}")
    sd = t.get("stochastic_depth")
    if sd is not None and not 0 < sd <= 1:
        raise RecipeError(f"{where}: {path}.stochastic_depth: the last block's survival probability must be in "
                          f"(0, 1], got {sd}")



def resolve_model_ref(ref: str | None, base_dir: Path) -> str:
    """``baseline``/None: the shipped baseline; a path (tried as given, beside the recipe, in the repo); a zoo name;
    user code (its file tried as given, then beside the recipe; imported here: the recipe names it)."""
    from deploycomp.checkpoint import _looks_like_path, default_model
    from deploycomp.pipeline.code import resolve_code_ref
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
    ref = resolve_code_ref(ref, base_dir)
    get_spec(ref)  # unknown -> one line with the closest zoo name
    return ref
