"""What torch-pruning needs to know about an architecture beyond its graph, registered per module class.

An adapter adds pruner arguments (attention heads, whose channels must go in whole groups) and fixes the
attributes a forward pass reads that pruning does not update (torchvision's ViT reshapes with
``hidden_dim``). ``after`` runs after pruning and again after a checkpoint's history is replayed, so a
pruned model reloads the same. Keyed by ``"module.Class"``, so registering imports nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from deploycomp.registry import Registry


@dataclass(frozen=True)
class Adapter:
    pruner_kwargs: Callable[[Any], dict[str, dict]] = lambda module: {}  # merged into torch-pruning's kwargs
    after: Callable[[Any], None] = lambda module: None  # fix the module's attributes after (re)pruning
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
