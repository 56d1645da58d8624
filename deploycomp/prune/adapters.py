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
    """The adapters' tracing contexts for ``model``, each entered once, while a dependency graph is built
    (torch-pruning's warning about parameters outside layers silenced)."""
    import warnings

    with contextlib.ExitStack() as stack:
        stack.enter_context(warnings.catch_warnings())
        # torch-pruning lists parameters outside layers (ViT's cls_token, Swin's bias tables) on every trace
        warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
        seen: set = set()  # one entry per context, however many modules (or classes) share it
        for _, adapter in _matches(model):
            if adapter.tracing is not None and adapter.tracing not in seen:
                seen.add(adapter.tracing)
                stack.enter_context(adapter.tracing())
        yield


def dependency_graph(model, example):
    """torch-pruning's ``DependencyGraph`` of ``model`` traced with the adapters' tracing contexts (and their
    pruners for layers torch-pruning would prune incompletely)."""
    import torch_pruning as tp

    pruners = pruner_kwargs(model).get("customized_pruners")
    with tracing(model):
        return tp.DependencyGraph().build_dependency(model, example_inputs=example, customized_pruners=pruners)


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


@contextlib.contextmanager
def _shufflenet_tracing() -> Iterator[None]:
    import torch
    from torchvision.models import shufflenetv2

    halves = _as_one_op(lambda x: x.chunk(2, dim=1))
    shuffle = _as_one_op(shufflenetv2.channel_shuffle)

    def forward(self, x):  # torchvision's InvertedResidual.forward with the split and the shuffle as one op each
        if self.stride == 1:
            x1, x2 = halves(x)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return shuffle(out, 2)

    with _forward_of(shufflenetv2.InvertedResidual, forward):
        yield


@contextlib.contextmanager
def _forward_of(cls, forward) -> Iterator[None]:
    """``cls.forward`` replaced by ``forward`` inside the block (while a graph is traced)."""
    original = cls.forward
    cls.forward = forward
    try:
        yield
    finally:
        cls.forward = original


def _as_one_op(fn: Callable) -> Callable:
    """``fn`` as one autograd node, which torch-pruning traces as an element-wise op (channel i in, channel i
    out). For tracing only: it has no backward. Used where the channels that cross ``fn`` are kept by
    ``ignore``, or where ``fn`` only moves the channel axis without reordering channels."""
    import torch

    class OneOp(torch.autograd.Function):  # (torch-pruning reads an op's kind from its name: keep it neutral)
        @staticmethod
        def forward(ctx, x, *args):
            out = fn(x, *args)
            return tuple(o.clone() for o in out) if isinstance(out, tuple) else out.clone()

        @staticmethod
        def backward(ctx, *grads):
            raise RuntimeError("an op that stands in for others while torch-pruning traces is never differentiated")

    return OneOp.apply


def _shufflenet_outputs(block) -> list:
    """The last convolution of each branch: its output channels are shuffled with the other branch's."""
    import torch.nn as nn

    return [[m for m in branch if isinstance(m, nn.Conv2d)][-1] for branch in (block.branch1, block.branch2)
            if len(branch)]


register_adapter("torchvision.models.shufflenetv2.InvertedResidual", ignore=_shufflenet_outputs,
                 tracing=_shufflenet_tracing,
                 note="channel shuffle: the shuffled block outputs stay, the widths inside each branch are pruned")


# --------------------------------------------------------------------------------------------------
# Fixed channel splits: a forward pass splits a layer's output into parts whose sizes it keeps in an
# attribute (CSP's halves, Res2Net's scales), which pruning does not update. The split layer keeps its
# width, so the parts keep theirs; the widths inside the blocks that consume the parts are pruned.
# (Pruning the same channels in every part, with torch-pruning's out_channel_groups and the size attribute
# following the layer, was tried: torch-pruning 1.6 maps indices through the split wrongly, IndexError.)


def _conv_of(module):
    """The convolution of ``module`` (a Conv2d itself, or timm's ConvNormAct around one)."""
    import torch.nn as nn

    return module if isinstance(module, nn.Conv2d) else module.conv


def _layers(*names: str) -> Callable[[Any], list]:
    return lambda block: [getattr(block, n) for n in names]


def _keep(*layers: str) -> Callable[[Any], list]:
    return lambda block: [_conv_of(getattr(block, n)) for n in layers]


# x.split(self.expand_chs // 2): two halves of conv_exp's output
register_adapter("timm.models.cspnet.CrossStage", ignore=_keep("conv_exp"),
                 note="CSP split: conv_exp's output (split in halves) stays; the widths inside the blocks are pruned")
register_adapter("timm.models.cspnet.CrossStage3", ignore=_keep("conv_exp"),
                 note="CSP split: conv_exp's output (split in halves) stays; the widths inside the blocks are pruned")
register_adapter("timm.models.res2net.Bottle2neck", ignore=_keep("conv1"),
                 note="Res2Net scales: conv1's output (split in scales) stays")


# --------------------------------------------------------------------------------------------------
# Attention whose reshapes torch-pruning 1.6 does not map (head count and head width read from attributes,
# q/k/v split with fixed sizes, token mixers that reshape channels into heads): the attention's own layers
# keep their widths, which also keeps the residual stream they write to; the MLPs and convolutions around
# them are pruned.


def _own_layers(module) -> list:
    import torch.nn as nn

    return [m for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv1d))]


for _attention in ("timm.layers.attention.Attention", "timm.models.crossvit.CrossAttention",
                   "timm.models.swin_transformer.WindowAttention", "timm.models.coat.FactorAttnConvRelPosEnc",
                   "timm.models.efficientformer.Attention", "timm.models.edgenext.CrossCovarianceAttn",
                   "timm.models.levit.Attention", "timm.models.levit.AttentionDownsample",
                   "timm.models.tiny_vit.Attention", "timm.models.efficientvit_mit.LiteMLA",
                   "timm.models.mobilevit.LinearSelfAttention"):
    register_adapter(_attention, ignore=_own_layers,
                     note="attention: its layers (and the residual stream) keep their widths; MLPs are pruned")


@contextlib.contextmanager
def _window_attention_tracing() -> Iterator[None]:
    from torchvision.models import swin_transformer

    # Between qkv and proj, torchvision partitions windows, attends and reverses the partition with F.linear
    # on the layers' weights, which torch-pruning cannot follow (and whose reshapes exhaust its memory): traced
    # as one op from qkv's output to proj's input. Only shapes matter for tracing; the model runs the real thing.
    windows = _as_one_op(lambda qkv, width: qkv[..., :width])

    def forward(self, x):
        return self.proj(windows(self.qkv(x), self.proj.in_features))

    with contextlib.ExitStack() as stack:
        for cls in (swin_transformer.ShiftedWindowAttention, swin_transformer.ShiftedWindowAttentionV2):
            stack.enter_context(_forward_of(cls, forward))
        yield


@contextlib.contextmanager
def _maxvit_tracing() -> Iterator[None]:
    from torchvision.models import maxvit

    # Block and grid partitions move the channel axis last without reordering channels: one op each. The
    # attention between to_qkv and merge is one op too (both keep their widths).
    part, depart = maxvit.WindowPartition.forward, maxvit.WindowDepartition.forward  # the originals
    partition = _as_one_op(lambda x, module, *sizes: part(module, x, *sizes))
    departition = _as_one_op(lambda x, module, *sizes: depart(module, x, *sizes))
    attend = _as_one_op(lambda qkv, width: qkv[..., :width])
    with contextlib.ExitStack() as stack:
        stack.enter_context(_forward_of(maxvit.WindowPartition, lambda self, x, p: partition(x, self, p)))
        stack.enter_context(_forward_of(maxvit.WindowDepartition,
                                        lambda self, x, p, hp, wp: departition(x, self, p, hp, wp)))
        stack.enter_context(_forward_of(maxvit.RelativePositionalMultiHeadAttention,
                                        lambda self, x: self.merge(attend(self.to_qkv(x), self.merge.in_features))))
        yield


register_adapter("torchvision.models.maxvit.RelativePositionalMultiHeadAttention", ignore=_layers("to_qkv", "merge"),
                 tracing=_maxvit_tracing,
                 note="MaxViT: partitions and attention traced as single ops; to_qkv and merge (and the residual "
                      "stream) keep their widths; MBConv and MLP widths are pruned")


for _cls in ("ShiftedWindowAttention", "ShiftedWindowAttentionV2"):
    register_adapter(f"torchvision.models.swin_transformer.{_cls}", ignore=_layers("qkv", "proj"),
                     tracing=_window_attention_tracing,
                     note="window attention: qkv and proj (and the residual stream) keep their widths; MLPs are "
                          "pruned")


# --------------------------------------------------------------------------------------------------
# Refused at once: patterns whose dependency graph takes minutes or many GiB in torch-pruning 1.6, or fails
# after a long trace. The reason is the whole message; --method depth remains where blocks are residual.

for _cls, _why in {
    "timm.models.rexnet.LinearBottleneck": "torch-pruning 1.6's dependency graph takes over 10 minutes on "
                                           "partial-channel residual additions (ReXNet); not supported yet",
    "timm.layers.halo_attn.HaloAttn": "torch-pruning 1.6's dependency graph exhausts memory on blocked "
                                      "self-attention reshapes (HaloNet); not supported yet",
    "timm.layers.bottleneck_attn.BottleneckAttn": "torch-pruning 1.6's dependency graph exhausts memory on "
                                                  "self-attention reshapes (BoTNet); not supported yet",
    "timm.models.efficientvit_msra.CascadedGroupAttention": "torch-pruning 1.6's dependency graph exhausts memory "
                                                            "on cascaded group attention; not supported yet",
    "timm.layers.lambda_layer.LambdaLayer": "torch-pruning 1.6 divides by zero in its dependency graph on lambda "
                                            "layers, after a minute of tracing; not supported yet",
}.items():
    register_adapter(_cls, refuse=_why)


# --------------------------------------------------------------------------------------------------
# Parameters and attributes beside a layer's weights: pruned with them (a pruner for the layer type,
# a subclass of torch-pruning's own), or brought in line afterwards.


def _pruner(kind: str):
    """A torch-pruning pruner for ``kind`` ("std_conv": ScaledStdConv2d's gain pruned with its output
    channels; "no_bias_group_norm": a GroupNorm whose bias is None)."""
    import torch_pruning as tp

    fn = tp.pruner.function

    class StdConvPruner(fn.ConvPruner):
        def prune_out_channels(self, layer, idxs):
            keep = sorted(set(range(layer.out_channels)) - set(idxs))
            layer.gain = self._prune_parameter_and_grad(layer.gain, keep, 0)
            return super().prune_out_channels(layer, idxs)

    class NoBiasGroupNormPruner(fn.GroupNormPruner):
        def prune_out_channels(self, layer, idxs):
            keep = sorted(set(range(layer.num_channels)) - set(idxs))
            layer.num_channels -= len(idxs)
            if layer.weight is not None:
                layer.weight = self._prune_parameter_and_grad(layer.weight, keep, 0)
            if layer.bias is not None:
                layer.bias = self._prune_parameter_and_grad(layer.bias, keep, 0)
            return layer

        prune_in_channels = prune_out_channels

    return {"std_conv": StdConvPruner, "no_bias_group_norm": NoBiasGroupNormPruner}[kind]()


_PRUNERS: dict[str, Any] = {}  # one pruner object per kind: torch-pruning compares their bound methods


def _custom_pruner(kind: str) -> Callable[[Any], dict[str, dict]]:
    def kwargs(module) -> dict[str, dict]:
        if kind not in _PRUNERS:
            _PRUNERS[kind] = _pruner(kind)
        return {"customized_pruners": {type(module): _PRUNERS[kind]}}

    return kwargs


register_adapter("timm.layers.std_conv.ScaledStdConv2d", pruner_kwargs=_custom_pruner("std_conv"),
                 note="ScaledStdConv2d: its gain is pruned with its output channels")
register_adapter("timm.models.metaformer.GroupNorm1NoBias", pruner_kwargs=_custom_pruner("no_bias_group_norm"),
                 note="a GroupNorm without bias")


def _scale_shape(module) -> None:
    module.shape = (module.scale.numel(), *module.shape[1:])


register_adapter("timm.models.metaformer.Scale", after=_scale_shape,
                 note="layer scale: the shape it views its scale with follows the pruned scale")


def _blur_any_width(module) -> None:
    if module.channels is not None:  # one filter repeated per channel: the same filter for any width
        module.filt = module.filt[:1]
        module.channels = None


register_adapter("timm.layers.blur_pool.BlurPool2d", after=_blur_any_width,
                 note="anti-aliasing blur: the same fixed filter for however many channels remain")


# g, i, c = torch.split(self.fc1(x), self.split_indices, dim=-1): fc1's output stays
register_adapter("timm.models.mambaout.GatedConvBlock", ignore=_layers("fc1"),
                 note="gated conv split: fc1's output (split in three) stays; the residual stream is pruned")


# torchvision detectors: Faster R-CNN computes its proposals from detached RPN outputs, so a graph traced
# from the detections never reaches the RPN head, and the FPN outputs get pruned below what the shared RPN
# convolution expects (torch-pruning 1.6: "179 of 256 input channels"). Traced from every predictor's
# outputs instead, the FPN, RPN and RoI heads are pruned alike (and tracing skips the post-processing).
def _tv_detector_tracing():
    from deploycomp.tasks.tv_detection import tracing_heads

    return tracing_heads()


register_adapter("deploycomp.tasks.tv_detection.TorchvisionDetector", tracing=_tv_detector_tracing,
                 note="torchvision detectors: traced from their predictors' outputs, so the FPN, RPN and RoI "
                      "heads are pruned alike")
