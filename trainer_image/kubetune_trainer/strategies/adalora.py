"""AdaLoRA's two additions to training: the orthogonality regularizer and the rank-budget update.

PEFT adds both only when the model computes its own loss and a Hugging Face
Trainer steps it; kubetune computes the loss itself and DeepSpeed owns the
gradients and the fp32 master weights, so they are done here and handed to
the training step through :class:`~kubetune_trainer.strategies.base.Prepared`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


def orthogonality(model: Any) -> Tensor:
    """AdaLoRA's regularizer: mean ‖PPᵀ − I‖_F over the A and B matrices (peft/tuners/adalora/model.py)."""
    total: Tensor | None = None
    count = 0
    device: torch.device | None = None
    for name, p in model.named_parameters():
        device = device or p.device
        if ("lora_A" in name or "lora_B" in name) and p.requires_grad and p.numel() > 0:
            cov = p @ p.T if "lora_A" in name else p.T @ p
            eye = torch.eye(*cov.size(), out=torch.empty_like(cov))
            term = torch.norm(cov - eye, p="fro")
            total = term if total is None else total + term
            count += 1
    if total is None:
        return torch.zeros((), device=device)
    return total / count


def freeze_rank_counts(model: Any) -> list[str]:
    """Keep AdaLoRA's ``ranknum`` (the rank each layer's scaling divides by) out of training.

    PEFT creates it frozen, but on a half-precision backbone it moves the adapter to the base
    layer's dtype by re-creating parameters, and ``ranknum`` comes back with ``requires_grad``:
    the optimizer would train the scaling's denominator.  Returns the names frozen.
    """
    frozen = []
    for name, param in model.named_parameters():
        if ".ranknum." in name and param.requires_grad:
            param.requires_grad_(False)
            frozen.append(name)
    return frozen


def weighted_orthogonality(weight: float) -> Any:
    """The extra loss term ``weight · orthogonality(model)``."""

    def term(model: Any) -> Tensor:
        return weight * orthogonality(model)

    return term


def rank_pattern_from_masks(model: Any, adapter: str) -> dict[str, list[bool]]:
    """The rank pattern PEFT fixed at ``total_step - tfinal``, read back from the ``lora_E`` entries it zeroed.

    PEFT keeps the pattern in the adapter config only, never in the weights a checkpoint holds; in the
    final phase it masks the pruned entries after every step, so a zero entry is a pruned rank.  The fp32
    master copy is read where DeepSpeed keeps one.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    pattern: dict[str, list[bool]] = {}
    for name, param in model.named_parameters():
        if f"lora_E.{adapter}" in name:
            master = safe_get_full_fp32_param(param)
            values = master if master is not None else param.data
            pattern[name] = (values != 0).view(-1).tolist()
    return pattern


def _task_model(engine: Any) -> Any:
    # With an auxiliary loss the engine holds TaskWithAuxiliary; the PeftModel is its task model.
    return getattr(engine.module, "task_model", engine.module)


@dataclass
class BudgetUpdate:
    """AdaLoRA's rank-budget update after every optimizer step, on DeepSpeed-owned gradients and weights.

    PEFT's ``update_and_allocate`` reads ``p.grad`` and masks ``lora_E`` in
    place.  DeepSpeed has cleared the grads by then (ZeRO keeps them in its own
    partitions) and would overwrite the in-place mask from its fp32 master
    copy at the next step, so the full gradients are taken before the step,
    put back for the call, and the masked values are pushed into the
    optimizer's copy afterwards.  The gradients stay on the device.
    """

    _grads: dict[str, Tensor] = field(default_factory=dict)
    _masks: dict[str, list[bool]] | None = None  # the lora_E entries not zeroed, before the first step
    _started: bool = False

    def before_step(self, engine: Any) -> None:
        """Keep the full gradients of the AdaLoRA parameters (DeepSpeed holds them in its partitions)."""
        from deepspeed.utils import safe_get_full_grad

        tuner = _task_model(engine).base_model
        if not self._started and tuner.peft_config[tuner.trainable_adapter_name].rank_pattern is None:
            # This process's first step, before the optimizer moves the pruned entries: what a resumed
            # run's pattern is read from (later steps have PEFT's own).
            self._masks = rank_pattern_from_masks(tuner.model, tuner.trainable_adapter_name)
        self._started = True
        self._grads = {}
        for name, param in _task_model(engine).named_parameters():
            if "lora_" in name and param.requires_grad:
                grad = safe_get_full_grad(param)
                if grad is not None:
                    self._grads[name] = grad.detach().clone()

    def after_step(self, engine: Any, step: int) -> None:
        """Prune ranks for ``step`` and write the masked values back into DeepSpeed's master weights."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

        model = _task_model(engine)
        named = dict(model.named_parameters())
        for name, grad in self._grads.items():
            # DeepSpeed's full gradients are fp32 (its partitions); PEFT multiplies them with the
            # parameters, which are bf16/fp16 in a half-precision run.
            named[name].grad = grad.to(named[name].dtype)
        tuner = model.base_model
        config = tuner.peft_config[tuner.trainable_adapter_name]
        if config.rank_pattern is None and step > config.total_step - config.tfinal and self._masks is not None:
            # A resumed run: the budget was fixed before its checkpoint, and PEFT would mask with no pattern.
            config.rank_pattern = self._masks
        self._masks = None
        tuner.update_and_allocate(step)
        for name in self._grads:
            named[name].grad = None
        self._grads = {}
        with torch.no_grad():
            for name, param in named.items():
                if "lora_E" in name and param.requires_grad:
                    # Mask the fp32 master copy where PEFT zeroed the working copy; writing the working
                    # copy back would round every kept value to bf16/fp16.
                    master = safe_get_full_fp32_param(param)
                    if master is None:
                        continue  # no separate master copy (ZeRO-0 in fp32): PEFT masked the weight itself
                    masked = torch.where(param.data == 0, torch.zeros_like(master), master)
                    safe_set_full_fp32_param(param, masked)
