"""Pruning criteria: torch-pruning ``Importance`` subclasses registered by name.

A criterion scores the channels of a torch-pruning dependency group (a conv's output channels together
with the BatchNorm, the consumers' input channels, residual partners, ...); the lowest scores are
pruned. Data-driven criteria first ``calibrate`` on deterministic calibration batches and keep their
statistics on the modules (see :mod:`deploycomp.prune.calibrate`).

Every criterion is constructed as ``cls(options)`` from a :class:`CriterionOptions` and declares:

- ``granularity``: ``"channels"`` (torch-pruning width pruning) or ``"blocks"`` (depth pruning);
- ``needs_data``: whether it draws calibration batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch_pruning as tp
from torch_pruning.pruner import function

from deploycomp import console
from deploycomp.errors import check
from deploycomp.prune import calibrate
from deploycomp.registry import Registry

CRITERIA: Registry[type] = Registry("pruning criterion", plural="pruning criteria")

NORMS = {"l1": 1, "l2": 2}


def register_criterion(name: str):
    """Class decorator: register a criterion under ``name`` (duplicates are refused)."""

    def wrap(cls):
        cls.name = name
        CRITERIA.register(name, cls)
        return cls

    return wrap


def get_criterion(name: str) -> type:
    return CRITERIA.get(name)


def list_criteria() -> list[str]:
    return CRITERIA.names()


@dataclass
class CriterionOptions:
    norm: str = "l1"  # magnitude / hybrid: weight norm, a key of NORMS
    coverage_threshold: float = 0.25  # coverage: scaled activation above which a channel counts as covered
    seed: int = 0  # random: the scores' seed
    device: Any = None  # where calibration runs (torch.device or None for CPU)
    loss: Any = None  # taylor: the task's loss ``(logits, inputs, targets) -> loss`` (None: cross-entropy)


class Criterion:
    """What every criterion has, channel or block."""

    name = ""
    granularity = "channels"
    needs_data = False

    def __init__(self, options: CriterionOptions | None = None):
        self.options = options or CriterionOptions()

    def check(self, ckpt) -> None:
        """Warn about a model this criterion is not meant for (called once, before pruning)."""

    def calibrate(self, model, batches: Sequence) -> None:
        """Collect statistics from ``batches`` onto ``model`` (data-driven criteria only)."""

    def reset(self) -> None:
        """Called before each pruning pass (dry runs included), so that passes are reproducible."""


# -- helpers shared by the channel criteria ---------------------------------------------------------

_OUT = (function.prune_conv_out_channels, function.prune_linear_out_channels)
_IN = (function.prune_conv_in_channels, function.prune_linear_in_channels)
_BN = (function.prune_batchnorm_out_channels,)


def dep_kind(handler) -> str | None:
    """``"out"``, ``"in"`` or ``"bn"`` for the pruning functions criteria score; None for the rest. An adapter's
    pruner that subclasses torch-pruning's convolution or linear pruner counts as one."""
    owner = getattr(handler, "__self__", None)
    if isinstance(owner, (function.ConvPruner, function.LinearPruner)) and handler.__name__ in (
            "prune_out_channels", "prune_in_channels"):
        return "out" if handler.__name__ == "prune_out_channels" else "in"
    if handler in _OUT:
        return "out"
    if handler in _IN:
        return "in"
    if handler in _BN:
        return "bn"
    return None


def per_output(t: torch.Tensor) -> torch.Tensor:
    """Sum a weight-shaped tensor per output channel."""
    return t.flatten(1).sum(1) if t.dim() > 1 else t


def per_input(layer, t: torch.Tensor) -> torch.Tensor:
    """Sum a weight-shaped tensor per *input* channel of ``layer`` (handles grouped/depthwise convs)."""
    if isinstance(layer, nn.Linear):
        return t.sum(0)
    per = t.flatten(2).sum(2)  # (out, in/groups)
    g = layer.groups
    if g == 1:
        return per.sum(0)
    out_per_group = per.shape[0] // g
    return per.reshape(g, out_per_group, -1).sum(1).reshape(-1)  # (groups * in/groups,) = (in,)


class ChannelCriterion(Criterion, tp.importance.GroupMagnitudeImportance):
    """Base of channel criteria: scores each layer of a group, then torch-pruning's reduce/normalise.

    Subclasses implement ``layer_score(layer, kind, idxs)`` for ``kind`` in {"out", "in", "bn"}
    and return a score per index (or None to skip that layer).
    """

    group_reduction = "mean"
    normalizer = "mean"

    def __init__(self, options: CriterionOptions | None = None):
        Criterion.__init__(self, options)
        tp.importance.GroupMagnitudeImportance.__init__(self, p=1, group_reduction=self.group_reduction,
                                                        normalizer=self.normalizer)

    def layer_score(self, layer, kind: str, idxs: list[int]) -> torch.Tensor | None:
        raise NotImplementedError

    @torch.no_grad()
    def scores(self, group) -> torch.Tensor | None:
        """Raw per-channel scores of ``group`` (reduced over its layers, not normalised)."""
        imps, roots = [], []
        for i, (dep, idxs) in enumerate(group):
            kind = dep_kind(dep.handler)
            if kind is None:
                continue
            s = self.layer_score(dep.target.module, kind, idxs)
            if s is not None:
                imps.append(s.float())
                roots.append(group[i].root_idxs)
        if not imps:
            return None
        return self._reduce(imps, roots)

    @torch.no_grad()
    def __call__(self, group) -> torch.Tensor | None:
        s = self.scores(group)
        return None if s is None else self._normalize(s, self.normalizer)


# -- the criteria -----------------------------------------------------------------------------------


@register_criterion("magnitude")
class Magnitude(ChannelCriterion):
    """Pruning Filters for Efficient ConvNets (Li et al., arXiv:1608.08710).

    Score: L1 (or L2, ``--norm l2``) norm of the channel's weights, averaged over the layers of its group.
    """

    def layer_score(self, layer, kind, idxs):
        p = NORMS[self.options.norm]
        w = layer.weight.detach()
        if kind == "out":
            return per_output(w.abs().pow(p))[idxs]
        if kind == "in":
            return per_input(layer, w.abs().pow(p))[idxs]
        return w.abs().pow(p)[idxs] if getattr(layer, "affine", False) else None


@register_criterion("taylor")
class Taylor(ChannelCriterion):
    """Importance Estimation for Neural Network Pruning (Molchanov et al., CVPR 2019, arXiv:1906.10771).

    Score: first-order Taylor |w * dL/dw|, accumulated over all calibration batches (the task's loss on the
    true targets: cross-entropy on labels, or per pixel for segmentation), summed over the channel's
    weights in every layer of its group.
    """

    needs_data = True

    def calibrate(self, model, batches):
        calibrate.collect_taylor(model, batches, self.options.device, self.options.loss)

    def layer_score(self, layer, kind, idxs):
        if not calibrate.has_stats(layer, "taylor"):
            return None
        t = calibrate.stats(layer)["taylor"]
        if kind == "out":
            return per_output(t)[idxs]
        if kind == "in":
            return per_input(layer, t)[idxs]
        return t[idxs]


@register_criterion("wanda")
class Wanda(ChannelCriterion):
    """A Simple and Effective Pruning Approach for Large Language Models (Wanda; Sun et al., arXiv:2306.11695).

    Score of an input channel c of a consumer layer: sum_j |W_jc| * ||X_c||_2, where ||X_c|| is the norm
    of the channel's input activation over *all* calibration batches; structured here per channel.
    """

    needs_data = True

    def calibrate(self, model, batches):
        calibrate.collect_activations(model, batches, self.options.coverage_threshold, self.options.device)

    def layer_score(self, layer, kind, idxs):
        if kind != "in" or not calibrate.has_stats(layer, "act_sq"):
            return None
        norm = calibrate.stats(layer)["act_sq"].sqrt()
        return (per_input(layer, layer.weight.detach().abs()) * norm)[idxs]


@register_criterion("coverage")
class Coverage(ChannelCriterion):
    """DeepXplore: Automated Whitebox Testing of Deep Learning Systems (Pei et al., arXiv:1705.06640).

    Score: neuron coverage, the fraction of calibration inputs on which the channel's activation (its
    spatial mean, scaled to [0, 1] per layer and input) exceeds ``--coverage-threshold``.
    """

    needs_data = True

    def calibrate(self, model, batches):
        calibrate.collect_activations(model, batches, self.options.coverage_threshold, self.options.device)

    def layer_score(self, layer, kind, idxs):
        if kind != "in" or not calibrate.has_stats(layer, "covered"):
            return None
        s = calibrate.stats(layer)
        return (s["covered"] / max(s["samples"], 1))[idxs]


@register_criterion("lrp")
class Relevance(ChannelCriterion):
    """Pruning by Explaining: A Novel Criterion for Deep Neural Network Pruning (Yeom et al., arXiv:1912.08881).

    Score: layer-wise relevance propagation (zennit, EpsilonPlusFlat with ResNet/BatchNorm canonizers)
    from the true class, summed per channel at the consumers' inputs over all calibration batches.
    """

    needs_data = True
    normalizer = None  # relevance is conserved from layer to layer, so raw sums compare across layers

    def calibrate(self, model, batches):
        calibrate.collect_relevance(model, batches, self.options.device)

    def layer_score(self, layer, kind, idxs):
        if kind != "in" or not calibrate.has_stats(layer, "relevance"):
            return None
        return calibrate.stats(layer)["relevance"][idxs]


def interleave(first: Sequence[int], second: Sequence[int]) -> list[int]:
    """Merge two pruning orders (least important first) by alternating them, skipping repeats."""
    out, seen = [], set()
    for pair in zip(first, second, strict=True):
        for c in pair:
            if c not in seen:
                seen.add(c)
                out.append(c)
    return out


@register_criterion("hybrid")
class Hybrid(Relevance):
    """Relevance plus magnitude, after Pruning by Explaining (Yeom et al., arXiv:1912.08881) on VGG-16.

    One pruning list per group that alternates the LRP-relevance ranking and the weight-magnitude ranking
    (least important first, repeats skipped); a channel's score is its position in that list.
    """

    normalizer = "max"  # positions 0..n-1 -> [0, 1] in every group, comparable under --global

    def __init__(self, options=None):
        super().__init__(options)
        self.magnitude = Magnitude(self.options)

    @torch.no_grad()
    def scores(self, group):
        rel, mag = Relevance.scores(self, group), self.magnitude.scores(group)
        if rel is None or mag is None:
            return mag if rel is None else rel
        order = interleave(torch.argsort(rel, stable=True).tolist(), torch.argsort(mag, stable=True).tolist())
        pos = torch.empty(len(order))
        pos[torch.tensor(order)] = torch.arange(len(order), dtype=torch.float) + 1
        return pos


@register_criterion("slimming")
class Slimming(ChannelCriterion):
    """Learning Efficient Convolutional Networks through Network Slimming (Liu et al., arXiv:1708.06519).

    Score: |gamma| of the BatchNorm layers of the group. Meant for a model trained with
    ``deploycomp train --sparsity LAMBDA``; groups without BatchNorm are not pruned.
    """

    normalizer = None  # |gamma| are comparable across layers after sparsity training (global threshold)

    def check(self, ckpt):
        trained_sparse = any(e.get("op") == "train" and e.get("params", {}).get("sparsity")
                             for e in ckpt.metadata.get("lineage", []))
        if not trained_sparse:
            console.warn("slimming prunes by BatchNorm |gamma|, but this model's lineage shows no sparsity "
                         "training; train it first with `deploycomp train --sparsity 1e-4` for meaningful gammas")

    def layer_score(self, layer, kind, idxs):
        if kind != "bn" or not layer.affine:
            return None
        return layer.weight.detach().abs()[idxs]


@register_criterion("random")
class Random(ChannelCriterion):
    """Recovering from Random Pruning: On the Plasticity of Deep CNNs (Mittal et al., arXiv:1801.10447).

    Score: seeded uniform noise (reproducible with ``seed``); the baseline every criterion must beat.
    """

    def __init__(self, options=None):
        super().__init__(options)
        self.reset()

    def reset(self):
        self._gen = torch.Generator().manual_seed(self.options.seed)

    @torch.no_grad()
    def scores(self, group):
        _, idxs = group[0]
        return torch.rand(len(idxs), generator=self._gen)


@register_criterion("depth")
class BlockSensitivity(Criterion):
    """Deep Networks with Stochastic Depth (Huang et al., arXiv:1603.09382): blocks can be dropped.

    Removes whole residual blocks with identity shortcuts, least sensitive first: a block's score is the
    rise of the calibration loss when it is skipped. ``ratio`` is the fraction of removable blocks.
    """

    granularity = "blocks"
    needs_data = True

    def calibrate(self, model, batches):
        from deploycomp.prune.depth import block_sensitivity, removable_blocks

        self.sensitivity = block_sensitivity(model, removable_blocks(model), batches, self.options.device)

    def block_scores(self, model, names: list[str]) -> dict[str, float]:
        """Loss rise of each block in ``names`` when skipped, from the last :meth:`calibrate`."""
        check(all(n in getattr(self, "sensitivity", {}) for n in names),
              "depth pruning needs calibration batches before scoring blocks")
        return {n: self.sensitivity[n] for n in names}
