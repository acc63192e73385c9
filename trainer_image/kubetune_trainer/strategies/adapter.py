"""``adapter``: bottleneck adapters (placeholder until implemented)."""

from __future__ import annotations

from typing import Any

from kubetune_trainer.errors import InvalidSpec
from kubetune_trainer.strategies.base import Prepared, StrategyContext


def apply(model: Any, settings: Any, ctx: StrategyContext) -> Prepared:
    """Not implemented yet."""
    raise InvalidSpec("strategy.type adapter is not implemented in this trainer build")
