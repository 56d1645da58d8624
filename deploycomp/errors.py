"""Errors meant for people: one line saying what went wrong, which input, and what to do.

The CLI turns every :class:`DeploycompError` into ``Error: <message>`` and a non-zero exit code,
without a traceback (``-v`` shows it). Anything else escaping is a bug in deploycomp.
"""

from __future__ import annotations

import difflib
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


class MissingDependencyError(DeploycompError):
    """An optional library or tool that the requested operation needs is not installed."""


class ParityError(DeploycompError):
    """An exported or converted model disagrees with its source beyond tolerance."""


def check(condition: bool, message: str, error: type[DeploycompError] = UsageError) -> None:
    """Raise ``error(message)`` unless ``condition`` holds (for validating user input)."""
    if not condition:
        raise error(message)
