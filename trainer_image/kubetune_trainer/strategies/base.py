"""What every strategy returns, and parameter counting."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class StrategyContext:
    """Facts a strategy may need besides its own settings."""

    task: Any  # kubetune_trainer.spec.Task
    backbone_path: str
    total_steps: int
    zero_stage: int
    # Modules the backbone checkpoint did not contain (initialized fresh, e.g. a BERT pooler
    # under a checkpoint saved without one, the task head): PEFT must train and save them, or a
    # published adapter would load onto different random weights.
    new_modules: tuple[str, ...] = ()


class StepHook(Protocol):
    """A strategy's own work around each optimizer step (AdaLoRA's rank budget)."""

    def before_step(self, engine: Any) -> None:
        """At the accumulation boundary, after backward and before ``engine.step()`` (gradients are there)."""

    def after_step(self, engine: Any, step: int) -> None:
        """After optimizer step ``step`` (1-based)."""


@dataclass
class Prepared:
    """The model after the strategy was applied.

    ``publish_as`` tells ``publish.py`` what to write: ``"model"`` (full
    safetensors weights) or ``"peft"`` (a PEFT adapter).  ``num_virtual_tokens``
    is how many positions prompt tuning prepends to causal-LM logits.
    ``extra_loss(model)`` is a term the strategy adds to the objective and
    ``step_hook`` its work around each optimizer step; the training step calls
    both without knowing which strategy they belong to.
    """

    model: Any
    publish_as: str
    num_virtual_tokens: int = 0
    prefix_positions_in_logits: int = 0
    notes: list[str] = field(default_factory=list)
    extra_loss: Callable[[Any], Any] | None = None
    step_hook: StepHook | None = None


def numel(param: Any) -> int:
    """Element count of a parameter, also when ZeRO-3 has partitioned it away (``ds_numel``)."""
    return int(getattr(param, "ds_numel", 0) or param.numel())


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights are counted once."""
    trainable = total = 0
    seen: set[int] = set()
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        n = numel(param)
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total
