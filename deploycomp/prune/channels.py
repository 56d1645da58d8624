"""torch-pruning plumbing shared by every channel pruning path (MACs targets, measured latency targets).

:func:`prune_channels` is the lower-level step (one pruning pass at one ratio, no calibration, search or
fine-tuning); the rest are helpers the strategies share: the classifier and user-ignored layers, MACs
per module, channels removed, and a one-thread context for the many tiny ops of graph tracing.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

from deploycomp.errors import UsageError


def _tp_pruner_class():
    import torch_pruning as tp

    class Pruner(tp.pruner.BasePruner):
        """torch-pruning's pruner with balanced channel rounding.

        torch-pruning 1.6 rounds each layer's kept count *down* to a multiple of ``round_to`` (to zero
        for a small layer, which it then silently skips), so every layer overshoots the ratio. Here each
        layer rounds down or up, whichever keeps the running sum of rounding errors (as fractions of the
        layers' widths) closest to zero, and never below ``round_to`` channels: the errors cancel
        across layers instead of adding up.
        """

        _residual = 0.0

        def _round_to(self, n_pruned, current_channels, round_to):
            exact = current_channels - n_pruned
            down = exact - exact % round_to
            options = [c for c in (down, down + round_to) if min(round_to, current_channels) <= c <= current_channels]
            options = options or [min(round_to, current_channels)]
            kept = min(options, key=lambda c: (abs(self._residual + (c - exact) / current_channels), c))
            self._residual += (kept - exact) / current_channels
            return current_channels - kept

    return Pruner


@contextmanager
def one_thread():
    """Graph tracing and pruning are many tiny ops: one thread avoids spinning on a busy machine."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def prune_channels(model, example_input, criterion, ratio: float, *, global_pruning: bool = False, round_to: int = 1,
                   ignore: Sequence[str] = ()) -> list:
    """Prune ``model`` in place at channel ratio ``ratio`` with ``criterion``; return torch-pruning's history.

    The lower-level step under :func:`prune_checkpoint`: no calibration (a data-driven criterion must
    already be calibrated), no search, no fine-tuning. ``ignore`` names modules whose outputs are kept;
    the classifier always is, and so are the layers the model's adapters keep. A failure inside
    torch-pruning, or a pruned model that no longer runs, raises :class:`~deploycomp.prune.adapters.PruningError`.
    """
    import torch

    from deploycomp.prune import adapters

    criterion.reset()
    ignored = [model.get_submodule(n) for n in ignored_layers(model, ignore)]
    ignored += [m for m in adapters.ignored_modules(model) if all(m is not o for o in ignored)]
    with one_thread():
        with pruning_errors("building its dependency graph"), adapters.tracing(model):
            pruner = _tp_pruner_class()(
                model, example_input, criterion, pruning_ratio=ratio, global_pruning=global_pruning,
                ignored_layers=ignored, round_to=round_to if round_to > 1 else None,
                **adapters.pruner_kwargs(model))
        with pruning_errors("pruning"):
            pruner.step()
            adapters.after_pruning(model)
        with pruning_errors("running the pruned model", broken=True), torch.no_grad():
            model.eval()(example_input)
    return pruner.pruning_history()


@contextmanager
def pruning_errors(during: str, broken: bool = False):
    """Turn an exception inside torch-pruning (or from the model it pruned) into one :class:`PruningError` line."""
    from deploycomp.errors import DeploycompError, ResourceError, environment_error, first_line
    from deploycomp.prune.adapters import PruningError

    try:
        yield
    except DeploycompError:
        raise
    except Exception as e:  # noqa: BLE001 - torch-pruning raises whatever its graph code trips on
        if isinstance(environment_error(e), ResourceError):
            raise  # out of memory: the CLI says so in one line
        what = ("torch-pruning mapped channels wrongly through a reshape, split or attention in it"
                if broken else "it has a pattern torch-pruning cannot map (a reshape, split or attention)")
        raise PruningError(f"torch-pruning failed while {during} ({first_line(e, 160)}): {what}; "
                           "keep the layers around it with --ignore LAYER (`deploycomp info --layers` lists them), "
                           "or drop whole blocks with --method depth") from e


def forward_through_layers(model, example, record) -> None:
    """One no-grad forward pass of ``model`` (in eval mode) calling ``record(name, module, inputs, output)``
    for every convolution and linear layer."""
    import torch
    import torch.nn as nn

    def hook(name):
        def observe(module, inputs, out) -> None:  # returns None: a hook's return value would replace the output
            record(name, module, inputs, out)
        return observe

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for h in handles:
            h.remove()


def module_macs(model, example, names: list[str]) -> dict[str, int]:
    """Approximate MACs (convolutions and linear layers) inside each named module, from one forward pass."""
    import torch.nn as nn

    per_layer: dict[str, int] = {}

    def record(name, m, inputs, out):
        if isinstance(m, nn.Conv2d):
            k = m.kernel_size[0] * m.kernel_size[1] * m.in_channels // m.groups
            per_layer[name] = out[0].numel() * k
        else:
            per_layer[name] = m.in_features * m.out_features

    forward_through_layers(model, example, record)
    return {b: sum(v for k, v in per_layer.items() if k.startswith(b + ".")) for b in names}


def ignored_layers(model, names, task=None) -> list[str]:
    """The layers producing the predictions (``task.output_layers``; without a task: the last Linear, else
    the last convolution) plus the user's ``--ignore`` names."""
    import difflib

    import torch.nn as nn

    modules = dict(model.named_modules())
    if task is not None:
        heads = {id(m) for m in task.output_layers(model)}
        out = [n for n, m in modules.items() if id(m) in heads]
    else:
        out = ([n for n, m in modules.items() if isinstance(m, nn.Linear)] or
               [n for n, m in modules.items() if isinstance(m, nn.Conv2d)])[-1:]
    for n in names:
        if n not in modules or not n:
            close = difflib.get_close_matches(n, [k for k in modules if k], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise UsageError(f"--ignore {n!r} is not a layer of the model{hint}; "
                             "`deploycomp info --layers` lists the layers")
        if n not in out:
            out.append(n)
    return out


def channels_removed_pct(before: list[dict], after: list[dict], ignored: list[str]) -> float:
    """Share of output channels removed over the conv/linear layers that still exist (classifier excluded)."""
    now = {r["layer"]: r["out"] for r in after}
    kept = [(r["out"], now[r["layer"]]) for r in before if r["layer"] in now and r["layer"] not in ignored]
    total = sum(b for b, _ in kept)
    return 100.0 * (1 - sum(a for _, a in kept) / total) if total else 0.0
