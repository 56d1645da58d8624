"""The ``deploycomp`` command line: a Click group whose commands live in their own modules.

Commands are imported only when invoked (or asked for ``--help``), and those modules import only
click at the top, so ``deploycomp --help`` never imports torch.
"""

from __future__ import annotations

import importlib
import sys
import traceback

import click

from deploycomp import __version__
from deploycomp.cli.options import verbosity_options

# command name -> "module:function"; the module is imported on first use.
COMMANDS = {
    "train": "deploycomp.cli.train:train",
    "eval": "deploycomp.cli.evaluate:evaluate",
    "info": "deploycomp.cli.info:info",
    "prune": "deploycomp.cli.prune:prune",
    "bench": "deploycomp.cli.bench:bench",
    "distill": "deploycomp.cli.distill:distill",
    "export": "deploycomp.cli.export:export",
    "quantize": "deploycomp.cli.quantize:quantize",
    "build": "deploycomp.cli.build:build",
    "bundle": "deploycomp.cli.bundle:bundle",
    "pipeline": "deploycomp.cli.pipeline:pipeline",
    "report": "deploycomp.cli.report:report",
}


class LazyGroup(click.Group):
    """Imports a command's module only when that command is needed; maps errors to one line."""

    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        from deploycomp.cli.options import add_verbosity_options

        target = COMMANDS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        return add_verbosity_options(getattr(importlib.import_module(module), attr))

    def parse_args(self, ctx, args):
        from deploycomp import console

        console.set_verbosity(console.NORMAL)  # each invocation starts normal; -v/-q (before or after) change it
        return super().parse_args(ctx, args)

    def resolve_command(self, ctx, args):
        name = args[0] if args else None
        if name and not name.startswith("-") and name not in COMMANDS:
            import difflib

            close = difflib.get_close_matches(name, COMMANDS, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            ctx.fail(f"no such command {name!r}.{hint} Commands: {', '.join(sorted(COMMANDS))}.")
        return super().resolve_command(ctx, args)

    def invoke(self, ctx):
        from deploycomp.errors import DeploycompError, Interrupted, environment_error

        try:
            return super().invoke(ctx)
        except click.exceptions.Exit:
            raise
        except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (see main): every file being written was discarded
            _fail(Interrupted("interrupted; files being written were discarded, finished ones kept (run the same "
                              "command again to redo it)"), e)
        except (DeploycompError, OSError, EOFError, MemoryError, RuntimeError, TypeError, OverflowError,
                ValueError) as e:
            mapped = environment_error(e)  # a full disk, a permission, memory: one line; anything else is a bug
            if mapped is None:
                raise
            _fail(mapped, e)


def _one_line(message: str) -> str:
    """An error message as one line; one re-raised from a DataLoader worker keeps only the original message."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if any(line.startswith("Original Traceback") for line in lines):  # torch's ExceptionWrapper.reraise
        last = lines[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return " ".join(lines)


def _fail(error, cause: BaseException):
    """Exit with ``Error: <message>`` and the error's exit code; -v also prints the traceback of ``cause``."""
    from deploycomp import console

    if console.verbosity() >= console.VERBOSE:
        traceback.print_exception(cause)
    err = click.ClickException(_one_line(str(error)))
    err.exit_code = error.exit_code
    raise err from None


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="deploycomp")
@verbosity_options
def cli() -> None:
    """Prune, distill, export, quantize and benchmark vision models for deployment.

    Classifiers, semantic segmenters and object detectors (the task comes from the data or the
    model: docs/tasks.md). Every command works on the shipped Fashion-MNIST baseline when no --model
    is given; models/light_unet_scenes.pt and models/light_det_scenes.pt are the shipped segmenter
    and detector. -v/-q work before or after the command name.
    """


def main() -> None:
    import signal

    # SIGTERM (kill, a batch scheduler, docker stop) ends a run like Ctrl-C: temporary files are removed.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        cli.main(prog_name="deploycomp")
    except KeyboardInterrupt:
        print("Aborted.", file=sys.stderr)
        sys.exit(130)
