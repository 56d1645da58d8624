"""Depth pruning: remove whole residual blocks whose shortcut is the identity.

Such a block computes ``x + f(x)`` (then a ReLU for torchvision ResNets, whose input is already
non-negative), so replacing it with ``nn.Identity`` keeps every shape: the network just skips it, as
stochastic depth does at training time. The removal is recorded as the ``drop_blocks`` surgery.
"""

from __future__ import annotations

from collections.abc import Sequence


def is_removable(module) -> bool:
    """A residual block whose shortcut is the identity (same shape in and out)."""
    from torchvision.models.mobilenetv2 import InvertedResidual
    from torchvision.models.resnet import BasicBlock, Bottleneck

    if isinstance(module, (BasicBlock, Bottleneck)):
        return module.downsample is None
    if isinstance(module, InvertedResidual):
        return bool(module.use_res_connect)
    return False


def removable_blocks(model) -> list[str]:
    """Names of the blocks of ``model`` that :func:`drop_blocks` can remove, in forward order."""
    return [name for name, m in model.named_modules() if name and is_removable(m)]


def drop_blocks(model, names: Sequence[str]) -> None:
    """Replace the blocks ``names`` of ``model`` by ``nn.Identity`` (in place)."""
    import torch.nn as nn

    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, nn.Identity())


def calibration_loss(model, batches: Sequence, device=None) -> float:
    """Mean cross-entropy of ``model`` (eval mode) over ``batches``."""
    import torch
    import torch.nn.functional as F

    device = device or torch.device("cpu")
    was_training = model.training
    model.eval().to(device)
    total, n = 0.0, 0
    with torch.inference_mode():
        for x, y in batches:
            total += float(F.cross_entropy(model(x.to(device)), y.to(device), reduction="sum"))
            n += len(y)
    model.train(was_training)
    model.cpu()
    return total / max(n, 1)


def block_sensitivity(model, names: Sequence[str], batches: Sequence, device=None) -> dict[str, float]:
    """For each block, how much the calibration loss rises when that block alone is skipped."""
    import torch.nn as nn

    from deploycomp import console

    base = calibration_loss(model, batches, device)
    out = {}
    for name in console.progress(names, len(names), "block sensitivity"):
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        block = getattr(owner, child)
        setattr(owner, child, nn.Identity())
        try:
            out[name] = calibration_loss(model, batches, device) - base
        finally:
            setattr(owner, child, block)
    return out
