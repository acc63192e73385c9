"""``full``: every parameter is trained."""

from __future__ import annotations

from typing import Any

from kubetune_trainer.strategies.base import Prepared, StrategyContext


def apply(model: Any, settings: None, ctx: StrategyContext) -> Prepared:
    """Leave every parameter trainable."""
    for param in model.parameters():
        param.requires_grad_(True)
    return Prepared(model=model, publish_as="model")
