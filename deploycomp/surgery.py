"""Structural edits that checkpoints record and replay (see :mod:`deploycomp.checkpoint`)."""

from __future__ import annotations

from typing import Any

from deploycomp.checkpoint import register_surgery


@register_surgery("prune_channels")
def replay_channel_pruning(model, record: dict[str, Any], example_input) -> None:
    """Re-apply torch-pruning's recorded history (``record["history"]``) to a fresh model."""
    import torch_pruning as tp

    dg = tp.DependencyGraph().build_dependency(model, example_inputs=example_input)
    dg.load_pruning_history(record["history"])
