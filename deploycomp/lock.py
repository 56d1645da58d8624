"""An exclusive lock on a directory, so that two deploycomp processes never write into it at once.

``pipeline`` takes it on its run directory: a second pipeline on the same directory refuses with a
message naming the process that holds it (or waits for it with ``--wait``), instead of both writing
the same stage files. The lock is ``flock()`` on ``DIR/.deploycomp.lock``: the kernel releases it when
its holder ends in any way, SIGKILL included, so a lock file left behind by a killed run is stale and
simply taken over. Where ``fcntl`` does not exist (Windows) the file is created exclusively instead and
holds the PID, which is checked for life when the file is found.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from deploycomp import console
from deploycomp.errors import BusyError
from deploycomp.files import make_dirs

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

LOCK_NAME = ".deploycomp.lock"
POLL_S = 0.2


def _holder_info() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(["deploycomp", *sys.argv[1:]]),
            "since": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def read_holder(path: str | os.PathLike) -> dict:
    """Who holds the lock file ``path`` (empty when unknown)."""
    try:
        return json.loads(Path(path).read_text() or "{}")
    except (OSError, ValueError):
        return {}


def describe_holder(holder: dict) -> str:
    if not holder.get("pid"):
        return "another deploycomp process"
    return (f"deploycomp process {holder['pid']} on {holder.get('host', 'an unknown host')} "
            f"(`{holder.get('command', '?')}`, since {holder.get('since', '?')})")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def _try_flock(path: Path) -> int | None:
    """A descriptor of ``path`` holding an exclusive flock, or None when another process holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the previous holder removed the file between our open and our lock: start again


def _try_exclusive(path: Path) -> int | None:
    """The no-fcntl way: create the file exclusively; a file whose process is gone on this host is stale."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        holder = read_holder(path)
        if holder.get("host") == socket.gethostname() and holder.get("pid") and not _alive(int(holder["pid"])):
            console.warn(f"removing the stale lock {path} of {describe_holder(holder)}, which no longer runs")
            with suppress(FileNotFoundError):
                os.unlink(path)
            return _try_exclusive(path)
        return None


@contextmanager
def directory_lock(directory: str | os.PathLike, *, wait: float | None = 0, what: str = "directory",
                   hint: str = "") -> Iterator[Path]:
    """Hold an exclusive lock on ``directory`` (created if missing) while the block runs.

    ``wait``: seconds to wait for another holder before giving up (0: refuse at once; None: no limit).
    A refusal is a one-line :class:`BusyError` naming the holder; ``hint`` says what to do instead.
    """
    d = make_dirs(directory)
    path = d / LOCK_NAME
    take = _try_flock if fcntl is not None else _try_exclusive
    deadline = None if wait is None else time.monotonic() + wait
    announced = False
    while (fd := take(path)) is None:
        holder = describe_holder(read_holder(path))
        if deadline is not None and time.monotonic() >= deadline:
            raise BusyError(f"{what} {d} is in use by {holder}; wait for it to finish"
                            + (f" or {hint}" if hint else ""))
        if not announced:
            console.info(f"waiting for {holder} to release {d}")
            announced = True
        time.sleep(POLL_S)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(_holder_info()) + "\n").encode())
        yield path
    finally:
        with suppress(OSError):
            os.unlink(path)  # before unlocking: a waiter that opened the old file sees it is gone and retries
        os.close(fd)
