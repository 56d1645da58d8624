"""Options shared by several commands, defined once (the pip-tools way)."""

from __future__ import annotations

import functools
import json

import click


def compose(*decorators):
    def apply(fn):
        for d in reversed(decorators):
            fn = d(fn)
        return fn

    return apply


def positive_int(name: str):
    def convert(ctx, param, value):
        if value is not None and value <= 0:
            raise click.BadParameter(f"must be positive, got {value}", param_hint=name)
        return value

    return convert


model_options = compose(
    click.option("-m", "--model", default=None, metavar="NAME|PATH",
                 help="Zoo model name or checkpoint file. Default: the shipped Fashion-MNIST baseline."),
    click.option("--arch", default=None, metavar="NAME",
                 help="Architecture of a plain state-dict file given as --model."),
    click.option("--num-classes", type=int, default=None,
                 help="Classes of a fresh zoo model (default: the dataset's)."),
    click.option("--in-channels", type=int, default=None,
                 help="Input channels of a fresh zoo model (default: the dataset's; adapts the stem)."),
    click.option("--weights", default=None, metavar="NAME",
                 help="torchvision weights for a fresh zoo model, e.g. DEFAULT or IMAGENET1K_V2."),
    click.option("--trust-pickle", is_flag=True,
                 help="Allow loading a fully pickled module (runs code from the file: only for files you trust)."),
)

data_options = compose(
    click.option("-d", "--data", default=None, metavar="NAME",
                 help="Dataset: fashion-mnist, cifar10, imagefolder, synthetic. "
                      "Default: the model's, else fashion-mnist."),
    click.option("--data-dir", default=None, type=click.Path(file_okay=False), help="Where the dataset's files are."),
)

device_option = click.option("--device", default=None, metavar="cpu|cuda|cuda:N",
                             help="Default: CUDA when present, CPU otherwise.")

json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON on stdout.")

# The names of deploycomp.quantize.CALIBRATION_METHODS, spelled out so that --help imports nothing heavy
# (tests/test_quantize.py checks that the two agree).
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")


def int8_calibration_options(when: str = "INT8"):
    """--calib-samples and --calib-method, shared by quantize, build and bundle."""
    return compose(
        click.option("--calib-samples", type=int, default=None, callback=positive_int("--calib-samples"),
                     help=f"{when}: calibration images from the training split. Default: 512."),
        click.option("--calib-method", type=click.Choice(CALIBRATION_METHODS), default=None,
                     help=f"{when}: how activation ranges are chosen. Default: minmax."),
    )


def model_kwargs(options: dict) -> dict:
    """The model-related entries of a command's options, as ``load_inputs`` keyword arguments."""
    keys = ("arch", "num_classes", "in_channels", "weights", "trust_pickle")
    return {k: options[k] for k in keys if options.get(k) is not None and options.get(k) is not False}  # 0 stays


def print_json(obj) -> None:
    from deploycomp.files import _json_default

    click.echo(json.dumps(obj, indent=2, default=_json_default))


def pass_options(fn):
    """Collect every option into one dict argument ``opts`` (keeps command bodies short).

    Numbers are checked here for every command at once: a float option must be finite (NaN and inf
    mean nothing to any of them) and an integer must fit in 64 bits (torch and numpy cannot hold more).
    """

    @functools.wraps(fn)
    def wrapper(**opts):
        check_numbers(opts)
        return fn(opts)

    return wrapper


INT_LIMIT = 2**63 - 1


def check_numbers(opts: dict) -> None:
    import math

    from deploycomp.errors import UsageError

    ctx = click.get_current_context(silent=True)
    flags = {p.name: (p.opts[0] if p.opts else p.name) for p in ctx.command.params} if ctx else {}
    for name, value in opts.items():
        for v in value if isinstance(value, tuple) else (value,):
            if isinstance(v, float) and not math.isfinite(v):
                raise UsageError(f"{flags.get(name, name)} must be a finite number, got {v}")
            if isinstance(v, int) and not isinstance(v, bool) and abs(v) > INT_LIMIT:
                raise UsageError(f"{flags.get(name, name)} {v} is too large; give at most {INT_LIMIT}")
