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


def parse_input_size(text: str | None) -> tuple[int, int] | None:
    """``"224"``, ``"224x192"`` or ``"224,192"`` -> (H, W); the one parser of every --input-size."""
    from deploycomp.errors import UsageError

    if text is None:
        return None
    try:
        parts = [int(p) for p in text.lower().replace(",", "x").split("x")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or min(parts) <= 0:
        raise UsageError(f"--input-size must look like 224, 224x192 or 224,192 (H, W), got {text!r}")
    from deploycomp.resources import MAX_SIDE

    if max(parts) > MAX_SIDE:
        raise UsageError(f"--input-size {text} is larger than any image classifier takes (at most {MAX_SIDE} px a "
                         "side)")
    return (parts[0], parts[-1])


def _input_size(ctx, param, value):
    from deploycomp.errors import UsageError

    try:
        return parse_input_size(value)
    except UsageError as e:
        raise click.BadParameter(str(e)) from None


input_size_option = click.option(
    "--input-size", default=None, metavar="H[xW]", callback=_input_size,
    help="Input height x width, e.g. 224 or 224x192 (also 224,192). Default: the model's (a fresh model on a "
         "dataset: the dataset's).")


def parse_model_kwargs(values) -> dict:
    """``--model-kwargs`` values (JSON objects or k=v[,k=v...], repeatable) -> one dict; values parsed as JSON."""
    from deploycomp.errors import UsageError

    out: dict = {}
    for text in values or ():
        text = text.strip()
        if text.startswith("{"):
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError as e:
                raise UsageError(f"--model-kwargs {text!r} is not valid JSON: {e.msg}") from None
            if not isinstance(parsed, dict):
                raise UsageError(f"--model-kwargs {text!r} must be a JSON object") from None
            out.update(parsed)
            continue
        for item in filter(None, (i.strip() for i in text.split(","))):
            key, sep, raw = item.partition("=")
            if not sep or not key.strip().isidentifier():
                raise UsageError(f"--model-kwargs expects KEY=VALUE pairs or a JSON object, got {item!r}")
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                value = raw  # a bare word is a string
            out[key.strip()] = value
    return out


def _model_kwargs(ctx, param, value):
    from deploycomp.errors import UsageError

    try:
        return parse_model_kwargs(value)
    except UsageError as e:
        raise click.BadParameter(str(e)) from None


model_options = compose(
    click.option("-m", "--model", default=None, metavar="NAME|PATH|CODE",
                 help="Zoo model name, timm:NAME, user code (path/to/file.py:factory or package.module:factory) or "
                      "checkpoint file. Default: the shipped Fashion-MNIST baseline."),
    click.option("--arch", default=None, metavar="NAME|CODE",
                 help="Architecture of a plain state-dict file given as --model; for a checkpoint built from user "
                      "code, that code (loading runs it, so it is never taken from the file alone)."),
    click.option("--num-classes", type=int, default=None,
                 help="Classes of a fresh model (default: the dataset's; synthetic data takes the model's)."),
    click.option("--in-channels", type=int, default=None,
                 help="Input channels of a fresh model (default: the dataset's; adapts the stem)."),
    click.option("--model-kwargs", multiple=True, metavar="K=V,...|JSON", callback=_model_kwargs,
                 help="Constructor arguments of a fresh model (zoo, timm or user code), e.g. width=0.5 or "
                      "'{\"dropout\": 0.2}' (repeatable)."),
    click.option("--weights", default=None, metavar="FILE|NAME",
                 help="Weights of a fresh model: a local state-dict file (.pt/.pth/.bin/.safetensors), or "
                      "published weights by name (torchvision: DEFAULT, IMAGENET1K_V2, ...; timm: DEFAULT)."),
    click.option("--trust-pickle", is_flag=True,
                 help="Allow loading a fully pickled module (runs code from the file: only for files you trust)."),
    input_size_option,
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
    keys = ("arch", "num_classes", "in_channels", "weights", "trust_pickle", "model_kwargs", "input_size")
    given = {k: options[k] for k in keys  # 0 stays (refused later in one line), None / False / {} mean "not given"
             if options.get(k) is not None and options.get(k) is not False and options.get(k) != {}}
    return {**given, "trust_option": "--trust-pickle"}  # model_options has the flag: messages may name it


def _set_verbosity(level_name: str):
    def callback(ctx, param, value):
        if value:
            from deploycomp import console

            console.set_verbosity(getattr(console, level_name))

    return callback


# -v/-q, accepted before the command name (the group's) and after it (every command's): defined once here.
verbosity_options = compose(
    click.option("-v", "--verbose", is_flag=True, expose_value=False, callback=_set_verbosity("VERBOSE"),
                 help="More output; show tracebacks of errors."),
    click.option("-q", "--quiet", is_flag=True, expose_value=False, callback=_set_verbosity("QUIET"),
                 help="Only results and warnings; no progress."),
)


def add_verbosity_options(command: click.Command) -> click.Command:
    """Give ``command`` the -v/-q options (once), so they work after the command name too."""
    if not getattr(command, "_deploycomp_verbosity", False):
        names = {n for p in command.params for n in p.opts}
        if not names & {"-v", "-q", "--verbose", "--quiet"}:
            command.params.extend(verbosity_options(lambda: None).__click_params__)
        command._deploycomp_verbosity = True
    return command


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
