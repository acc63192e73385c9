"""The objective of one micro-batch for the configured task: run the model, return the loss terms.

``L = L_task + λ_aux·L_aux + λ_l2sp·L2-SP (+ a strategy's own term)``; the math
is in :mod:`kubetune_trainer.objective` (pure functions of tensors).  Every
tensor here is already on the rank's device: batches come from the feeder,
L2-SP anchors were moved once by the :class:`~kubetune_trainer.device.Placement`.
No value leaves the device, so a micro-step never waits for the host.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import torch
from torch import Tensor

from kubetune_trainer.feeder import Batch
from kubetune_trainer.lm_loss import IGNORE_INDEX, LossHead, loss_targets
from kubetune_trainer.objective import (
    LossBreakdown,
    combine_losses,
    l2sp_penalty,
    shift_for_causal_lm,
    task_loss,
)
from kubetune_trainer.spec import FineTuneJobSpec, Task


@dataclasses.dataclass
class TaskOutput:
    """What one forward gives the loss and the evaluation."""

    mean: Tensor  # mean task cross-entropy over the targets (0 when there are none)
    loss_sum: Tensor  # Σ over the targets (float32)
    count: Tensor  # number of targets
    logits: Tensor | None  # aligned task logits; None when the fused LM loss never built them
    labels: Tensor  # aligned task labels


class Objective:
    """Computes the loss components of one micro-batch for the configured task."""

    def __init__(
        self,
        spec: FineTuneJobSpec,
        *,
        prefix_positions: int,
        anchors: dict[str, Tensor] | None,
        loss_head: LossHead | None,
        extra_loss: Any = None,
    ) -> None:
        self.task = spec.model.task
        self.label_smoothing = spec.objective.label_smoothing
        self.aux = (
            spec.objective.auxiliary if spec.objective.auxiliary and spec.objective.auxiliary.weight > 0 else None
        )
        self.l2sp_weight = spec.objective.regularization.l2sp
        self.prefix_positions = prefix_positions  # prompt tuning's virtual tokens ahead of causal-LM logits
        self.anchors = anchors
        self.loss_head = loss_head
        self.extra_loss = extra_loss  # a strategy's own term (AdaLoRA's orthogonality regularizer)
        # A causal LM called with its default use_cache=True builds a KV cache it never needs in
        # training, and with a cache transformers ignores packed rows' position_ids: documents
        # would attend to each other.
        self.call_options: dict[str, Any] = {"use_cache": False} if self.task == Task.CAUSAL_LM else {}

    # ------------------------------------------------------------------ alignment

    def aligned(self, logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Task logits and labels position by position (causal-LM shift, prompt tuning's virtual tokens)."""
        if self.task == Task.CAUSAL_LM:
            return shift_for_causal_lm(logits[:, self.prefix_positions :, :], labels)
        return logits, labels

    def head_targets(self, labels: Tensor) -> Tensor:
        """Targets for every position the LM head sees (what :class:`LossHead` scores)."""
        if self.task != Task.CAUSAL_LM:
            return labels
        rows = labels.shape[0]
        ignored = labels.new_full((rows, 1), IGNORE_INDEX)
        parts = [labels.new_full((rows, self.prefix_positions), IGNORE_INDEX)] if self.prefix_positions else []
        return torch.cat([*parts, labels[:, 1:], ignored], dim=1)

    # ------------------------------------------------------------------ forward

    def run_task(self, engine: Any, batch: Batch, *, label_smoothing: float) -> tuple[TaskOutput, Any]:
        """One forward of ``batch``; returns the task's loss sum and count (and logits when built)."""
        fused = self.loss_head is not None
        if fused:
            assert self.loss_head is not None
            self.loss_head.label_smoothing = label_smoothing
            scope: Any = loss_targets(self.loss_head, self.head_targets(batch.labels))
        else:
            scope = contextlib.nullcontext()
        with scope:
            outputs = engine(**batch.inputs, **self.call_options)
        if fused:
            loss_sum, count = outputs.logits[0], outputs.logits[1]
            return TaskOutput(loss_sum / count.clamp(min=1), loss_sum, count, None, batch.labels), outputs
        logits, labels = self.aligned(outputs.logits, batch.labels)
        loss = task_loss(logits, labels, label_smoothing=label_smoothing)
        count = (labels != IGNORE_INDEX).sum().to(torch.float32)
        # task_loss is the mean over targets: × count gives the sum (0 when there are none).
        return TaskOutput(loss, loss * count, count, logits, labels), outputs

    def losses(self, engine: Any, batch: Batch) -> LossBreakdown:
        """The :class:`LossBreakdown` of one training micro-batch (a forward pass included)."""
        output, outputs = self.run_task(engine, batch, label_smoothing=self.label_smoothing)
        task = output.mean
        auxiliary = None
        aux_logits = getattr(outputs, "aux_logits", None)
        if self.aux is not None and aux_logits is not None:
            aux_labels = batch.aux_labels
            if self.aux.type == "lm":
                aux_logits, aux_labels = shift_for_causal_lm(aux_logits, aux_labels)
            auxiliary = task_loss(aux_logits, aux_labels, label_smoothing=0.0)
        model = engine.module
        l2sp = l2sp_penalty(model.named_parameters(), self.anchors) if self.anchors is not None else None
        breakdown = combine_losses(
            task,
            auxiliary=auxiliary,
            aux_weight=self.aux.weight if (self.aux is not None and auxiliary is not None) else 0.0,
            l2sp=l2sp,
            l2sp_weight=self.l2sp_weight,
        )
        if self.extra_loss is not None:
            breakdown = dataclasses.replace(breakdown, total=breakdown.total + self.extra_loss(model))
        return breakdown
