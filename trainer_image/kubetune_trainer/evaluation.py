"""Evaluation metrics and early stopping (DESIGN §4.7).

Metric math is delegated to scikit-learn (classification) and seqeval
(entity-level F1); language models report loss and perplexity.  Everything
here is a pure function of predictions and labels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

HIGHER_IS_BETTER = {"accuracy": True, "f1": True, "precision": True, "recall": True, "loss": False, "perplexity": False}


def classification_metrics(predictions: Sequence[int], labels: Sequence[int], num_labels: int) -> dict[str, float]:
    """Accuracy, precision, recall and F1: binary (positive = id 1) for 2 classes, macro otherwise."""
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    average = "binary" if num_labels == 2 else "macro"
    precision, recall, f1, _ = precision_recall_fscore_support(
        list(labels),
        list(predictions),
        average=average,
        labels=list(range(num_labels)) if average == "macro" else None,
        zero_division=0,
    )
    return {
        "accuracy": float(accuracy_score(list(labels), list(predictions))),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
    }


def token_metrics(predictions: Sequence[Sequence[str]], labels: Sequence[Sequence[str]]) -> dict[str, float]:
    """Entity-level precision, recall and F1 (seqeval, CoNLL rules) plus token accuracy."""
    from seqeval.metrics import accuracy_score, f1_score, precision_score, recall_score

    preds, golds = [list(p) for p in predictions], [list(g) for g in labels]
    return {
        "accuracy": float(accuracy_score(golds, preds)),
        "precision": float(precision_score(golds, preds, zero_division=0)),
        "recall": float(recall_score(golds, preds, zero_division=0)),
        "f1": float(f1_score(golds, preds, zero_division=0)),
    }


def language_model_metrics(loss_sum: float, tokens: int) -> dict[str, float]:
    """Mean token loss and perplexity = exp(loss)."""
    loss = loss_sum / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def default_metric(is_language_model: bool) -> str:
    """The selection metric when the spec names none: f1 for classifiers, loss for LMs."""
    return "loss" if is_language_model else "f1"


@dataclass
class EarlyStopping:
    """Counts evaluations without improvement of ``metric``; state is saved in checkpoints."""

    metric: str
    patience: int | None
    best: float | None = None
    bad_evaluations: int = 0

    def update(self, results: dict[str, Any]) -> bool:
        """Record an evaluation; returns True when it is the best so far."""
        value = float(results[self.metric])
        higher = HIGHER_IS_BETTER[self.metric]
        improved = self.best is None or (value > self.best if higher else value < self.best)
        if improved:
            self.best = value
            self.bad_evaluations = 0
        else:
            self.bad_evaluations += 1
        return improved

    @property
    def should_stop(self) -> bool:
        """True once ``patience`` evaluations in a row did not improve."""
        return self.patience is not None and self.bad_evaluations >= self.patience

    def state(self) -> dict[str, Any]:
        """What a checkpoint stores."""
        return {"best": self.best, "bad_evaluations": self.bad_evaluations}

    def load(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state`."""
        self.best = state.get("best")
        self.bad_evaluations = int(state.get("bad_evaluations", 0))
