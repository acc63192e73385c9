"""``adapter``: bottleneck adapters after every transformer block, plus the task head.

AdapterHub's ``adapters`` package pins transformers 4.x, so it cannot be used
with our transformers 5; this is a small implementation instead
(``adapter_modeling.py``).  Everything but the adapters and the task head is
frozen.  The output is published as full weights with a ``trust_remote_code``
modeling file (``adapter_modeling.py`` itself, which imports only torch and
transformers), so plain ``transformers`` loads it without kubetune.
"""

from __future__ import annotations

from typing import Any

from kubetune_trainer.errors import InvalidModel
from kubetune_trainer.spec import AdapterConfig
from kubetune_trainer.strategies import adapter_modeling
from kubetune_trainer.strategies.base import Prepared, StrategyContext

HEAD_MARKERS = ("classifier", "score", "qa_outputs")


def apply(model: Any, settings: AdapterConfig, ctx: StrategyContext) -> Prepared:
    """Freeze the backbone, insert adapters, train adapters + the task head."""
    for param in model.parameters():
        param.requires_grad_(False)
    try:
        adapters = adapter_modeling.add_adapters(model, settings.reduction_factor, settings.non_linearity)
    except (ValueError, AttributeError) as exc:
        raise InvalidModel(f"strategy adapter: cannot add adapters to this model ({exc})") from exc
    for adapter in adapters:
        for param in adapter.parameters():
            param.requires_grad_(True)
    for name, param in model.named_parameters():
        # The task head, and anything else the checkpoint lacked (a fresh pooler): random weights must train.
        if name.split(".")[0] in HEAD_MARKERS or any(name.startswith(m + ".") for m in ctx.new_modules):
            param.requires_grad_(True)
    setattr(
        model.config,
        adapter_modeling.CONFIG_KEY,
        {"reduction_factor": settings.reduction_factor, "non_linearity": settings.non_linearity},
    )
    return Prepared(model=model, publish_as="remote-code")
