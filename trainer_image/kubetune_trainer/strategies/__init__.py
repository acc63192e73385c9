"""Applying the strategy a spec names: the registry (:mod:`kubetune_trainer.spec.strategy`) says where its code is.

Each registry entry's ``implementation`` is ``"module:function"`` with
``apply(model, settings, ctx) -> Prepared``: it sets ``requires_grad`` (or wraps
the model) and says how the result is published.  Selected by name only; a spec
never carries an import path.
"""

from __future__ import annotations

import importlib
from typing import Any

from kubetune_trainer.spec import StrategySpec
from kubetune_trainer.strategies.base import Prepared, StrategyContext, count_parameters


def implementation(strategy: StrategySpec) -> Any:
    """The ``apply`` function of the strategy ``strategy.type`` names."""
    module, _, function = strategy.definition().implementation.partition(":")
    return getattr(importlib.import_module(module), function)


def apply_strategy(model: Any, strategy: StrategySpec, ctx: StrategyContext) -> Prepared:
    """Apply the strategy the spec names to ``model``."""
    prepared: Prepared = implementation(strategy)(model, strategy.settings(), ctx)
    return prepared


__all__ = ["Prepared", "StrategyContext", "apply_strategy", "count_parameters", "implementation"]
