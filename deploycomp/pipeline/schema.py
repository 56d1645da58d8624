"""Recipe schema: the keys a recipe may have, taken from the libraries' config dataclasses and signatures.

Each section of a recipe is a pydantic model built from a library's own fields (:class:`TrainConfig`,
:class:`PruneConfig`, :class:`BenchConfig`, the keyword parameters of :func:`export_onnx`, ...), so an
option added there is accepted here without a second list. Unknown keys are refused, YAML lists become
tuples where a tuple is wanted (and a single value a one-element tuple: ``batches: 8``); numbers, integers
and booleans are strict (``epochs: yes`` is refused) except that a number may be written the way PyYAML
leaves it a string (``1e-4``). :func:`check_recipe` returns the keys *given* (nothing filled in: "None
means default"), and turns pydantic's first error into one :class:`RecipeError` line naming the file and
the key path, e.g. ``recipe.yaml: variants[0].prune.ratoi: unknown key; did you mean 'ratio'? ...``.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import json
import os
import types
import typing
from typing import Annotated, Any

import pydantic
from pydantic import BeforeValidator, ConfigDict, Strict

from deploycomp.errors import UsageError


class RecipeError(UsageError):
    """A recipe that cannot run: one line with the file, the key path and what is allowed."""


# The steps a variant may take, in the order they run (sparsity training before the pruning it prepares).
VARIANT_STEPS = ("train", "distill", "prune", "qat")  # qat last: it fine-tunes the final weights for INT8

Section = type[pydantic.BaseModel]  # one mapping of a recipe: its name is the model's __name__
_CONFIG = ConfigDict(extra="forbid", arbitrary_types_allowed=True)


# -- type hints of the libraries -> pydantic field types --------------------------------------------


def _number(v):
    """PyYAML reads ``1e-4`` (no dot) as a string: take it as the number it is."""
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            pass
    return v


def _one_or_many(v):
    """A single value where a list is wanted (``batches: 8``) is a list of one."""
    return [v] if isinstance(v, (str, int, float)) and not isinstance(v, bool) else v


_LEAVES = {bool: Annotated[bool, Strict()], int: Annotated[int, Strict()], str: Annotated[str, Strict()],
           os.PathLike: Annotated[str, Strict()], float: Annotated[float, BeforeValidator(_number), Strict()]}


def _field_type(hint):
    """``hint`` with strict leaves; tuples and lists accept YAML lists (and one value for ``tuple[X, ...]``)."""
    if hint in _LEAVES:
        return _LEAVES[hint]
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return typing.Union[tuple(_field_type(a) for a in args)]  # noqa: UP007 (built from a tuple)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return Annotated[tuple[_field_type(args[0]), ...], BeforeValidator(_one_or_many)]
    if origin is tuple and args:
        return tuple[tuple(_field_type(a) for a in args)]
    if origin is list and args:
        return list[_field_type(args[0])]
    return hint


def _hints_of(obj) -> dict[str, Any]:
    """Type hints of a dataclass's fields or of a function's keyword parameters."""
    if dataclasses.is_dataclass(obj):
        hints = typing.get_type_hints(obj)
        return {f.name: hints[f.name] for f in dataclasses.fields(obj)}
    sig = inspect.signature(obj, eval_str=True)
    return {n: p.annotation for n, p in sig.parameters.items() if p.kind == p.KEYWORD_ONLY}


def _model(name: str, fields: dict[str, Any], required: tuple[str, ...] = ()) -> Section:
    """A section: ``fields`` is key -> type hint or nested section; every key optional unless ``required``."""
    spec = {k: (v if isinstance(v, type) and issubclass(v, pydantic.BaseModel) else _field_type(v),
                ... if k in required else None) for k, v in fields.items()}
    return pydantic.create_model(name, __config__=_CONFIG, **spec)


def _section(name: str, source, *, drop: tuple[str, ...] = (), add: dict[str, Any] | None = None,
             replace: dict[str, Any] | None = None, required: tuple[str, ...] = ()) -> Section:
    fields = {k: v for k, v in _hints_of(source).items() if k not in drop}
    fields.update(replace or {})
    fields.update(add or {})
    return _model(name, fields, required)


# -- the sections ------------------------------------------------------------------------------------


def _train_section(name: str = "train") -> Section:
    from deploycomp.train import TrainConfig

    # device comes from the recipe's top-level `device`; the extras are `deploycomp train`'s own options.
    return _section(name, TrainConfig, drop=("device",), add={
        "sparsity": float,  # network slimming: lambda * sum |gamma| added to the loss
        "stochastic_depth": float,  # survival probability of the last residual block (Huang et al.)
        "freeze": str,  # module-name prefixes kept fixed, e.g. "stem,layer1"
        "model": str,  # a zoo name to train from scratch instead of continuing from the previous model
    })


def _qat_section() -> Section:
    from deploycomp.train import TrainConfig

    # quantization-aware fine-tuning (`deploycomp train --qat TARGET`): the train options plus the target
    return _section("qat", TrainConfig, drop=("device",), add={"target": str, "all_layers": bool})


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
    # teacher: parent (default), original, or a model reference (checkpoint file, zoo name, user code);
    # teacher_arch: the user code a teacher checkpoint was built from (`deploycomp distill --teacher-arch`)
    return _model("distill", {"student": str, "teacher": str, "teacher_arch": str, **kd, "train": _train_section()},
                  required=("student",))


def _export_section() -> Section:
    from deploycomp.export import export_onnx

    return _section("export", export_onnx, drop=("data", "data_dir", "dataset"),
                    replace={"input_size": tuple[int, int] | None})


def _quantize_section() -> Section:
    from deploycomp.quantize import quantize_onnx

    # target: the pipeline quantizes INT8 for the backend that runs it (ort-cpu for ONNX Runtime, tensorrt for builds)
    return _section("quantize", quantize_onnx, drop=("output", "precision", "data", "data_dir", "evaluate",
                                                     "eval_samples", "target"),
                    add={"precisions": tuple[str, ...]})


def _build_section() -> Section:
    from deploycomp.trt import build_engine

    return _section("build", build_engine, drop=("output", "data", "data_dir", "calib_samples", "calib_method"),
                    add={"enabled": bool})


def _bench_section() -> Section:
    from deploycomp.bench import BenchConfig

    # memory: true (every backend) or the backends whose artifacts get memory figures, e.g. [ort]
    return _section("bench", BenchConfig, drop=("backend", "device"),
                    add={"backends": tuple[str, ...]},
                    replace={"batches": tuple[int, ...], "memory": bool | tuple[str, ...]})


def _study_fields() -> dict[str, Any]:
    data = _model("data", {"name": str, "dir": str, "input_size": tuple[int, int], "eval_samples": int,
                           "eval_batch": int})
    variant = _model("variant", {"name": str, "description": str, "train": _train_section(),
                                 "distill": _distill_section(), "prune": _prune_section(), "qat": _qat_section()},
                     required=("name",))
    # arch: the user code a `model` checkpoint was built from, or the architecture of a plain state dict (--arch)
    return {"name": str, "description": str, "scale": str, "model": str, "arch": str,
            "train": _train_section() | None,
            "data": data, "device": str, "variants": list[variant],
            "export": _export_section() | None, "quantize": _quantize_section() | None,
            "build": _build_section() | None, "bench": _bench_section() | None,
            "report": _model("report", {"backend": str, "batch": int, "precision": str})}


@functools.lru_cache(maxsize=1)
def recipe_section() -> Section:
    """The schema of a whole recipe (a study, or shared defaults plus ``studies``)."""
    study = _model("study", _study_fields(), required=("name",))
    return _model("recipe", {**_study_fields(), "studies": list[study]})


# -- checking, and pydantic's errors as one line --------------------------------------------------------


def check_recipe(raw: Any, where: str) -> dict[str, Any]:
    """The keys of ``raw`` (a parsed YAML recipe) checked and coerced; only the keys given are returned."""
    try:
        return recipe_section().model_validate(raw).model_dump(exclude_unset=True)
    except pydantic.ValidationError as e:
        errors = e.errors()
        first = next((x for x in errors if x["type"] == "extra_forbidden"), errors[0])  # a typo explains the rest
        raise RecipeError(f"{where}: {_message(first)}") from None


def _message(error: dict[str, Any]) -> str:
    """``key.path: what is wrong`` for one pydantic error."""
    section, hint, path = _follow(error["loc"])
    value, kind = error["input"], error["type"]
    allowed = ", ".join(section.model_fields)
    if kind == "extra_forbidden":
        key = str(error["loc"][-1])
        close = difflib.get_close_matches(key, section.model_fields, n=1, cutoff=0.5)
        hint_text = f"did you mean {close[0]!r}? " if close else ""
        return f"{path}: unknown key; {hint_text}allowed in {section.__name__}: {allowed}"
    if kind == "missing":
        return f"{path}: required in {section.__name__} ({_describe(hint)})"
    if kind == "model_type" and _is_section(_unwrap(hint)):
        inner = _unwrap(hint)
        return (f"{path or 'the recipe'} must be a mapping of {inner.__name__} options "
                f"({', '.join(inner.model_fields)}), got {_type_name(value)}")
    return f"{path}: expected {_describe(hint)}, got {_type_name(value)} {_short(value)}"


def _follow(loc: tuple) -> tuple[Section, Any, str]:
    """The section holding the error, the type hint at the error and its key path (``a.b[2].c``).

    The path stops where pydantic's location leaves the schema's keys and list indices (the member of a
    union it tried), so the message describes the whole union.
    """
    section, hint, path = recipe_section(), recipe_section(), ""
    for part in loc:
        inner = _unwrap(hint)
        if _is_section(inner) and part in inner.model_fields:
            section, hint = inner, inner.model_fields[part].annotation
        elif _is_section(inner):  # an unknown key
            section, hint = inner, None
        elif isinstance(part, int) and typing.get_origin(inner) in (list, tuple):
            args = typing.get_args(inner)
            hint = args[0] if len(args) == 1 or args[1] is Ellipsis else args[min(part, len(args) - 1)]
        else:
            break
        path = f"{path}[{part}]" if isinstance(part, int) else f"{path}.{part}" if path else str(part)
    return section, hint, path


def _unwrap(hint):
    """Annotated[X, ...] -> X; X | None -> X (a union of several types stays)."""
    while True:
        if typing.get_origin(hint) is Annotated:
            hint = typing.get_args(hint)[0]
            continue
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            rest = [a for a in typing.get_args(hint) if a is not type(None)]
            if len(rest) == 1:
                hint = rest[0]
                continue
        return hint


def _is_section(hint) -> bool:
    return isinstance(hint, type) and issubclass(hint, pydantic.BaseModel)


def _describe(hint) -> str:
    if typing.get_origin(hint) is Annotated:
        return _describe(typing.get_args(hint)[0])
    if _is_section(hint):
        return f"a mapping ({hint.__name__} options)"
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        parts = [_describe(a) for a in args if a is not type(None)]
        return " or ".join(parts) + (" or null" if type(None) in args else "")
    if origin in (tuple, list):
        if origin is list or len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_plural(_describe(args[0]))}"
        return f"a list of {len(args)} {_plural(_describe(args[0]))}"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            type(None): "null", Any: "anything"}.get(hint, str(hint))


def _plural(description: str) -> str:
    """``an integer`` -> ``integers``, ``a mapping (variant options)`` -> ``mappings (variant options)``."""
    words = description.split(" ", 2)
    if words[0] not in ("a", "an") or len(words) < 2:
        return description
    return " ".join([words[1] + "s", *words[2:]])


def _type_name(v) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a mapping", type(None): "null"}.get(type(v), type(v).__name__)


def _short(v) -> str:
    s = json.dumps(v, default=str) if not isinstance(v, str) else repr(v)
    return s if len(s) <= 40 else s[:37] + "..."
