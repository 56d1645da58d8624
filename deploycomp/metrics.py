"""Model metrics: parameters, size, MACs (FLOPs = 2 x MACs), per-layer channels, torchinfo-style sizes."""

from __future__ import annotations

import io
from typing import Any


def count_params(model) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"params_total": total, "params_trainable": trainable, "params_non_trainable": total - trainable}


def count_macs(model, example_input) -> int:
    """Multiply-accumulates of one forward pass on ``example_input`` (torch-pruning's counter)."""
    import torch
    import torch_pruning as tp

    was_training = model.training
    model.eval()
    with torch.no_grad():
        macs, _ = tp.utils.count_ops_and_params(model, example_input)
    model.train(was_training)
    return int(macs)


def state_dict_size_mib(model) -> float:
    """Size of the serialised state dict (what a weights file costs on disk), in MiB."""
    import torch

    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell() / 2**20


def layer_channels(model) -> list[dict[str, Any]]:
    """Every convolution and linear layer with its input/output channels (and groups)."""
    import torch.nn as nn

    rows = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            rows.append({"layer": name, "type": "Conv2d", "in": m.in_channels, "out": m.out_channels,
                         "groups": m.groups, "kernel": list(m.kernel_size)})
        elif isinstance(m, nn.Linear):
            rows.append({"layer": name, "type": "Linear", "in": m.in_features, "out": m.out_features, "groups": 1,
                         "kernel": []})
    return rows


def memory_summary(model, input_shape: tuple[int, ...], batch: int = 1) -> dict[str, float]:
    """torchinfo's estimate: input size, forward/backward pass size, params size, total (MiB)."""
    from torchinfo import summary

    s = summary(model, input_size=(batch, *input_shape), verbose=0, device="cpu", mode="eval")
    mib = 2**20
    out = {"input_size_mib": s.total_input / mib, "forward_backward_pass_mib": s.total_output_bytes / mib,
           "params_size_mib": s.total_param_bytes / mib}
    out["estimated_total_mib"] = sum(out.values())
    return out


def model_metrics(model, input_shape: tuple[int, ...]) -> dict[str, Any]:
    """Everything ``info`` reports about a model, as one flat dict (units in the key names)."""
    import torch

    x = torch.zeros(1, *input_shape)
    macs = count_macs(model, x)
    return {**count_params(model), "macs": macs, "macs_g": macs / 1e9, "flops_g": 2 * macs / 1e9,
            "weights_size_mib": state_dict_size_mib(model), "input_shape": list(input_shape)}
