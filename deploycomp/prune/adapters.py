"""What torch-pruning needs to know about an architecture beyond its graph, registered per module class.

One adapter per structural pattern (not per model), keyed by ``"module.Class"`` of the module that carries
the pattern, so registering imports nothing. An adapter may:

- add pruner arguments (``pruner_kwargs``: attention heads, whose channels must go in whole groups);
- keep layers' output channels (``ignore``: the channels that cross a pattern torch-pruning cannot map,
  such as a channel shuffle or a fixed-size split, stay; the widths inside the pattern are pruned);
- change what torch-pruning traces (``tracing``: a context, entered once per adapter while the
  dependency graph is built, that makes a forward pass use ops whose channel mapping is known);
- fix the attributes a forward pass reads that pruning does not update (``after``: torchvision's ViT
  reshapes with ``hidden_dim``); it runs after pruning and again after a checkpoint's history is
  replayed, so a pruned model reloads the same;
- refuse (``refuse``: a reason): patterns whose dependency graph takes minutes or many GiB, or that
  torch-pruning maps wrongly, end in one line within seconds instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from deploycomp.errors import DeploycompError
from deploycomp.registry import Registry


class PruningError(DeploycompError):
    """torch-pruning cannot prune a model (a pattern it cannot trace or maps wrongly)."""


@dataclass(frozen=True)
class Adapter:
    pruner_kwargs: Callable[[Any], dict[str, dict]] = lambda module: {}  # merged into torch-pruning's kwargs
    after: Callable[[Any], None] = lambda module: None  # fix the module's attributes after (re)pruning
    ignore: Callable[[Any], list] = lambda module: []  # layers whose output channels must stay
    tracing: Callable[[], contextlib.AbstractContextManager] | None = None  # while the graph is built
    refuse: str = ""  # not prunable: the reason (a one-line refusal before any graph is built)
    note: str = ""


ADAPTERS: Registry[Adapter] = Registry("pruning adapter")


def register_adapter(class_path: str, **fields):
    """Register an :class:`Adapter` for modules of class ``class_path`` ("module.Class")."""
    return ADAPTERS.register(class_path, Adapter(**fields))


def _class_path(module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def _matches(model) -> list[tuple[Any, Adapter]]:
    return [(m, ADAPTERS.get(_class_path(m))) for m in model.modules() if _class_path(m) in ADAPTERS]


def pruner_kwargs(model) -> dict[str, dict]:
    """Extra torch-pruning keyword arguments for ``model`` (dict-valued ones merged across modules)."""
    out: dict[str, dict] = {}
    for module, adapter in _matches(model):
        for key, value in adapter.pruner_kwargs(module).items():
            out.setdefault(key, {}).update(value)
    return out


def ignored_modules(model) -> list:
    """Layers whose output channels the adapters of ``model`` keep (the classifier is protected elsewhere)."""
    out: list = []
    for module, adapter in _matches(model):
        out += [m for m in adapter.ignore(module) if all(m is not o for o in out)]
    return out


def check_prunable(model, name: str) -> None:
    """Refuse ``model`` (called ``name`` in the message) at once when an adapter says it cannot be pruned."""
    for module, adapter in _matches(model):
        if adapter.refuse:
            raise PruningError(f"cannot prune {name} by channels: {adapter.refuse} ({type(module).__name__}); "
                               "--method depth drops whole blocks instead, where the model has residual blocks")


@contextlib.contextmanager
def tracing(model) -> Iterator[None]:
    """The adapters' tracing contexts for ``model``, each entered once, while a dependency graph is built."""
    with contextlib.ExitStack() as stack:
        seen: set[int] = set()
        for _, adapter in _matches(model):
            if adapter.tracing is not None and id(adapter) not in seen:
                seen.add(id(adapter))
                stack.enter_context(adapter.tracing())
        yield


def dependency_graph(model, example):
    """torch-pruning's ``DependencyGraph`` of ``model`` traced with the adapters' tracing contexts."""
    import torch_pruning as tp

    with tracing(model):
        return tp.DependencyGraph().build_dependency(model, example_inputs=example)


def after_pruning(model) -> None:
    """Bring the attributes of ``model``'s adapted modules in line with their pruned layers."""
    for module, adapter in _matches(model):
        adapter.after(module)


def _mha_heads(module) -> dict[str, dict]:
    import torch.nn as nn

    return {"num_heads": {m: m.num_heads for m in module.modules() if isinstance(m, nn.MultiheadAttention)}}


def _vit_hidden_dim(model) -> None:
    model.hidden_dim = model.conv_proj.out_channels


register_adapter("torchvision.models.vision_transformer.VisionTransformer", pruner_kwargs=_mha_heads,
                 after=_vit_hidden_dim, note="attention heads pruned as groups; hidden_dim follows conv_proj")


# --------------------------------------------------------------------------------------------------
# Channel shuffle (ShuffleNetV2): view -> transpose -> view, which torch-pruning 1.6 maps by dividing by zero.
#
# The shuffled channels (a block's output: the concatenation of its two branches, interleaved) stay, and
# so does the split of a block's input into halves; the widths inside each branch (1x1 -> depthwise ->
# 1x1) and the layers outside the blocks are pruned. While the graph is traced, the block's split and
# shuffle are ops torch-pruning sees as element-wise (the channels that cross them are never pruned, so
# that mapping is never used).


def _opaque_ops():
    import torch

    class Halves(torch.autograd.Function):
        """x.chunk(2, dim=1), traced as one element-wise op."""

        @staticmethod
        def forward(ctx, x):
            a, b = x.chunk(2, dim=1)
            return a.clone(), b.clone()

        @staticmethod
        def backward(ctx, ga, gb):
            return torch.cat((ga, gb), dim=1)

    class Shuffle(torch.autograd.Function):
        """Channel shuffle, traced as one element-wise op."""

        @staticmethod
        def forward(ctx, x, groups):
            ctx.groups = groups
            b, c, h, w = x.shape
            return x.reshape(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)

        @staticmethod
        def backward(ctx, g):
            b, c, h, w = g.shape
            k = ctx.groups
            return g.reshape(b, c // k, k, h, w).transpose(1, 2).reshape(b, c, h, w), None

    return Halves, Shuffle


@contextlib.contextmanager
def _shufflenet_tracing() -> Iterator[None]:
    import torch
    from torchvision.models import shufflenetv2

    halves, shuffle = _opaque_ops()

    def forward(self, x):  # torchvision's InvertedResidual.forward with the two ops above
        if self.stride == 1:
            x1, x2 = halves.apply(x)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return shuffle.apply(out, 2)

    cls = shufflenetv2.InvertedResidual
    original = cls.forward
    cls.forward = forward
    try:
        yield
    finally:
        cls.forward = original


def _shufflenet_outputs(block) -> list:
    """The last convolution of each branch: its output channels are shuffled with the other branch's."""
    import torch.nn as nn

    return [[m for m in branch if isinstance(m, nn.Conv2d)][-1] for branch in (block.branch1, block.branch2)
            if len(branch)]


register_adapter("torchvision.models.shufflenetv2.InvertedResidual", ignore=_shufflenet_outputs,
                 tracing=_shufflenet_tracing,
                 note="channel shuffle: the shuffled block outputs stay, the widths inside each branch are pruned")
