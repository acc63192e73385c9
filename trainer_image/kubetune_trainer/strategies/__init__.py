"""The strategy registry: name → settings model + implementation (DESIGN §8).

Selected by name only; a spec never carries an import path.  Each entry's
``apply(model, settings, ctx) -> Prepared`` sets ``requires_grad`` (or wraps the
model) and says how the result is published.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kubetune_trainer import spec as spec_job
from kubetune_trainer.spec import STRATEGY_TASKS, StrategySpec, StrategyType, Task
from kubetune_trainer.strategies import adapter, full, partial, peft_methods
from kubetune_trainer.strategies.base import Prepared, StrategyContext, count_parameters


@dataclass(frozen=True)
class Strategy:
    """One registry entry."""

    name: StrategyType
    settings_model: type | None
    apply: Callable[[Any, Any, StrategyContext], Prepared]
    tasks: tuple[Task, ...]


REGISTRY: dict[StrategyType, Strategy] = {
    entry.name: entry
    for entry in (
        Strategy(StrategyType.FULL, None, full.apply, STRATEGY_TASKS[StrategyType.FULL]),
        Strategy(StrategyType.PARTIAL, spec_job.PartialConfig, partial.apply, STRATEGY_TASKS[StrategyType.PARTIAL]),
        Strategy(
            StrategyType.LORA,
            spec_job.LoraConfig,
            peft_methods.make(peft_methods.lora_config, "lora"),
            STRATEGY_TASKS[StrategyType.LORA],
        ),
        Strategy(
            StrategyType.ADALORA,
            spec_job.AdaLoraConfig,
            peft_methods.make(peft_methods.adalora_config, "adalora"),
            STRATEGY_TASKS[StrategyType.ADALORA],
        ),
        Strategy(
            StrategyType.IA3,
            spec_job.Ia3Config,
            peft_methods.make(peft_methods.ia3_config, "ia3"),
            STRATEGY_TASKS[StrategyType.IA3],
        ),
        Strategy(StrategyType.ADAPTER, spec_job.AdapterConfig, adapter.apply, STRATEGY_TASKS[StrategyType.ADAPTER]),
        Strategy(
            StrategyType.PREFIX,
            spec_job.PrefixConfig,
            peft_methods.make(peft_methods.prefix_config, "prefix"),
            STRATEGY_TASKS[StrategyType.PREFIX],
        ),
        Strategy(
            StrategyType.PROMPT,
            spec_job.PromptConfig,
            peft_methods.make(peft_methods.prompt_config, "prompt"),
            STRATEGY_TASKS[StrategyType.PROMPT],
        ),
    )
}


def apply_strategy(model: Any, strategy: StrategySpec, ctx: StrategyContext) -> Prepared:
    """Apply the strategy the spec names to ``model``."""
    entry = REGISTRY[strategy.type]
    return entry.apply(model, strategy.settings(), ctx)


__all__ = ["REGISTRY", "Prepared", "Strategy", "StrategyContext", "apply_strategy", "count_parameters"]
