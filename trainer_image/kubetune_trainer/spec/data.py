"""``spec.dataset``: training and validation data, and how to read them."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, ClassVar

from pydantic import Field, Strict

from kubetune_trainer.spec._base import DataUri, FieldName, KubeModel, Rule


class DataFormat(StrEnum):
    """File format of a dataset (inferred from the extension when omitted)."""

    JSONL = "jsonl"
    CSV = "csv"
    PARQUET = "parquet"


class DatasetSpec(KubeModel):
    """Training and validation data, and how to read them."""

    api_path: ClassVar[str] = "spec.dataset"
    api_rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="!(has(self.validation) && has(self.validationSplit))",
            message="set either validation or validationSplit, not both",
            field="validationSplit",
            check=lambda d: d.validation is None or d.validation_split is None,
        ),
        Rule(
            cel="has(self.promptField) == has(self.responseField)",
            message="promptField and responseField go together",
            field="responseField",
            check=lambda d: (d.prompt_field is None) == (d.response_field is None),
        ),
    )

    train: DataUri = Field(
        description=(
            "Training data: s3://, file://, pvc:// or a relative path to a .jsonl, .csv or "
            ".parquet file, or hf://NAME[:SPLIT] for a Hugging Face dataset."
        ),
    )
    validation: DataUri | None = Field(default=None, description="Validation data, same forms as train.")
    validation_split: Annotated[float, Field(gt=0.0, le=0.5)] | None = Field(
        default=None,
        description="Fraction of the training data held out for validation when no validation file is given.",
    )
    format: Annotated[DataFormat, Strict(False)] | None = Field(
        default=None, description="File format; inferred from the file extension when omitted."
    )
    text_field: FieldName = Field(
        default="text",
        description="Field holding the input text (for token classification: the list of words).",
    )
    text_pair_field: FieldName | None = Field(
        default=None, description="Optional second text field for sentence-pair classification."
    )
    label_field: FieldName = Field(
        default="label",
        description="Field holding the label (for token classification: the list of tags per word).",
    )
    prompt_field: FieldName | None = Field(
        default=None,
        description="causal-lm only: field holding the prompt; the loss is computed on the response only.",
    )
    response_field: FieldName | None = Field(
        default=None, description="causal-lm only: field holding the response, used with promptField."
    )
    max_length: Annotated[int, Field(ge=8, le=32768)] = Field(
        default=128, description="Maximum number of tokens per example; longer inputs are truncated."
    )
    max_train_samples: Annotated[int, Field(ge=1)] | None = Field(
        default=None, description="Use only the first N training examples (for quick trials)."
    )
    max_eval_samples: Annotated[int, Field(ge=1)] | None = Field(
        default=None, description="Use only the first N validation examples."
    )
    packing: bool = Field(
        default=False,
        description=(
            "causal-lm only: pack several examples into each row of maxLength tokens (no padding); every "
            "example keeps its own positions, attends only to itself, and no loss crosses a join."
        ),
    )
