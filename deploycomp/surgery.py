"""Structural edits that checkpoints record and replay (see :mod:`deploycomp.checkpoint`)."""

from __future__ import annotations

from typing import Any

from deploycomp.checkpoint import register_surgery


@register_surgery("prune_channels")
def replay_channel_pruning(model, record: dict[str, Any], example_input) -> None:
    """Re-apply torch-pruning's recorded history (``record["history"]``) to a fresh model."""
    from deploycomp.prune.adapters import after_pruning, dependency_graph

    dg = dependency_graph(model, example_input)
    dg.load_pruning_history(record["history"])
    after_pruning(model)


@register_surgery("freeze")
def replay_freeze(model, record: dict[str, Any], example_input) -> None:
    """Re-freeze the parameters under ``record["prefixes"]`` (``requires_grad`` is not in a state dict)."""
    from deploycomp.distill import freeze

    freeze(model, record["prefixes"])


@register_surgery("drop_blocks")
def replay_block_dropping(model, record: dict[str, Any], example_input) -> None:
    """Re-remove the residual blocks ``record["blocks"]`` (replaced by ``nn.Identity``) from a fresh model."""
    from deploycomp.prune.depth import drop_blocks

    drop_blocks(model, record["blocks"])
