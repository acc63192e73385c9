"""Bottleneck adapters (Houlsby/Pfeiffer style) for any transformers backbone — self-contained.

This file imports only torch and transformers: ``publish.py`` copies it next
to the published weights, and ``config.json``'s ``auto_map`` points the Auto
classes at it, so the output loads with plain transformers
(``AutoModelFor...from_pretrained(dir, trust_remote_code=True)``) and no kubetune.

An adapter ``h + up(act(down(h)))`` (``up`` starts at zero, so a fresh adapter
is the identity) is added after every block of the backbone's layer stack
(the longest ``nn.ModuleList``) as a submodule ``<block>.kubetune_adapter``,
applied by a forward hook on the block.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

ADAPTER_ATTRIBUTE = "kubetune_adapter"
CONFIG_KEY = "kubetune_adapter"  # {"reduction_factor": int, "non_linearity": str} in config.json
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "swish": nn.SiLU, "tanh": nn.Tanh}


class BottleneckAdapter(nn.Module):
    """``h + up(act(down(h)))`` with ``down: hidden → hidden / reduction_factor``."""

    def __init__(self, hidden: int, reduction_factor: int, non_linearity: str) -> None:
        super().__init__()
        bottleneck = max(1, hidden // reduction_factor)
        self.down = nn.Linear(hidden, bottleneck)
        self.act = ACTIVATIONS[non_linearity]()
        self.up = nn.Linear(bottleneck, hidden)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = hidden + self.up(self.act(self.down(hidden)))
        return out


def layer_stack(model: nn.Module) -> nn.ModuleList:
    """The backbone's blocks: the longest ``nn.ModuleList`` in the model."""
    best: nn.ModuleList | None = None
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and (best is None or len(module) > len(best)):
            best = module
    if best is None:
        raise ValueError("the model has no stack of transformer layers (nn.ModuleList)")
    return best


def _hook(block: nn.Module, args: Any, output: Any) -> Any:
    adapter = getattr(block, ADAPTER_ATTRIBUTE)
    if isinstance(output, tuple):
        return (adapter(output[0]), *output[1:])
    if isinstance(output, torch.Tensor):
        return adapter(output)
    output[0] = adapter(output[0])  # ModelOutput-like
    return output


def add_adapters(model: nn.Module, reduction_factor: int, non_linearity: str) -> list[nn.Module]:
    """Insert an adapter after every block; returns the adapters (their parameters are the new ones)."""
    hidden = int(getattr(model.config, "hidden_size", 0) or model.config.n_embd)  # type: ignore[union-attr, arg-type]
    adapters: list[nn.Module] = []
    for block in layer_stack(model):
        adapter = BottleneckAdapter(hidden, reduction_factor, non_linearity)
        block.add_module(ADAPTER_ATTRIBUTE, adapter)
        block.register_forward_hook(_hook)
        adapters.append(adapter)
    return adapters


def with_adapters(base: type) -> type:
    """A subclass of the transformers class ``base`` whose instances carry adapters from their config."""

    class WithBottleneckAdapters(base):  # type: ignore[misc]
        def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
            super().__init__(config, *args, **kwargs)
            settings = getattr(config, CONFIG_KEY)
            add_adapters(self, int(settings["reduction_factor"]), str(settings["non_linearity"]))

    WithBottleneckAdapters.__name__ = f"{base.__name__}WithBottleneckAdapters"
    WithBottleneckAdapters.__qualname__ = WithBottleneckAdapters.__name__
    return WithBottleneckAdapters
