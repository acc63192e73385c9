"""``spec.dataset``: training and validation data, and how to read them."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, ClassVar

from pydantic import Field, Strict

from kubetune_trainer.spec._base import DataUri, FieldName, KubeModel, Rule

#: Chat templates known by name (``dataset.chatTemplate: chatml``); any other value is Jinja source.
CHAT_TEMPLATE_NAMES = ("chatml",)
#: Reasons an example is dropped after tokenization (the values of the dropped-examples metric's label).
DROP_REASONS = ("truncated", "no_trainable_tokens")
_SPLIT_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
_HF_PREFIX = "hf://datasets/"


def _is_hf(uri: str | None) -> bool:
    return uri is not None and uri.startswith(_HF_PREFIX)


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
        Rule(
            cel=f"!has(self.subset) || self.train.startsWith('{_HF_PREFIX}')",
            message="subset applies to a Hugging Face dataset (train: hf://datasets/...)",
            field="subset",
            check=lambda d: d.subset is None or _is_hf(d.train),
        ),
        Rule(
            cel=f"!has(self.split) || self.train.startsWith('{_HF_PREFIX}') || self.train.endsWith('/')",
            message=(
                "split applies to a Hugging Face dataset or a save_to_disk folder (train: hf://datasets/... or .../)"
            ),
            field="split",
            check=lambda d: d.split is None or _is_hf(d.train) or d.train.endswith("/"),
        ),
        Rule(
            cel=(
                "!has(self.validationSplitName) || (has(self.validation) && "
                f"(self.validation.startsWith('{_HF_PREFIX}') || self.validation.endsWith('/')))"
            ),
            message=(
                "validationSplitName applies to a Hugging Face dataset or a save_to_disk folder "
                "(validation: hf://datasets/... or .../)"
            ),
            field="validationSplitName",
            check=lambda d: (
                d.validation_split_name is None
                or _is_hf(d.validation)
                or bool(d.validation and d.validation.endswith("/"))
            ),
        ),
        Rule(
            cel=(
                "!has(self.chatTemplate) || self.chatTemplate.contains('{%') || self.chatTemplate.contains('{{') || "
                f"self.chatTemplate in {list(CHAT_TEMPLATE_NAMES)!r}"
            ),
            message=f"chatTemplate must be Jinja source or one of {', '.join(CHAT_TEMPLATE_NAMES)}",
            field="chatTemplate",
            check=lambda d: (
                d.chat_template is None
                or "{%" in d.chat_template
                or "{{" in d.chat_template
                or d.chat_template in CHAT_TEMPLATE_NAMES
            ),
        ),
    )

    train: DataUri = Field(
        description=(
            "Training data: a .jsonl, .csv or .parquet file on s3://, pvc://, file:// or a relative path; a "
            "folder of such files or a datasets save_to_disk folder (ending in '/'); a glob of files "
            "(s3://bucket/train/*.parquet; '*', '?', '**'), read in key order; or a Hugging Face dataset "
            "hf://datasets/[OWNER/]NAME[@REVISION] (with split and subset)."
        ),
    )
    validation: DataUri | None = Field(default=None, description="Validation data, same forms as train.")
    split: Annotated[str, Field(pattern=_SPLIT_NAME, max_length=128)] | None = Field(
        default=None,
        description="Split of a Hugging Face dataset or save_to_disk folder to train on; train when omitted.",
    )
    validation_split_name: Annotated[str, Field(pattern=_SPLIT_NAME, max_length=128)] | None = Field(
        default=None,
        description=("Split of the validation Hugging Face dataset or save_to_disk folder; validation when omitted."),
    )
    subset: Annotated[str, Field(pattern=_SPLIT_NAME, max_length=128)] | None = Field(
        default=None, description="Configuration (subset) of a Hugging Face dataset; its default when omitted."
    )
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
    messages_field: FieldName = Field(
        default="messages",
        description=(
            "causal-lm only: field holding a chat conversation, a list of {role, content} messages rendered "
            "with the tokenizer's chat template; the loss is on the assistant turns only.  Used when the "
            "training data has this field."
        ),
    )
    chat_template: Annotated[str, Field(min_length=1, max_length=65536)] | None = Field(
        default=None,
        description=(
            "Chat template for a tokenizer that has none (or to replace its own): Jinja source, rendered in "
            "the tokenizer library's sandbox, or a known name (chatml).  Mark assistant text with "
            "{% generation %}...{% endgeneration %} to set exactly which tokens are trained on."
        ),
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
    max_dropped_fraction: Annotated[float, Field(ge=0.0, le=1.0)] = Field(
        default=0.05,
        description=(
            "Fail the job when more than this fraction of the training (or validation) examples has no "
            "trainable token left after truncation to maxLength; such examples are dropped and counted."
        ),
    )
    packing: bool = Field(
        default=False,
        description=(
            "causal-lm only: pack several examples into each row of maxLength tokens (no padding); every "
            "example keeps its own positions, attends only to itself, and no loss crosses a join."
        ),
    )
