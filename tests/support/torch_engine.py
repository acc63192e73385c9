"""DeepSpeed's engine surface over a plain torch optimizer, for models DeepSpeed cannot hold.

The placement tests put a real transformers model on ``torch.device("meta")``
— the only device besides the CPU that a machine without a GPU has — to prove
that every tensor the trainer's step touches lives on the model's device.
DeepSpeed cannot wrap a meta model (it copies weights), so this class plays the
part of its engine with the same calls the trainer makes: ``engine(**inputs)``,
``backward``, ``step``, ``is_gradient_accumulation_boundary``, ``get_lr``,
``get_global_grad_norm``, ``module``, ``device``, ``train``/``eval``.
"""

from __future__ import annotations

from typing import Any

import torch


class TorchEngine:
    """One optimizer step every ``accumulation`` micro-batches, as DeepSpeed's engine steps."""

    def __init__(self, module: torch.nn.Module, *, lr: float = 0.1, accumulation: int = 1) -> None:
        self.module = module
        self.device = next(module.parameters()).device
        self.lr = lr
        self.accumulation = accumulation
        self.micro_steps = 0
        self.optimizer = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=lr)

    def __call__(self, **inputs: Any) -> Any:
        return self.module(**inputs)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accumulation).backward()

    def is_gradient_accumulation_boundary(self) -> bool:
        return (self.micro_steps + 1) % self.accumulation == 0

    def step(self) -> None:
        if self.is_gradient_accumulation_boundary():
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.micro_steps += 1

    def get_lr(self) -> list[float]:
        return [self.lr]

    def get_global_grad_norm(self) -> None:
        return None

    def train(self) -> None:
        self.module.train()

    def eval(self) -> None:
        self.module.eval()
