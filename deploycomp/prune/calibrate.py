"""Collect what the data-driven criteria need from calibration batches: activations, gradients, relevance.

Statistics are accumulated over *all* calibration batches and stored on the modules themselves (a plain
dict attribute, not a buffer, so it never reaches a state dict). That way a ``copy.deepcopy`` of the model,
which the ratio/target search prunes as a dry run, carries them along. :func:`clear_stats` removes them.

Per Conv2d / Linear layer, indexed by *input* channel (feature for Linear):

- ``act_sq``: sum over samples (and positions) of the squared input activation (Wanda's ||X_c||^2);
- ``covered``: number of samples on which the channel's scaled mean activation exceeds the coverage threshold;
- ``samples``: number of samples seen;
- ``relevance``: LRP relevance arriving at the layer's input, summed over samples and positions.

Per Conv2d / Linear / BatchNorm2d layer, shaped like its weight:

- ``taylor``: sum over batches of |w * dL/dw| (first-order Taylor), elementwise.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from typing import Any

from deploycomp import console

STATS_ATTR = "_deploycomp_stats"


def stats(module) -> dict[str, Any]:
    """The statistics dict of ``module`` (created empty on first use)."""
    d = module.__dict__.get(STATS_ATTR)
    if d is None:
        d = {}
        module.__dict__[STATS_ATTR] = d
    return d


def has_stats(module, key: str) -> bool:
    return key in module.__dict__.get(STATS_ATTR, {})


def clear_stats(model) -> None:
    """Remove every statistic collected on ``model``'s modules."""
    for m in model.modules():
        m.__dict__.pop(STATS_ATTR, None)


def _layers(model, types=None):
    import torch.nn as nn

    types = types or (nn.Conv2d, nn.Linear)
    return [m for m in model.modules() if isinstance(m, types)]


def _add(d: dict, key: str, value) -> None:
    d[key] = d[key] + value if key in d else value.clone()


@contextmanager
def _input_hooks(model, fn):
    """Call ``fn(module, input_tensor)`` before every Conv2d / Linear forward."""
    handles = [m.register_forward_pre_hook(lambda mod, inputs: fn(mod, inputs[0])) for m in _layers(model)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _batches(batches: Sequence, description: str) -> Iterable:
    return console.progress(batches, len(batches), description)


def collect_activations(model, batches: Sequence, coverage_threshold: float = 0.25, device=None) -> None:
    """Accumulate per-input-channel activation norms and neuron coverage over all ``batches``.

    Coverage follows DeepXplore: per sample, a layer's channel activations (spatial means) are scaled
    to [0, 1] by that layer's min and max, and a channel counts as covered when it exceeds the threshold.
    """
    import torch

    def hook(module, x):
        x = x.detach().float()
        means = x.mean(dim=tuple(range(2, x.dim()))) if x.dim() > 2 else x.reshape(len(x), -1)
        sq = x.pow(2).sum(dim=(0, *range(2, x.dim()))) if x.dim() > 2 else x.reshape(len(x), -1).pow(2).sum(0)
        lo, hi = means.min(dim=1, keepdim=True).values, means.max(dim=1, keepdim=True).values
        scaled = (means - lo) / (hi - lo).clamp_min(1e-12)
        s = stats(module)
        _add(s, "act_sq", sq.cpu())
        _add(s, "covered", (scaled > coverage_threshold).sum(0).float().cpu())
        s["samples"] = s.get("samples", 0) + len(x)

    _run(model, batches, hook, device, "calibrate (activations)", torch.no_grad)


def _run(model, batches, hook, device, description, context) -> None:
    import torch

    device = device or torch.device("cpu")
    was_training = model.training
    model.eval().to(device)
    with _input_hooks(model, hook), context():
        for x, _ in _batches(batches, description):
            model(x.to(device))
    model.train(was_training)
    model.cpu()


def collect_taylor(model, batches: Sequence, device=None, loss_fn=None) -> None:
    """Accumulate |w * dL/dw| over all ``batches``: ``loss_fn(logits, inputs, targets)`` (the task's loss;
    None: cross-entropy on the true labels).

    The model stays in eval mode, so BatchNorm statistics are untouched.
    """
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    device = device or torch.device("cpu")
    layers = _layers(model, (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm))
    was_training = model.training
    flags = {p: p.requires_grad for p in model.parameters()}
    model.eval().to(device)
    try:
        for p in model.parameters():
            p.requires_grad_(True)
            p.grad = None
        for x, y in _batches(batches, "calibrate (gradients)"):
            x, y = x.to(device), y.to(device)
            logits = model(x)
            loss = loss_fn(logits, x, y) if loss_fn is not None else F.cross_entropy(logits, y)
            loss.backward()
            with torch.no_grad():
                for m in layers:
                    if getattr(m, "weight", None) is not None and m.weight.grad is not None:
                        _add(stats(m), "taylor", (m.weight * m.weight.grad).abs().cpu())
                        m.weight.grad = None
            model.zero_grad(set_to_none=True)
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None
        model.train(was_training)
        model.cpu()


def lrp_canonizers(model) -> list:
    """zennit canonizers for ``model``: ResNet blocks and BatchNorm merging where they apply."""
    from torchvision.models.resnet import ResNet
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.torchvision import ResNetCanonizer

    return [ResNetCanonizer()] if isinstance(model, ResNet) else [SequentialMergeBatchNorm()]


def _one_hot(y, out):
    """The true class of every prediction as a one-hot tensor shaped like ``out``: (N, C) for labels,
    (N, C, H, W) for masks (pixels outside 0..C-1, an ignore index, start no relevance)."""
    import torch.nn.functional as F

    c = out.shape[1]
    valid = (y >= 0) & (y < c)
    hot = F.one_hot(y.clamp(0, c - 1), c) * valid.unsqueeze(-1)
    return (hot if hot.dim() == 2 else hot.movedim(-1, 1)).to(out)


def collect_relevance(model, batches: Sequence, device=None) -> None:
    """Accumulate LRP relevance (zennit, EpsilonPlusFlat, canonized) at every layer's input channels.

    Relevance starts from the true class's logit (of every pixel, for segmentation). Under zennit's rules
    the backward signal reaching a tensor *is* its relevance, so a tensor hook on each layer's input reads
    it directly.
    """
    import torch
    from zennit.attribution import Gradient
    from zennit.composites import EpsilonPlusFlat

    device = device or torch.device("cpu")

    def hook(module, x):
        if not x.requires_grad:
            return

        def grab(grad):
            g = grad.detach().float()
            rel = g.sum(dim=(0, *range(2, g.dim()))) if g.dim() > 2 else g.reshape(len(g), -1).sum(0)
            _add(stats(module), "relevance", rel.cpu())

        x.register_hook(grab)

    was_training = model.training
    model.eval().to(device)
    composite = EpsilonPlusFlat(canonizers=lrp_canonizers(model))
    try:
        # Our pre-hooks are registered before zennit's, so they see the tensor before its rule wrapper.
        with _input_hooks(model, hook), Gradient(model, composite) as attributor:
            for x, y in _batches(batches, "calibrate (relevance)"):
                y = y.to(device)
                attributor(x.to(device), lambda out, y=y: _one_hot(y, out))
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        model.cpu()


def recalibrate_batchnorm(model, batches: Sequence, device=None) -> None:
    """Re-estimate every BatchNorm's running statistics on ``batches`` (no gradients, weights unchanged).

    After pruning, a BatchNorm's running mean/variance were measured with inputs the removed channels
    still fed; re-estimating them is EagleEye's "adaptive BN" (Li et al., arXiv:2007.02491).
    """
    import torch
    import torch.nn as nn

    device = device or torch.device("cpu")
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over all batches
    was_training = model.training
    model.train().to(device)
    try:
        with torch.no_grad():
            for x, _ in _batches(batches, "recalibrate BatchNorm"):
                model(x.to(device))
    finally:
        for bn, m in zip(bns, momenta, strict=True):
            bn.momentum = m
        model.train(was_training)
        model.cpu()
