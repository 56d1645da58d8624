"""Messages, warnings, tables and progress, all honouring one verbosity level (-q / -v)."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

T = TypeVar("T")

QUIET, NORMAL, VERBOSE = 0, 1, 2
_level = NORMAL


def set_verbosity(level: int) -> None:
    global _level
    _level = level


def verbosity() -> int:
    return _level


def info(message: str) -> None:
    """A line of normal output (suppressed by -q)."""
    if _level >= NORMAL:
        print(message, file=sys.stderr, flush=True)


def debug(message: str) -> None:
    """A line shown only with -v."""
    if _level >= VERBOSE:
        print(message, file=sys.stderr, flush=True)


def warn(message: str) -> None:
    """A warning; shown even with -q, because it says something about the results."""
    print(f"Warning: {message}", file=sys.stderr, flush=True)


def result(message: str) -> None:
    """The command's result, on stdout (never suppressed)."""
    print(message, flush=True)


@contextmanager
def captured_output() -> Iterator[None]:
    """Capture everything written to stdout and stderr inside the block, by Python or by C++ code writing to
    file descriptors 1 and 2 (the TorchScript exporter dumps its whole graph there on an error). Nothing is
    printed unless -v, which prints it after the block."""
    import contextlib
    import io
    import os
    import tempfile

    text = io.StringIO()
    with tempfile.TemporaryFile(mode="w+b") as native:
        saved: list[int] = []
        try:
            for fd in (1, 2):
                saved.append(os.dup(fd))
        except OSError:  # no such descriptor (a daemon): nothing native to capture
            for fd in saved:
                os.close(fd)
            saved = []
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        if saved:
            for fd in (1, 2):
                os.dup2(native.fileno(), fd)
        try:
            with contextlib.redirect_stdout(text), contextlib.redirect_stderr(text):
                yield
        finally:
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            for fd, old in zip((1, 2), saved, strict=False):
                os.dup2(old, fd)
                os.close(old)
            native.seek(0)
            captured = text.getvalue() + native.read().decode(errors="replace")
            if captured.strip():
                debug(captured.rstrip())


def wrapped(text: str, indent: str = "  ") -> str:
    """``text`` wrapped to the terminal's width (``COLUMNS`` where set, else 80 off a terminal)."""
    import shutil
    import textwrap

    return textwrap.fill(text, width=shutil.get_terminal_size().columns, subsequent_indent=indent,
                         break_long_words=False, break_on_hyphens=False)


def _rich_console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=True)


def table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]],
          optional: Sequence[str] | None = None) -> None:
    """Print a table of results on stdout.

    Without ``optional``, rich wraps cells to fit the terminal. With it, no cell is ever wrapped or cut:
    the columns named in ``optional`` are left out, in that order, until the table fits the terminal
    (``COLUMNS`` where set); a table whose other columns do not fit is printed wider than the terminal.
    """
    from rich.table import Table

    cells = [[fmt(v) for v in r] for r in rows]
    console = _rich_console()
    keep = list(range(len(columns)))
    if optional is not None:
        keep = fitting_columns(columns, cells, optional, console.width)
    t = Table(title=title, title_justify="left")
    for i in keep:
        t.add_column(columns[i], justify="left" if i == 0 else "right", no_wrap=optional is not None)
    for r in cells:
        t.add_row(*[r[i] for i in keep])
    if optional is not None:
        console.width = max(console.width, table_width(columns, cells, keep))
    console.print(t)


def table_width(columns: Sequence[str], cells: Sequence[Sequence[str]], keep: Sequence[int]) -> int:
    """Characters per line of a rich table (default box) whose columns ``keep`` are shown unwrapped."""
    from rich.cells import cell_len

    widths = [max(cell_len(s) for s in [columns[i], *(r[i] for r in cells)]) for i in keep]
    return sum(w + 2 for w in widths) + len(widths) + 1  # one space either side of a cell; a border between


def fitting_columns(columns: Sequence[str], cells: Sequence[Sequence[str]], optional: Sequence[str],
                    width: int) -> list[int]:
    """Indices of the columns to show: the optional ones left out, in order, until the table fits ``width``."""
    keep = list(range(len(columns)))
    for name in optional:
        if table_width(columns, cells, keep) <= width:
            break
        keep.remove(columns.index(name))
    return keep


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 100:
            return f"{value:,.1f}"
        if abs(value) >= 1:
            return f"{value:.3f}"
        return f"{value:.4g}"
    return str(value)


def progress(iterable: Iterable[T], total: int | None = None, description: str = "") -> Iterator[T]:
    """Wrap ``iterable`` in a progress bar on stderr (nothing when quiet or not a terminal)."""
    if _level < NORMAL or not sys.stderr.isatty():
        yield from iterable
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
               TextColumn("{task.fields[status]}"))
    with Progress(*columns, console=_rich_console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total, status="")
        for item in iterable:
            yield item
            bar.advance(task)


@contextmanager
def status_line(description: str):
    """A spinner for work without a known length; prints the description when not a terminal.

    Yields ``update(text)``, which shows ``description: text`` on a terminal (and nothing elsewhere,
    so that logs get one line per task, not one per round).
    """
    if _level < NORMAL:
        yield _ignore
        return
    if not sys.stderr.isatty():
        info(description)
        yield _ignore
        return
    with _rich_console(stderr=True).status(description) as status:
        yield lambda text: status.update(f"{description}: {text}")


def _ignore(text: str) -> None:
    return None
