"""``spec.model``: the pretrained backbone and the task it is fine-tuned for."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, ClassVar

from pydantic import Field, Strict

from kubetune_trainer.spec._base import KubeModel, Rule, Uri


class Task(StrEnum):
    """What the fine-tuned model predicts."""

    SEQUENCE_CLASSIFICATION = "sequence-classification"
    TOKEN_CLASSIFICATION = "token-classification"  # noqa: S105 (a task name, not a token)
    CAUSAL_LM = "causal-lm"
    MASKED_LM = "masked-lm"


CLASSIFICATION_TASKS = (Task.SEQUENCE_CLASSIFICATION, Task.TOKEN_CLASSIFICATION)
LANGUAGE_MODEL_TASKS = (Task.CAUSAL_LM, Task.MASKED_LM)

Label = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[^\s;|&$`'\"<>\\]+$")]


class ModelSpec(KubeModel):
    """The pretrained backbone and the task it is fine-tuned for."""

    api_path: ClassVar[str] = "spec.model"
    api_rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="self.task != 'sequence-classification' || has(self.labels) || has(self.numLabels)",
            message="sequence-classification needs labels or numLabels",
            field="labels",
            check=lambda m: m.task != Task.SEQUENCE_CLASSIFICATION or m.labels is not None or m.num_labels is not None,
        ),
        Rule(
            cel="self.task != 'token-classification' || has(self.labels)",
            message="token-classification needs labels (the tag names, e.g. [O, B-PER, I-PER])",
            field="labels",
            check=lambda m: m.task != Task.TOKEN_CLASSIFICATION or m.labels is not None,
        ),
        Rule(
            cel="!(self.task in ['causal-lm', 'masked-lm']) || (!has(self.labels) && !has(self.numLabels))",
            message="language-model tasks take no labels or numLabels",
            field="labels",
            check=lambda m: m.task not in LANGUAGE_MODEL_TASKS or (m.labels is None and m.num_labels is None),
        ),
        Rule(
            cel="!has(self.labels) || !has(self.numLabels) || size(self.labels) == self.numLabels",
            message="numLabels must equal the number of labels when both are set",
            field="numLabels",
            check=lambda m: m.labels is None or m.num_labels is None or len(m.labels) == m.num_labels,
        ),
        Rule(
            cel=None,  # x-kubernetes-list-type: set makes the API server enforce it
            message="labels must be unique",
            field="labels",
            check=lambda m: m.labels is None or len(set(m.labels)) == len(m.labels),
        ),
    )

    source: Uri = Field(
        description=(
            "Where the pretrained backbone comes from: hf://ORG/NAME (Hugging Face hub), "
            "s3://BUCKET/PREFIX, pvc://CLAIM/PATH or file:///PATH, in Hugging Face format."
        ),
    )
    task: Annotated[Task, Strict(False)] = Field(description="The task head to train on top of the backbone.")
    labels: Annotated[list[Label], Field(min_length=2, max_length=1024)] | None = Field(
        default=None,
        description="Class names (sequence classification) or tag names (token classification), in id order.",
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
    num_labels: Annotated[int, Field(ge=2, le=100000)] | None = Field(
        default=None,
        description="Number of classes when the dataset's labels are integer ids 0..numLabels-1.",
    )
    revision: Annotated[str, Field(pattern=r"^[A-Za-z0-9._/-]+$", max_length=128)] | None = Field(
        default=None, description="Branch, tag or commit of an hf:// backbone."
    )
