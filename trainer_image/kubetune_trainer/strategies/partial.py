"""``partial``: freeze the backbone except its top N transformer layers and the task head."""

from __future__ import annotations

from typing import Any

from kubetune_trainer.errors import InvalidModel
from kubetune_trainer.spec import PartialConfig
from kubetune_trainer.strategies.base import Prepared, StrategyContext


def find_layer_stack(model: Any) -> tuple[str, Any]:
    """The backbone's stack of transformer blocks: the longest ``nn.ModuleList`` (name, module)."""
    from torch import nn

    best: tuple[str, Any] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and (best is None or len(module) > len(best[1])):
            best = (name, module)
    if best is None:
        raise InvalidModel("strategy partial: the model has no stack of transformer layers (nn.ModuleList)")
    return best


def _is_embedding(name: str, module_of: dict[str, Any]) -> bool:
    from torch import nn

    owner = name.rsplit(".", 1)[0]
    return "embed" in name.lower() or isinstance(module_of.get(owner), nn.Embedding)


def trainable_names(model: Any, settings: PartialConfig) -> set[str]:
    """Names of the parameters left trainable (pure given the model structure).

    Trainable: the top ``trainableLayers`` blocks of the layer stack, every
    parameter outside the stack that is not an embedding (the task head, the
    pooler, a final layer norm: everything above the blocks), and the
    embeddings when ``trainEmbeddings``.
    """
    stack_name, stack = find_layer_stack(model)
    if settings.trainable_layers > len(stack):
        raise InvalidModel(
            f"strategy.partial.trainableLayers is {settings.trainable_layers} but the model has {len(stack)} layers"
        )
    top = {f"{stack_name}.{i}." for i in range(len(stack) - settings.trainable_layers, len(stack))}
    module_of = dict(model.named_modules())
    names: set[str] = set()
    for name, _ in model.named_parameters():
        if name.startswith(stack_name + "."):
            if any(name.startswith(prefix) for prefix in top):
                names.add(name)
        elif _is_embedding(name, module_of):
            if settings.train_embeddings:
                names.add(name)
        else:
            names.add(name)
    return names


def apply(model: Any, settings: PartialConfig, ctx: StrategyContext) -> Prepared:
    """Freeze everything but :func:`trainable_names`."""
    keep = trainable_names(model, settings)
    for name, param in model.named_parameters():
        param.requires_grad_(name in keep)
    return Prepared(model=model, publish_as="model")
