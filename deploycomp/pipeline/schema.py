"""Recipe schema: the keys a recipe may have, taken from the libraries' config dataclasses and signatures.

:func:`recipe_section` describes a whole recipe; :func:`_check_mapping` checks a YAML mapping against a
section (unknown keys with the closest valid one, wrong types, required keys), turning YAML lists into
tuples where a tuple is wanted. Every problem is a one-line :class:`RecipeError` naming the file and the
key path.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import json
import os
import types
import typing
from dataclasses import dataclass
from typing import Any

from deploycomp.errors import UsageError


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
