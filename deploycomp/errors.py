"""Errors meant for people: one line saying what went wrong, which input, and what to do.

The CLI turns every :class:`DeploycompError` into ``Error: <message>`` and a non-zero exit code,
without a traceback (``-v`` shows it). Anything else escaping is a bug in deploycomp.
"""

from __future__ import annotations

import difflib
import errno
import re
from collections.abc import Iterable


class DeploycompError(Exception):
    """Base class of every error caused by input, environment or a missing dependency."""

    exit_code = 1


class UsageError(DeploycompError):
    """An impossible option value or combination of options."""

    exit_code = 2


class InputFileError(DeploycompError):
    """A file that is missing, unreadable, corrupt or of the wrong kind."""


class CheckpointError(InputFileError):
    """A checkpoint that cannot be loaded safely."""


class UnknownNameError(UsageError):
    """A registry lookup with a name that is not registered."""

    def __init__(self, kind: str, name: str, choices: Iterable[str], hint: str = "", plural: str | None = None):
        choices = sorted(choices)
        close = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
        shown = ", ".join(choices[:40]) + (f", ... ({len(choices)} in all)" if len(choices) > 40 else "")
        msg = f"unknown {kind} {name!r}"
        if close:
            msg += f"; did you mean {close[0]!r}?"
        msg += f" Valid {plural or kind + 's'}: {shown}."
        if hint:
            msg += f" {hint}"
        super().__init__(msg)
        self.kind, self.name, self.closest = kind, name, close[0] if close else None


class OutputFileError(DeploycompError):
    """An output that cannot be written: a full or read-only disk, a file in the way, a missing permission."""


class ResourceError(DeploycompError):
    """Not enough memory (or another machine resource) for what was asked."""


class BusyError(DeploycompError):
    """Another deploycomp process holds a lock on the directory asked for."""

    exit_code = 3


class Interrupted(DeploycompError):
    """Ctrl-C (SIGINT) or SIGTERM: files being written were discarded."""

    exit_code = 130


class MissingDependencyError(DeploycompError):
    """An optional library or tool that the requested operation needs is not installed."""


class ParityError(DeploycompError):
    """An exported or converted model disagrees with its source beyond tolerance."""


def check(condition: bool, message: str, error: type[DeploycompError] = UsageError) -> None:
    """Raise ``error(message)`` unless ``condition`` holds (for validating user input)."""
    if not condition:
        raise error(message)


def first_line(e: BaseException, limit: int = 300) -> str:
    """``TypeName: first line of the message`` (only the type name when the message is empty)."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:limit]}" if lines else type(e).__name__


def format_bytes(n: float) -> str:
    """``1536`` -> ``1.5 KiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} EiB"  # unreachable; keeps type checkers quiet


# errno -> what to do about it, for errors of the machine rather than of deploycomp.
_OS_HINTS = {
    errno.ENOSPC: "the disk is full; free some space or write elsewhere (-o)",
    errno.EDQUOT: "the disk quota is exhausted; free some space or write elsewhere (-o)",
    errno.EFBIG: "the file is larger than this file system or process allows; write elsewhere (-o)",
    errno.EROFS: "the file system is read-only; write elsewhere (-o)",
    errno.EACCES: "permission denied; check the permissions or use another path",
    errno.EPERM: "operation not permitted; check the permissions or use another path",
    errno.ELOOP: "a symbolic link loop; point the link at a real file",
    errno.ENOTDIR: "a part of the path is a file, not a directory",
    errno.EISDIR: "it is a directory; give a file",
    errno.ENAMETOOLONG: "the name is too long; use a shorter path",
    errno.EMFILE: "too many open files; raise the limit (ulimit -n)",
}
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)
_OOM_MARKERS = ("can't allocate memory", "out of memory", "not enough memory", "bad_alloc",
                "storage size calculation overflowed", "overflow when unpacking long")


def environment_error(e: BaseException) -> DeploycompError | None:
    """A one-line :class:`DeploycompError` for an error of the machine (disk, permissions, memory), else None.

    The CLI uses this as a safety net: a full disk or an allocation that does not fit ends in one
    ``Error:`` line, not a traceback. Anything it returns None for is a bug in deploycomp.
    """
    if isinstance(e, DeploycompError):
        return e
    if isinstance(e, MemoryError) or (isinstance(e, (RuntimeError, TypeError, OverflowError, ValueError))
                                      and any(m in str(e).lower() for m in _OOM_MARKERS)):
        size = re.search(r"allocate (\d+) bytes", str(e))
        what = f"an allocation of {format_bytes(int(size[1]))} failed" if size else \
            "a size too large to represent" if "overflow" in str(e).lower() else first_line(e, 120)
        return ResourceError(f"out of memory: {what}; ask for less (a smaller batch, input size, number of "
                             "samples or model)")
    if isinstance(e, OSError) and e.errno is not None:
        where = f"{e.filename}: " if e.filename is not None else ""
        hint = _OS_HINTS.get(e.errno)
        cls = OutputFileError if e.errno in _WRITE_ERRNOS else InputFileError
        return cls(f"{where}{e.strerror or first_line(e)}" + (f" ({hint})" if hint else ""))
    if isinstance(e, EOFError):
        return InputFileError(f"a file ended early; it is truncated or damaged ({first_line(e)})")
    return None
