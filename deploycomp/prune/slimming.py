"""Network slimming's sparsity training: an L1 penalty on BatchNorm scale factors (gamma).

Learning Efficient Convolutional Networks through Network Slimming (Liu et al., ICCV 2017,
arXiv:1708.06519): train with ``lambda * sum |gamma|`` added to the loss, then prune the channels
with the smallest |gamma|.
"""

from __future__ import annotations

from deploycomp.errors import check


def bn_sparsity_penalty(lam: float):
    """A ``fit()`` penalty ``model -> lam * sum(|gamma|)`` over every BatchNorm2d layer."""
    check(lam >= 0, f"--sparsity must be >= 0, got {lam}")

    def penalty(model):
        import torch.nn as nn

        gammas = [m.weight.abs().sum() for m in model.modules() if isinstance(m, nn.BatchNorm2d) and m.affine]
        return lam * sum(gammas) if gammas else 0.0

    return penalty
