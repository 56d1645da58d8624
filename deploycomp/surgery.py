"""Structural edits that checkpoints record and replay (see :mod:`deploycomp.checkpoint`)."""

from __future__ import annotations

from typing import Any

from deploycomp.checkpoint import register_surgery


@register_surgery("prune_channels")
def replay_channel_pruning(model, record: dict[str, Any], example_input) -> None:
    """Re-apply torch-pruning's recorded history (``record["history"]``) to a fresh model."""
    from deploycomp.errors import CheckpointError, DeploycompError, ResourceError, environment_error, first_line
    from deploycomp.prune.adapters import after_pruning, dependency_graph

    try:
        dg = dependency_graph(model, example_input)
        dg.load_pruning_history(record["history"])
        after_pruning(model)
    except DeploycompError:
        raise
    except Exception as e:  # noqa: BLE001 - torch-pruning raises whatever its graph code trips on
        if isinstance(environment_error(e), ResourceError):
            raise
        raise CheckpointError(f"the channel pruning recorded in the checkpoint cannot be replayed on "
                              f"{type(model).__name__} ({first_line(e, 160)}); it was pruned by another version of "
                              "deploycomp or of the model's code: prune the model again") from e


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
