"""The network as the latency model sees it: channel groups, layers and their widths (latency pruning).

torch-pruning's dependency graph gives the groups of channels removed together; each group gets the
candidate widths the search may give it (multiples of the rounding) and the share of the criterion's
importance it keeps at each; each convolution and linear layer is a :class:`LayerSite` whose input and
output widths belong to groups. :func:`prune_to_widths` applies a chosen width per group.
See :mod:`deploycomp.prune.latency` for the search that uses this.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

MIN_KEPT = 1e-6  # kept-importance fractions are floored here before the log


def candidate_widths(width: int, round_to: int, n: int) -> list[int]:
    """The widths a group of ``width`` channels may take: ``n`` evenly spaced fractions of it, rounded to
    multiples of ``round_to`` (never below ``round_to``), and the full width."""
    if width <= round_to:
        return [width]
    ws = {width}
    for i in range(1, n):
        w = round_to * max(1, round(width * i / n / round_to))
        if w < width:
            ws.add(w)
    return sorted(ws)



@dataclass
class ChannelGroup:
    """Channels torch-pruning removes together, rooted at one layer's output channels."""

    root: str  # module name of the root layer
    width: int  # channels now
    candidates: list[int]  # widths the search may give it, ascending (the last is ``width``)
    ranking: list[int]  # channel indices, least important first
    kept: list[float]  # fraction of the group's importance kept at each candidate (best channels kept)
    sides: int = 0  # layer inputs and outputs whose width this group sets

    @property
    def values(self) -> list[float]:
        """The allocator's value of each candidate: ``sides * log(kept fraction)`` (see the module doc)."""
        return [self.sides * math.log(max(k, MIN_KEPT)) for k in self.kept]


@dataclass
class LayerSite:
    """A convolution or linear layer: its spec now, and the groups its input / output widths belong to."""

    name: str
    spec: Any  # OpSpec
    inp: int | None  # index of the group that sets its input width (None: fixed)
    out: int | None  # index of the group that sets its output width (None: fixed)


@dataclass
class Structure:
    groups: list[ChannelGroup]
    layers: list[LayerSite]
    notes: list[str] = field(default_factory=list)

    def _axis(self, g: int | None, fixed: int) -> list[int]:
        return self.groups[g].candidates if g is not None else [fixed]

    def layer_specs(self, layer: LayerSite) -> list[list[Any]]:
        """The layer's spec at every (input option, output option) pair."""
        rows = self._axis(layer.inp, layer.spec.c_in)
        cols = self._axis(layer.out, layer.spec.c_out)
        if layer.inp is not None and layer.inp == layer.out:  # depthwise: input width = output width
            return [[layer.spec.with_widths(c, c) if i == j else None for j, c in enumerate(cols)]
                    for i, _ in enumerate(rows)]
        return [[layer.spec.with_widths(r, c) for c in cols] for r in rows]

    def specs(self) -> list[Any]:
        """Every distinct layer spec the table needs, in a stable order."""
        seen: dict[str, Any] = {}
        for layer in self.layers:
            for row in self.layer_specs(layer):
                for s in row:
                    if s is not None:
                        seen.setdefault(s.key, s)
        return list(seen.values())

    def widths(self, choice) -> dict[str, int]:
        return {g.root: g.candidates[o] for g, o in zip(self.groups, choice, strict=True)}


def layer_inputs(model, example) -> dict[str, tuple[int, ...]]:
    """Input shape (without batch) of every convolution and linear layer, from one forward pass."""
    from deploycomp.prune.channels import forward_through_layers

    shapes: dict[str, tuple[int, ...]] = {}
    forward_through_layers(model, example, lambda name, m, args, out: shapes.setdefault(name, tuple(args[0].shape[1:])))
    return shapes


def layer_spec(module, in_shape: tuple[int, ...]):
    """The :class:`~deploycomp.prune.probes.OpSpec` of a Conv2d or Linear module at its current widths."""
    import torch.nn as nn

    from deploycomp.prune.probes import OpSpec

    if isinstance(module, nn.Linear):
        return OpSpec("linear", module.in_features, module.out_features)
    pad = module.padding
    if isinstance(pad, str):  # "same" / "valid"
        pad = tuple(d * (k - 1) // 2 for k, d in zip(module.kernel_size, module.dilation, strict=True)) \
            if pad == "same" else (0, 0)
    depthwise = module.groups > 1 and module.groups == module.in_channels == module.out_channels
    return OpSpec("conv", module.in_channels, module.out_channels, tuple(module.kernel_size), tuple(module.stride),
                  tuple(pad), tuple(module.dilation), depthwise, tuple(in_shape[-2:]), groups=module.groups)


def analyse_channels(model, example, criterion, ignored: list[str], round_to: int, n_widths: int) -> Structure:
    """Groups (with the criterion's channel ranking and the value kept at each candidate width) and layers.

    Groups are torch-pruning's (``DependencyGraph.get_all_groups``, the classifier and ``ignored`` layers
    excluded), scored by ``criterion`` exactly as torch-pruning's pruner scores them for global ranking.
    """
    import numpy as np
    import torch.nn as nn

    from deploycomp.prune import adapters
    from deploycomp.prune.channels import one_thread, pruning_errors

    notes: list[str] = []
    modules = dict(model.named_modules())
    names = {m: n for n, m in modules.items()}
    criterion.reset()
    in_of: dict[Any, int] = {}
    out_of: dict[Any, int] = {}
    mixed: set[Any] = set()  # layers whose input concatenates several groups
    groups: list[ChannelGroup] = []
    with one_thread():
        with pruning_errors("building its dependency graph"):
            dg = adapters.dependency_graph(model, example)
        for group in dg.get_all_groups(ignored_layers=[modules[n] for n in ignored] + adapters.ignored_modules(model),
                                       root_module_types=(nn.Conv2d, nn.Linear)):
            root = group[0].dep.target.module
            layers = [(dep, idxs) for dep, idxs in group if isinstance(dep.target.module, (nn.Conv2d, nn.Linear))]
            if any(isinstance(d.target.module, nn.Conv2d) and d.target.module.groups > 1
                   and not _depthwise(d.target.module) for d, _ in layers):
                notes.append(f"group of {names[root]} contains a grouped convolution: kept at full width")
                continue
            scores = criterion(group)
            if scores is None:
                continue
            scores = scores.detach().cpu().double().numpy()
            gid = len(groups)
            for dep, idxs in layers:
                m = dep.target.module
                if _depthwise(m):
                    in_of[m] = out_of[m] = gid
                elif dg.is_out_channel_pruning_fn(dep.handler):
                    out_of[m] = gid
                elif dg.is_in_channel_pruning_fn(dep.handler):
                    full = m.in_channels if isinstance(m, nn.Conv2d) else m.in_features
                    if len(idxs) != full or m in in_of:
                        mixed.add(m)
                    in_of[m] = gid
            width = len(scores)
            order = np.argsort(scores, kind="stable")  # least important first
            cands = candidate_widths(width, round_to, n_widths)
            groups.append(ChannelGroup(names[root], width, cands, order.tolist(), _kept(scores[order], cands)))
    shapes = layer_inputs(model, example)
    sites = []
    for n, m in modules.items():
        if not isinstance(m, (nn.Conv2d, nn.Linear)) or n not in shapes:
            continue
        inp = in_of.get(m)
        if m in mixed:
            notes.append(f"{n} reads channels of several groups (a concatenation): modelled at its full input width")
            inp = None
        sites.append(LayerSite(n, layer_spec(m, shapes[n]), inp, out_of.get(m)))
    for i, g in enumerate(groups):
        g.sides = sum((site.inp == i) + (site.out == i) for site in sites)
    return Structure(groups, sites, notes)


def _kept(ascending, candidates: list[int]) -> list[float]:
    """Fraction of the importance kept when only the best ``w`` channels stay, for each candidate ``w``.

    Negative scores (relevance can be) count as zero; a group without positive scores counts channels.
    """
    import numpy as np

    pos = np.clip(ascending, 0.0, None)
    total = float(pos.sum())
    width = len(pos)
    if total <= 0:
        return [w / width for w in candidates]
    dropped = np.concatenate([[0.0], np.cumsum(pos)])
    return [float((total - dropped[width - w]) / total) for w in candidates]


def _depthwise(m) -> bool:
    import torch.nn as nn

    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def prune_to_widths(model, example, widths: dict[str, int], rankings: dict[str, list[int]]) -> list:
    """Prune each group rooted at a module of ``widths`` to that many channels, dropping the channels
    that come first in its ``rankings`` entry; returns torch-pruning's history (for the checkpoint)."""

    from deploycomp.prune import adapters
    from deploycomp.prune.channels import one_thread, pruning_errors

    modules = dict(model.named_modules())
    with one_thread():
        with pruning_errors("building its dependency graph"):
            dg = adapters.dependency_graph(model, example)
        for root, w in widths.items():
            m = modules[root]
            pruner = dg.get_pruner_of_module(m)
            n = pruner.get_out_channels(m) - w
            if n <= 0:
                continue
            idxs = sorted(int(i) for i in rankings[root][:n])
            group = dg.get_pruning_group(m, pruner.prune_out_channels, idxs)
            if dg.check_pruning_group(group):
                group.prune()
    return dg.pruning_history()
