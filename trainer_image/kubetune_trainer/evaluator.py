"""Evaluation on the validation set across all ranks (DESIGN §4.7).

Each rank runs its shard on the device; the loss sum and count stay on the
device until the end, predictions come to the host once per batch, and the
per-rank results travel over the session's gloo side group (never as CPU
tensors on NCCL).  Metric math is in :mod:`kubetune_trainer.evaluation`.

Rank 0 also keeps a small *sample*: the inputs of the first evaluation batch
(as many rows as fit :data:`SAMPLE_ELEMENTS` logits; a prefix of one row when
not even one does)
and the trainer's logits for them, so a test can check that the published
model reproduces what the trainer computed.  It never holds a whole batch of
full-vocabulary logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kubetune_trainer import data as data_mod
from kubetune_trainer import evaluation
from kubetune_trainer.feeder import Batch, Batcher, eval_batches
from kubetune_trainer.losses import Objective
from kubetune_trainer.session import Session
from kubetune_trainer.spec import Task

SAMPLE_ELEMENTS = 4 * 1024 * 1024  # logits kept for the sample (16 MiB in fp32)


@dataclass
class Evaluator:
    """Evaluates the engine's model on the validation examples."""

    examples: Sequence[data_mod.Example]
    objective: Objective
    batcher: Batcher
    session: Session
    micro_batch_size: int
    labels: list[str] | None

    def run(self, engine: Any, *, keep_sample: bool = False) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Metrics over the whole validation set (every rank gets them); rank 0's sample when asked."""
        session, task = self.session, self.objective.task
        placement = session.placement
        loss_sum = placement.zeros(1)
        loss_count = placement.zeros(1)
        seq_preds: list[tuple[int, int, int]] = []  # (index, prediction, label)
        tok_preds: list[tuple[int, list[int], list[int]]] = []
        sample: dict[str, Any] | None = None
        engine.eval()
        with torch.no_grad():
            for number, (real, batch) in enumerate(
                eval_batches(
                    self.examples,
                    self.batcher,
                    placement,
                    micro_batch_size=self.micro_batch_size,
                    rank=session.rank,
                    world_size=session.world_size,
                )
            ):
                if number == 0 and keep_sample:
                    sample = self._sample(engine, batch)  # every rank runs it: ZeRO-3 needs all in each forward
                output, _ = self.objective.run_task(engine, batch, label_smoothing=0.0)
                if not real:
                    continue  # a padding batch: run for ZeRO-3, discard
                loss_sum += output.loss_sum
                loss_count += output.count
                if task in (Task.SEQUENCE_CLASSIFICATION, Task.TOKEN_CLASSIFICATION):
                    assert output.logits is not None
                    self._predictions(real, output.logits, output.labels, seq_preds, tok_preds)
        engine.train()
        totals = torch.cat([loss_sum, loss_count]).tolist()
        gathered = session.all_gather_object((seq_preds, tok_preds, totals[0], int(totals[1])))
        return self._metrics(gathered), sample if session.rank == 0 else None

    @staticmethod
    def _predictions(
        real: list[int],
        logits: torch.Tensor,
        labels: torch.Tensor,
        seq_preds: list[tuple[int, int, int]],
        tok_preds: list[tuple[int, list[int], list[int]]],
    ) -> None:
        predicted = logits.argmax(-1).cpu()  # one transfer per batch
        gold = labels.cpu()
        if predicted.dim() == 1:
            for i, p, y in zip(real, predicted.tolist(), gold.tolist(), strict=False):
                seq_preds.append((i, p, y))
            return
        for row, i in enumerate(real):
            keep = gold[row] != data_mod.IGNORE_INDEX
            tok_preds.append((i, predicted[row][keep].tolist(), gold[row][keep].tolist()))

    def _metrics(self, gathered: list[Any]) -> dict[str, Any]:
        task = self.objective.task
        all_seq = sorted({i: (p, y) for part in gathered for i, p, y in part[0]}.items())
        all_tok = sorted({i: (p, y) for part in gathered for i, p, y in part[1]}.items())
        total_loss = sum(part[2] for part in gathered)
        total_count = sum(part[3] for part in gathered)
        results: dict[str, Any] = {"loss": total_loss / max(total_count, 1)}
        if task == Task.SEQUENCE_CLASSIFICATION:
            assert self.labels is not None
            results |= evaluation.classification_metrics(
                [p for _, (p, _) in all_seq], [y for _, (_, y) in all_seq], len(self.labels)
            )
        elif task == Task.TOKEN_CLASSIFICATION:
            names = self.labels
            assert names is not None
            results |= evaluation.token_metrics(
                [[names[t] for t in p] for _, (p, _) in all_tok], [[names[t] for t in y] for _, (_, y) in all_tok]
            )
        else:
            results = evaluation.language_model_metrics(total_loss, total_count)
        results["samples"] = len(self.examples)
        return results

    def _sample(self, engine: Any, batch: Batch) -> dict[str, Any]:
        """The first rows of ``batch`` (as many as fit the budget) with the model's logits for them, on the host."""
        width = batch.inputs["input_ids"].shape[1]
        per_row = width * _output_width(engine, self.objective.task)
        rows = max(1, min(batch.labels.shape[0], SAMPLE_ELEMENTS // max(1, per_row)))
        inputs = {k: v[:rows] for k, v in batch.inputs.items() if not k.startswith("aux_")}
        labels = batch.labels[:rows]
        keep = max(1, min(width, SAMPLE_ELEMENTS // max(1, per_row // width)))
        if keep < width and labels.dim() == 2:  # one row of per-token logits is still too big: a prefix of it
            inputs = {k: v[:, :keep] for k, v in inputs.items()}
            labels = labels[:, :keep]
        logits = engine(**inputs, **self.objective.call_options).logits  # no targets set: the loss head gives logits
        return {k: v.cpu() for k, v in inputs.items()} | {
            "logits": logits.detach().float().cpu(),
            "kubetune_labels": labels.cpu(),  # what the logits are scored against (masked-LM: masked ids)
        }


def _output_width(engine: Any, task: Task) -> int:
    # Logits per position: the vocabulary for language models, the labels for classifiers.
    config = getattr(engine.module, "config", None)
    if task in (Task.CAUSAL_LM, Task.MASKED_LM):
        return max(1, int(getattr(config, "vocab_size", 1) or 1))
    return max(1, int(getattr(config, "num_labels", 1) or 1))
