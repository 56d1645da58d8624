"""Atomic writes, JSON sidecars and hashes: an interrupted run never leaves a half-written artifact."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from deploycomp.errors import InputFileError, UsageError


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")
    return Path(path)


def read_json(path: str | os.PathLike) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InputFileError(f"{path} does not exist") from None
    except (OSError, json.JSONDecodeError) as e:
        raise InputFileError(f"cannot read JSON from {path}: {e}") from None


def _json_default(o: Any):
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, (set, tuple)):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def sidecar_path(artifact: str | os.PathLike) -> Path:
    """The JSON record written beside an artifact: ``model.onnx`` -> ``model.onnx.json``."""
    return Path(f"{artifact}.json")


def sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def ensure_not_input(output: str | os.PathLike, *inputs: str | os.PathLike | None) -> None:
    """Refuse to write ``output`` over one of the command's own inputs."""
    out = Path(output).resolve()
    for i in inputs:
        if i is not None and Path(i).exists() and Path(i).resolve() == out:
            raise UsageError(f"output {output} is the command's own input; choose another -o path")


def require_file(path: str | os.PathLike, what: str = "file") -> Path:
    p = Path(path)
    if not p.exists():
        raise InputFileError(f"{what} {path} does not exist")
    if not p.is_file():
        raise InputFileError(f"{what} {path} is not a file")
    if not os.access(p, os.R_OK):
        raise InputFileError(f"{what} {path} is not readable")
    return p


def file_size_mib(path: str | os.PathLike) -> float:
    return os.path.getsize(path) / 2**20
