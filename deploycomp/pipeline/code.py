"""User code named in a recipe: where it is, what it may load, and the run's record of it.

A recipe names user code (``path/to/file.py:factory`` or ``package.module:factory``) where a model is
built from it (``model``, ``train.model``, ``distill.student``, ``distill.teacher``) or where a checkpoint
made from it is loaded (``arch`` for a ``model`` file, ``distill.teacher_arch``, ``prune.distill_from_arch``).
Naming it in the recipe is the user's consent to run it for that run, as typing ``--model`` or ``--arch``
is on the command line: the stages then reload the run's own checkpoints built from it without asking
again, and ``run.json`` records each entry point with its file and hash. Code that a checkpoint names but
the recipe does not is never run: the recipe is refused, naming the key that would name it.

A ``file.py`` is looked for as given (relative to the current directory), then beside the recipe, like
a model file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deploycomp.pipeline.schema import RecipeError

Key = tuple[str, ...]

# Keys of a study, then of each variant, whose value may be user code (in the order they are reported).
STUDY_CODE_KEYS: tuple[Key, ...] = (("model",), ("arch",), ("train", "model"), ("bench", "arch"))
VARIANT_CODE_KEYS: tuple[Key, ...] = (("train", "model"), ("distill", "student"), ("distill", "teacher"),
                                      ("distill", "teacher_arch"), ("prune", "distill_from"),
                                      ("prune", "distill_from_arch"))
# A key that may name a checkpoint file -> the key that names the code that file was built from.
FILE_KEYS: dict[Key, Key] = {("model",): ("arch",), ("distill", "teacher"): ("distill", "teacher_arch"),
                             ("prune", "distill_from"): ("prune", "distill_from_arch")}
STAGE_REFS = ("parent", "original")  # teacher values that mean a stage of the run, not a model reference


def get_key(options: dict[str, Any], key: Key) -> Any:
    for part in key:
        options = options.get(part) if isinstance(options, dict) else None
    return options


def key_text(key: Key, prefix: str = "") -> str:
    return prefix + ".".join(key)


def resolve_code_ref(ref: str, base_dir: Path) -> str:
    """``file.py:factory`` with the file as given if it exists there, else beside the recipe; other refs as given."""
    from deploycomp.zoo import _ENTRY, is_user_code

    if not is_user_code(ref):
        return ref
    m = _ENTRY.match(ref)
    target = m.group("target")
    if target.endswith(".py") and not Path(target).expanduser().exists() and (base_dir / target).is_file():
        return f"{(base_dir / target).resolve()}:{m.group('attr')}"
    return ref


def resolve_arch(ref: str, base_dir: Path) -> str:
    """An ``arch`` value: user code (resolved as above, and imported: the recipe names it) or a zoo name."""
    from deploycomp.zoo import get_spec

    ref = resolve_code_ref(ref, base_dir)
    get_spec(ref)  # unknown -> one line with the closest zoo name; user code -> imported, errors in one line
    return ref


def named_code(options: dict[str, Any], variants: list[dict[str, Any]], base_dir: Path) -> dict[str, str]:
    """The user code a study names, resolved: ``{entry point: the first key path that names it}``."""
    from deploycomp.zoo import is_user_code

    found: dict[str, str] = {}
    places = [(k, options, "") for k in STUDY_CODE_KEYS]
    places += [(k, v, f"variants[{i}].") for i, v in enumerate(variants) for k in VARIANT_CODE_KEYS]
    for key, where, prefix in places:
        value = get_key(where, key)
        if isinstance(value, str) and is_user_code(value):
            found.setdefault(resolve_code_ref(value, base_dir), key_text(key, prefix))
    return found


def file_places(options: dict[str, Any], variants: list[dict[str, Any]], prefix: str = ""):
    """``(section, key prefix, file key)`` of every key of a study that may name a checkpoint file."""
    yield options, prefix, ("model",)
    for i, v in enumerate(variants):
        for key in (("distill", "teacher"), ("prune", "distill_from")):
            if get_key(v, key[:1]) is not None:
                yield v, f"{prefix}variants[{i}].", key


def file_code_error(where: str, at: str, file_key: Key, path: str, arch: str | None) -> RecipeError | None:
    """The error for a checkpoint file built from user code that its arch key does not name (None: all is well)."""
    from deploycomp.checkpoint import recorded_code
    from deploycomp.zoo import is_user_code

    entry = recorded_code(path)
    if entry is None or (arch is not None and is_user_code(arch)):
        return None
    arch_key = key_text(FILE_KEYS[file_key], at)
    given = f"{arch_key}: {arch} is not user code; " if arch is not None else ""
    return RecipeError(f"{where}: {key_text(file_key, at)}: {path} was built by user code {entry}; {given}loading it "
                       f"imports and runs that code, so name it in the recipe: {arch_key}: {entry} (or where that "
                       "code lives now)")


def code_record(code: dict[str, str]) -> list[dict[str, Any]]:
    """What ``run.json`` keeps of the code a study ran: entry point, the key naming it, file and hash."""
    return [{"entry": entry, "named_in": key, **_file_and_hash(entry)} for entry, key in code.items()]


def code_identity(ref: str) -> str:
    """A user code reference with the hash of its file (a changed file is a new stage); other refs as they are."""
    facts = _file_and_hash(ref)
    return f"{ref} sha256:{facts['sha256']}" if facts.get("sha256") else ref


def _file_and_hash(ref: str) -> dict[str, Any]:
    from deploycomp.files import sha256
    from deploycomp.zoo import get_spec, is_user_code

    if not is_user_code(ref):
        return {}
    file = get_spec(ref).code_file
    return {"file": file, "sha256": sha256(file) if file and Path(file).is_file() else None}
