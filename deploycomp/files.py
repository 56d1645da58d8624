"""Files in and out: the checks every file argument goes through, atomic writes, JSON sidecars, hashes.

A bad file given to any option ends in one line that names it and says what is wrong with it (missing,
empty, a directory, unreadable, a symbolic link loop, or another kind of file than the one expected).
Every artifact is written to a temporary name beside its final one and renamed when complete, so an
interrupted run or a full disk never leaves a half-written file under the final name.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from deploycomp.errors import InputFileError, OutputFileError, UsageError

# Leading bytes -> what the file is, so that a wrong file is named for what it is ("a PNG image").
MAGIC = (
    (b"PK\x03\x04", "a ZIP archive (a PyTorch checkpoint or another archive)"),
    (b"\x80", "a Python pickle"),
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"\x1f\x8b", "a gzip file"),
    (b"%PDF", "a PDF document"),
)
# Errors of a write that say the disk cannot take the output (as opposed to a bug in what is being written).
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)
_WRITE_HINTS = {
    errno.ENOSPC: "the disk is full; free some space or write elsewhere (-o)",
    errno.EDQUOT: "the disk quota is exhausted; free some space or write elsewhere (-o)",
    errno.EFBIG: "the file is larger than this file system or process allows; write elsewhere (-o)",
    errno.EROFS: "the file system is read-only; write elsewhere (-o)",
    errno.EACCES: "the directory is not writable; write elsewhere (-o) or fix its permissions",
    errno.EPERM: "the directory is not writable; write elsewhere (-o) or fix its permissions",
}


# --------------------------------------------------------------------------------------------------
# Inputs


def describe_kind(path: str | os.PathLike) -> str | None:
    """What the file looks like from its first bytes ("a PNG image", "an ONNX model", ...); None: unknown."""
    try:
        with open(path, "rb") as f:
            head = f.read(256)
    except OSError:
        return None
    if not head:
        return "an empty file"
    for magic, what in MAGIC:
        if head.startswith(magic):
            return what
    # ONNX ModelProto: field 1 (ir_version, a small varint) first, then producer_name/graph/opset_import.
    if len(head) > 2 and head[0] == 0x08 and 1 <= head[1] <= 30 and head[2] in (0x12, 0x1A, 0x22, 0x2A, 0x3A, 0x42):
        return "an ONNX model"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return "a JSON file" if text.lstrip()[:1] in ("{", "[") else "a text file"


def require_file(path: str | os.PathLike, what: str = "file", *, allow_empty: bool = False) -> Path:
    """``path`` as a Path when it is a readable, non-empty regular file; else a one-line InputFileError."""
    p = Path(path)
    try:
        st = os.stat(p)  # follows symbolic links
    except FileNotFoundError:
        if os.path.islink(p):
            raise InputFileError(f"{what} {path} is a broken symbolic link (to {os.readlink(p)}, which does not "
                                 "exist)") from None
        raise InputFileError(f"{what} {path} does not exist") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise InputFileError(f"{what} {path} is a symbolic link loop; point the link at a real file") from None
        if e.errno == errno.ENOTDIR:
            raise InputFileError(f"{what} {path} does not exist (a part of its path is a file)") from None
        raise InputFileError(f"cannot read {what} {path}: {e.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise InputFileError(f"{what} {path} is a directory, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise InputFileError(f"{what} {path} is not a regular file (a device, pipe or socket)")
    try:
        with open(p, "rb"):
            pass
    except OSError as e:
        raise InputFileError(f"{what} {path} is not readable ({e.strerror}); fix its permissions") from None
    if st.st_size == 0 and not allow_empty:
        raise InputFileError(f"{what} {path} is empty (0 bytes), perhaps an interrupted copy; give the complete file")
    return p


def wrong_kind(path: str | os.PathLike, expected: str, hint: str = "") -> InputFileError:
    """The error for a file of another kind than ``expected`` ("x.onnx is an ONNX model, not a checkpoint")."""
    kind = describe_kind(path)
    found = f"is {kind}" if kind else "holds data of an unknown kind"
    return InputFileError(f"{path} {found}, not {expected}" + (f"; {hint}" if hint else ""))


def read_text(path: str | os.PathLike, what: str = "file", *, allow_empty: bool = True) -> str:
    """The UTF-8 text of a file given by the user, with one-line errors for every way that fails."""
    p = require_file(path, what, allow_empty=allow_empty)
    kind = describe_kind(p)
    if kind not in ("a text file", "a JSON file", "an empty file"):
        raise wrong_kind(p, f"a text {what}")
    try:
        return p.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise wrong_kind(p, f"a text {what}") from None
    except OSError as e:
        raise InputFileError(f"cannot read {what} {path}: {e.strerror}") from None


def read_json(path: str | os.PathLike) -> Any:
    p = Path(path)
    if not p.exists() and not p.is_symlink():
        raise InputFileError(f"{path} does not exist")
    text = read_text(p, "JSON file")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InputFileError(f"cannot read JSON from {path}: {e}" + (" (the file is empty)" if not text else "")) \
            from None


# --------------------------------------------------------------------------------------------------
# Outputs


def cannot_write(path: str | os.PathLike, e: OSError) -> OutputFileError:
    hint = _WRITE_HINTS.get(e.errno or 0)
    return OutputFileError(f"cannot write {path}: {e.strerror or e}" + (f" ({hint})" if hint else ""))


def make_dirs(directory: str | os.PathLike) -> Path:
    """Create ``directory`` and its parents; a one-line OutputFileError when that is impossible."""
    d = Path(directory)
    try:
        d.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in (d, *d.parents) if p.exists() and not p.is_dir()), d)
        raise OutputFileError(f"cannot create directory {d}: {blocker} is a file, not a directory; "
                              "choose another output path") from None
    except OSError as e:
        raise cannot_write(d, e) from None
    return d


def _write_target(path: Path) -> Path:
    """The file a write to ``path`` lands in: a symbolic link is followed to the file it names."""
    if not path.is_symlink():
        return path
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise OutputFileError(f"cannot write {path}: it is a symbolic link loop; remove it or choose another "
                                  "output path") from None
    return Path(os.path.realpath(path))


FULL_BELOW = 1 << 20  # bytes: a write that failed with less than this left free failed for lack of space


def _disk_full(directory: Path) -> bool:
    try:
        return shutil.disk_usage(directory).free < FULL_BELOW
    except OSError:
        return False


def _new_file_beside(path: Path, suffix: str, shown: str | os.PathLike) -> tuple[Path, str]:
    """``path``'s write target (through a link) and a new empty hidden file beside it; one-line errors for a
    directory in the way or a directory that takes no new file (naming ``shown``, the path as the user gave it).
    The parent directory is created if missing."""
    target = _write_target(path)
    if target.is_dir():
        raise OutputFileError(f"cannot write {shown}: it is a directory; give a file name")
    make_dirs(target.parent)
    try:
        fd, new = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent)
    except OSError as e:
        raise cannot_write(shown, e) from None
    os.close(fd)
    return target, new


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` only if the block succeeds.

    The block writes the temporary file; if it fails (an exception, Ctrl-C, a full disk) the temporary
    file is removed and ``path`` is untouched. A symbolic link at ``path`` is written through (its target
    is replaced, the link stays). A full or read-only disk becomes a one-line :class:`OutputFileError`.
    """
    path = Path(path)
    target, tmp = _new_file_beside(path, ".tmp", path)
    umask = os.umask(0)
    os.umask(umask)
    with suppress(OSError):
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
    try:
        try:
            yield Path(tmp)
        except OSError as e:
            if e.errno in DISK_ERRNOS:
                raise cannot_write(path, e) from None
            if not _disk_full(target.parent):
                raise
            raise cannot_write(path, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))) from None
        except Exception:
            # Some writers (torch.save's zip writer) report a full disk as a RuntimeError without an errno.
            if not _disk_full(target.parent):
                raise
            raise cannot_write(path, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))) from None
        try:
            os.replace(tmp, target)
        except OSError as e:
            raise cannot_write(path, e) from None
    finally:
        if os.path.lexists(tmp):
            with suppress(OSError):
                os.unlink(tmp)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")
    return Path(path)


def write_sidecar(artifact: str | os.PathLike, record: Any) -> Path:
    """Write the JSON record beside a just-written ``artifact``, or neither: if the record cannot be
    written (a full disk, Ctrl-C), the artifact is removed too, so no artifact stays without its record
    or beside the record of an older one."""
    side = sidecar_path(artifact)
    try:
        return write_json(side, record)
    except BaseException:
        for p in (Path(artifact), side):
            with suppress(OSError):
                p.unlink()
        raise


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


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except (OSError, RuntimeError):  # a symbolic link loop (RuntimeError before Python 3.13)
        return False


def ensure_not_input(output: str | os.PathLike, *inputs: str | os.PathLike | None) -> None:
    """Refuse to write ``output`` over one of the command's own inputs (also through a link)."""
    out = Path(output)
    for i in inputs:
        if i is not None and Path(i).exists() and _same_file(out, Path(i)):
            raise UsageError(f"output {output} is the command's own input {i}; choose another -o path")


def check_output(output: str | os.PathLike, *inputs: str | os.PathLike | None) -> Path:
    """Before the work: ``output`` is none of the command's ``inputs`` and its directory takes a new file.

    A read-only, full-to-the-inode or impossible directory (a file in the way) fails here in one line,
    not after minutes of training. The directory is created when missing.
    """
    out = Path(output)
    ensure_not_input(out, *inputs)
    _, probe = _new_file_beside(out, ".probe", output)
    os.unlink(probe)
    return out


def file_size_mib(path: str | os.PathLike) -> float:
    return os.path.getsize(path) / 2**20
