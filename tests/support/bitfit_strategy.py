"""BitFit (Ben Zaken et al., 2022) as a platform plugin: train only the biases and the new task head.

Everything kubetune needs to know about it is this module: its settings model, one
:func:`register_strategy` call, and ``apply`` (which imports the trainer's code only
when the trainer calls it, so the operator and the CRD generator never import torch).
Loaded with ``KUBETUNE_PLUGINS=tests.support.bitfit_strategy``.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from kubetune_trainer.spec import KubeModel, StrategyDefinition, Task, register_strategy


class BitFitConfig(KubeModel):
    """Which parameters besides the biases train."""

    train_norms: bool = Field(default=False, description="Also train the normalization layers' weights.")


register_strategy(
    StrategyDefinition(
        "bitfit",
        "only the biases and the task head (BitFit)",
        f"{__name__}:apply",
        settings=BitFitConfig,
        tasks=(Task.SEQUENCE_CLASSIFICATION, Task.TOKEN_CLASSIFICATION),
        task_note="the pretrained LM head has no bias to adapt",
    )
)


def apply(model: Any, settings: BitFitConfig, ctx: Any) -> Any:
    """Freeze every weight but the biases, the task head and modules the checkpoint lacked."""
    from kubetune_trainer.strategies.base import Prepared

    head = ("classifier.", "score.")
    for name, param in model.named_parameters():
        trainable = (
            name.endswith(".bias")
            or name.startswith(head)
            or any(name.startswith(module + ".") for module in ctx.new_modules)
            or (settings.train_norms and "LayerNorm" in name)
        )
        param.requires_grad_(trainable)
    return Prepared(model=model, publish_as="model")
