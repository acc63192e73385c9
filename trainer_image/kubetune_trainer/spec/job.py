"""The ``FineTuneJob`` spec: what a user asks kubetune to do (DESIGN §2).

The models here are the single source of truth for the CRD schema (with its
descriptions and CEL rules), for ``kubetune validate``, for the operator and for
the trainer's configuration.  Pure pydantic: importing this module never imports
torch.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, Strict

from kubetune_trainer.spec._base import (
    DNS1123_LABEL_PATTERN,
    DNS1123_SUBDOMAIN_PATTERN,
    ENDPOINT_PATTERN,
    IMAGE_PATTERN,
    LABEL_KEY_PATTERN,
    LABEL_VALUE_PATTERN,
    RESOURCE_NAME_PATTERN,
    DataUri,
    FieldName,
    KubeModel,
    ModuleName,
    Quantity,
    Rule,
    StorageUri,
    Uri,
)


class Task(StrEnum):
    """What the fine-tuned model predicts."""

    SEQUENCE_CLASSIFICATION = "sequence-classification"
    TOKEN_CLASSIFICATION = "token-classification"  # noqa: S105 (a task name, not a token)
    CAUSAL_LM = "causal-lm"
    MASKED_LM = "masked-lm"


CLASSIFICATION_TASKS = (Task.SEQUENCE_CLASSIFICATION, Task.TOKEN_CLASSIFICATION)
LANGUAGE_MODEL_TASKS = (Task.CAUSAL_LM, Task.MASKED_LM)


class StrategyType(StrEnum):
    """How much of the backbone is trained, and how."""

    FULL = "full"
    PARTIAL = "partial"
    LORA = "lora"
    ADALORA = "adalora"
    IA3 = "ia3"
    ADAPTER = "adapter"
    PREFIX = "prefix"
    PROMPT = "prompt"


# Which tasks each strategy supports.  Prompt tuning prepends virtual tokens to
# the input, which shifts token positions, so it cannot label tokens; neither
# prompt nor prefix tuning has a masked-LM head in PEFT.
STRATEGY_TASKS: dict[StrategyType, tuple[Task, ...]] = {
    StrategyType.FULL: tuple(Task),
    StrategyType.PARTIAL: tuple(Task),
    StrategyType.LORA: tuple(Task),
    StrategyType.ADALORA: tuple(Task),
    StrategyType.IA3: tuple(Task),
    StrategyType.ADAPTER: tuple(Task),
    # PEFT's prefix tuning feeds past_key_values, which no transformers 5 classification forward accepts.
    StrategyType.PREFIX: (Task.CAUSAL_LM,),
    StrategyType.PROMPT: (Task.SEQUENCE_CLASSIFICATION, Task.CAUSAL_LM),
}
PEFT_MERGEABLE = (StrategyType.LORA, StrategyType.ADALORA, StrategyType.IA3)

Label = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[^\s;|&$`'\"<>\\]+$")]
TargetModules = Annotated[list[ModuleName], Field(min_length=1, max_length=64)]


def _cel_list(values: tuple[str, ...]) -> str:
    return "[" + ", ".join(f"'{v}'" for v in values) + "]"


# --------------------------------------------------------------------------- model


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


# --------------------------------------------------------------------------- dataset


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


# --------------------------------------------------------------------------- strategy


class PartialConfig(KubeModel):
    """Train only the top layers of the backbone and the task head."""

    trainable_layers: Annotated[int, Field(ge=1, le=1000)] = Field(
        default=2, description="Number of top transformer layers left trainable."
    )
    train_embeddings: bool = Field(default=False, description="Also train the input embeddings.")


class LoraConfig(KubeModel):
    """Low-rank adaptation (PEFT LoRA)."""

    r: Annotated[int, Field(ge=1, le=1024)] = Field(default=8, description="Rank of the update matrices.")
    alpha: Annotated[float, Field(gt=0, le=4096)] = Field(default=16, description="Scaling numerator (alpha/r).")
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = Field(default=0.05, description="Dropout on the LoRA input.")
    target_modules: TargetModules | None = Field(
        default=None,
        description="Module names to adapt, e.g. [query, value]; PEFT's default for the architecture when omitted.",
    )
    bias: Literal["none", "all", "lora_only"] = Field(default="none", description="Which biases to train.")


class AdaLoraConfig(KubeModel):
    """Adaptive-budget LoRA (PEFT AdaLoRA): ranks are pruned during training."""

    init_r: Annotated[int, Field(ge=1, le=1024)] = Field(default=12, description="Initial rank of every module.")
    target_r: Annotated[int, Field(ge=1, le=1024)] = Field(default=8, description="Average target rank.")
    alpha: Annotated[float, Field(gt=0, le=4096)] = Field(default=32, description="Scaling numerator.")
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = Field(default=0.05, description="Dropout on the input.")
    target_modules: TargetModules | None = Field(
        default=None, description="Module names to adapt; PEFT's default for the architecture when omitted."
    )
    tinit_ratio: Annotated[float, Field(ge=0.0, lt=1.0)] = Field(
        default=0.1, description="Fraction of steps of warm-up before ranks are pruned."
    )
    tfinal_ratio: Annotated[float, Field(ge=0.0, lt=1.0)] = Field(
        default=0.2, description="Fraction of final steps with the budget fixed."
    )
    delta_t: Annotated[int, Field(ge=1)] = Field(default=10, description="Steps between budget updates.")
    orth_reg_weight: Annotated[float, Field(ge=0.0)] = Field(
        default=0.5, description="Weight of AdaLoRA's orthogonality regularizer."
    )


class Ia3Config(KubeModel):
    """IA3: learned rescaling vectors on keys, values and feed-forward activations."""

    target_modules: TargetModules | None = Field(
        default=None, description="Modules to rescale; PEFT's default for the architecture when omitted."
    )
    feedforward_modules: TargetModules | None = Field(
        default=None, description="Which of targetModules are feed-forward layers (scaled on their input)."
    )


class AdapterConfig(KubeModel):
    """Bottleneck adapters (Houlsby/Pfeiffer style) after each transformer layer's output."""

    reduction_factor: Annotated[int, Field(ge=1, le=1024)] = Field(
        default=16, description="Hidden size divided by the adapter's bottleneck size."
    )
    non_linearity: Literal["relu", "gelu", "swish", "tanh"] = Field(
        default="relu", description="Activation inside the bottleneck."
    )


class PrefixConfig(KubeModel):
    """Prefix tuning (PEFT): trainable key/value prefixes in every attention layer."""

    num_virtual_tokens: Annotated[int, Field(ge=1, le=512)] = Field(
        default=20, description="Length of the trained prefix."
    )
    projection: bool = Field(default=False, description="Reparameterize the prefix through an MLP.")


class PromptConfig(KubeModel):
    """Prompt tuning (PEFT): trainable soft-prompt embeddings prepended to the input."""

    num_virtual_tokens: Annotated[int, Field(ge=1, le=512)] = Field(
        default=20, description="Number of soft-prompt tokens."
    )
    init_text: Annotated[str, Field(min_length=1, max_length=2048)] | None = Field(
        default=None, description="Initialize the soft prompt from the embeddings of this text."
    )


_SUBCONFIGS: tuple[tuple[str, str], ...] = (
    ("partial", "partial"),
    ("lora", "lora"),
    ("adalora", "adalora"),
    ("ia3", "ia3"),
    ("adapter", "adapter"),
    ("prefix", "prefix"),
    ("prompt", "prompt"),
)


def _subconfig_rule(attr: str, type_name: str) -> Rule:
    return Rule(
        cel=f"!has(self.{attr}) || self.type == '{type_name}'",
        message=f"strategy.{attr} is set but strategy.type is not '{type_name}'",
        field=attr,
        check=lambda s: getattr(s, attr) is None or s.type == type_name,
    )


class StrategySpec(KubeModel):
    """The fine-tuning strategy and its settings (one sub-config, matching ``type``)."""

    api_path: ClassVar[str] = "spec.strategy"
    api_rules: ClassVar[tuple[Rule, ...]] = tuple(
        [_subconfig_rule(attr, name) for attr, name in _SUBCONFIGS]
        + [
            Rule(
                cel="!has(self.adalora) || self.adalora.targetR <= self.adalora.initR",
                message="adalora.targetR must not exceed adalora.initR",
                field="adalora.targetR",
                check=lambda s: s.adalora is None or s.adalora.target_r <= s.adalora.init_r,
            ),
            Rule(
                cel="!has(self.adalora) || self.adalora.tinitRatio + self.adalora.tfinalRatio < 1.0",
                message="adalora.tinitRatio + adalora.tfinalRatio must be below 1",
                field="adalora.tfinalRatio",
                check=lambda s: s.adalora is None or s.adalora.tinit_ratio + s.adalora.tfinal_ratio < 1.0,
            ),
        ]
    )

    type: Annotated[StrategyType, Strict(False)] = Field(
        description="full, partial, lora, adalora, ia3, adapter, prefix or prompt."
    )
    partial: PartialConfig | None = Field(default=None, description="Settings for type partial.")
    lora: LoraConfig | None = Field(default=None, description="Settings for type lora.")
    adalora: AdaLoraConfig | None = Field(default=None, description="Settings for type adalora.")
    ia3: Ia3Config | None = Field(default=None, description="Settings for type ia3.")
    adapter: AdapterConfig | None = Field(default=None, description="Settings for type adapter.")
    prefix: PrefixConfig | None = Field(default=None, description="Settings for type prefix.")
    prompt: PromptConfig | None = Field(default=None, description="Settings for type prompt.")

    def settings(self) -> KubeModel | None:
        """The sub-config of the selected type, with defaults when it was omitted."""
        defaults: dict[StrategyType, type[KubeModel]] = {
            StrategyType.PARTIAL: PartialConfig,
            StrategyType.LORA: LoraConfig,
            StrategyType.ADALORA: AdaLoraConfig,
            StrategyType.IA3: Ia3Config,
            StrategyType.ADAPTER: AdapterConfig,
            StrategyType.PREFIX: PrefixConfig,
            StrategyType.PROMPT: PromptConfig,
        }
        if self.type == StrategyType.FULL:
            return None
        chosen: KubeModel | None = getattr(self, self.type.value)
        return chosen if chosen is not None else defaults[self.type]()


# --------------------------------------------------------------------------- objective


class AuxiliaryObjective(KubeModel):
    """A self-supervised loss on the same inputs, added with weight λ."""

    type: Literal["mlm", "lm"] = Field(description="mlm: masked-language-model loss; lm: causal-LM loss.")
    weight: Annotated[float, Field(ge=0.0, le=100.0)] = Field(default=0.1, description="λ in L_task + λ·L_aux.")
    mask_probability: Annotated[float, Field(gt=0.0, lt=1.0)] = Field(
        default=0.15, description="mlm only: fraction of tokens masked."
    )


class Regularization(KubeModel):
    """Regularizers of the objective."""

    weight_decay: Annotated[float, Field(ge=0.0, le=10.0)] = Field(
        default=0.01, description="Decoupled (AdamW) weight decay; never applied to biases and norms."
    )
    l2sp: Annotated[float, Field(ge=0.0, le=100.0)] = Field(
        default=0.0,
        alias="l2sp",  # to_camel would say "l2Sp"
        description="λ of L2-SP: λ·||θ − θ_pretrained||² over trainable pretrained weights (0 disables).",
    )
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] | None = Field(
        default=None, description="Override the backbone's dropout probabilities; the model's own when omitted."
    )


class ObjectiveSpec(KubeModel):
    """The training objective: task loss + λ·auxiliary loss + regularizers."""

    label_smoothing: Annotated[float, Field(ge=0.0, lt=1.0)] = Field(
        default=0.0, description="Label smoothing of the task cross-entropy."
    )
    auxiliary: AuxiliaryObjective | None = Field(
        default=None, description="Optional self-supervised auxiliary loss (classification tasks)."
    )
    regularization: Regularization = Field(
        default_factory=Regularization, description="Weight decay, L2-SP and dropout."
    )


# --------------------------------------------------------------------------- training


class Metric(StrEnum):
    """Evaluation metrics that can drive early stopping and model selection."""

    ACCURACY = "accuracy"
    F1 = "f1"
    PRECISION = "precision"
    RECALL = "recall"
    LOSS = "loss"
    PERPLEXITY = "perplexity"


LM_METRICS = (Metric.LOSS, Metric.PERPLEXITY)


class EvaluationSpec(KubeModel):
    """When and on what to evaluate."""

    every_steps: Annotated[int, Field(ge=1)] | None = Field(
        default=None, description="Evaluate every N optimizer steps; at each epoch end when omitted."
    )
    metric: Annotated[Metric, Strict(False)] | None = Field(
        default=None,
        description=(
            "Metric for early stopping and selection: f1 for classification, loss for language models by default."
        ),
    )
    early_stopping_patience: Annotated[int, Field(ge=1)] | None = Field(
        default=None, description="Stop after this many evaluations without improvement (off when omitted)."
    )


class TrainingSpec(KubeModel):
    """Optimization settings."""

    api_path: ClassVar[str] = "spec.training"
    api_rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="has(self.epochs) != has(self.maxSteps)",
            message="set exactly one of epochs and maxSteps",
            field="epochs",
            check=lambda t: (t.epochs is None) != (t.max_steps is None),
        ),
    )

    epochs: Annotated[int, Field(ge=1, le=1000)] | None = Field(
        default=None, description="Passes over the training data (exclusive with maxSteps)."
    )
    max_steps: Annotated[int, Field(ge=1, le=100_000_000)] | None = Field(
        default=None, description="Number of optimizer steps (exclusive with epochs)."
    )
    learning_rate: Annotated[float, Field(gt=0.0, le=1.0)] = Field(default=2.0e-5, description="Peak learning rate.")
    scheduler: Literal["linear", "cosine", "constant"] = Field(
        default="linear", description="Learning-rate decay after warm-up."
    )
    warmup_ratio: Annotated[float, Field(ge=0.0, lt=1.0)] = Field(
        default=0.0, description="Fraction of steps with linear warm-up."
    )
    micro_batch_size: Annotated[int, Field(ge=1, le=65536)] = Field(
        default=16, description="Examples per process per forward pass."
    )
    gradient_accumulation_steps: Annotated[int, Field(ge=1, le=4096)] = Field(
        default=1, description="Micro-batches accumulated per optimizer step."
    )
    max_grad_norm: Annotated[float, Field(ge=0.0)] = Field(
        default=1.0, description="Gradient clipping norm (0 disables)."
    )
    precision: Literal["bf16", "fp16", "fp32"] = Field(
        default="bf16", description="Mixed precision on GPUs; runs on CPU always use fp32."
    )
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] = Field(default=42, description="Random seed.")
    log_every_steps: Annotated[int, Field(ge=1)] = Field(default=10, description="Steps between log lines.")
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec, description="Evaluation schedule.")
    gradient_checkpointing: bool = Field(
        default=False,
        description="Recompute activations in the backward pass: much less activation memory for ~30 % more compute.",
    )
    attention: Literal["sdpa", "flash_attention_2", "eager"] = Field(
        default="sdpa",
        description=(
            "Attention kernel: sdpa (PyTorch scaled-dot-product attention), flash_attention_2 (needs the "
            "flash-attn package in the image and a GPU) or eager (reference implementation)."
        ),
    )
    compile: bool = Field(
        default=False, description="Compile the model with torch.compile (slower start, faster steps on GPUs)."
    )


# --------------------------------------------------------------------------- deepspeed


class DeepSpeedSpec(KubeModel):
    """DeepSpeed ZeRO settings."""

    api_path: ClassVar[str] = "spec.deepspeed"
    api_rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="self.offloadParams != 'cpu' || self.zeroStage == 3",
            message="offloadParams: cpu needs zeroStage 3",
            field="offloadParams",
            check=lambda d: d.offload_params != "cpu" or d.zero_stage == 3,
        ),
        Rule(
            cel="self.offloadOptimizer != 'cpu' || self.zeroStage >= 1",
            message="offloadOptimizer: cpu needs zeroStage 1, 2 or 3",
            field="offloadOptimizer",
            check=lambda d: d.offload_optimizer != "cpu" or d.zero_stage >= 1,
        ),
    )

    zero_stage: Annotated[int, Field(ge=0, le=3)] = Field(
        default=2, description="ZeRO stage: 0 (DDP), 1 (optimizer), 2 (+gradients), 3 (+parameters)."
    )
    offload_optimizer: Literal["none", "cpu"] = Field(default="none", description="Offload optimizer state to CPU.")
    offload_params: Literal["none", "cpu"] = Field(default="none", description="Offload parameters to CPU (stage 3).")
    config: dict[str, Any] = Field(
        default_factory=dict,
        description="Raw DeepSpeed configuration keys merged last, for experts.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )


# --------------------------------------------------------------------------- resources


class Toleration(KubeModel):
    """A Kubernetes toleration for the worker pods."""

    key: Annotated[str, Field(pattern=LABEL_KEY_PATTERN, max_length=317)] | None = Field(
        default=None, description="Taint key to tolerate."
    )
    operator: Literal["Exists", "Equal"] = Field(default="Equal", description="Exists or Equal.")
    value: Annotated[str, Field(pattern=LABEL_VALUE_PATTERN, max_length=63)] | None = Field(
        default=None, description="Taint value (operator Equal)."
    )
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to tolerate; all when omitted."
    )
    toleration_seconds: Annotated[int, Field(ge=0)] | None = Field(
        default=None, description="How long a NoExecute taint is tolerated."
    )


LabelMap = Annotated[
    dict[
        Annotated[str, Field(pattern=LABEL_KEY_PATTERN, max_length=317)],
        Annotated[str, Field(pattern=LABEL_VALUE_PATTERN, max_length=63)],
    ],
    Field(max_length=64),
]
ResourceMap = Annotated[
    dict[Annotated[str, Field(pattern=RESOURCE_NAME_PATTERN, max_length=253)], Quantity],
    Field(max_length=32),
]


GPU_RESOURCE = "nvidia.com/gpu"


def _gpu_quantity(resources: Any) -> int | str | None:
    # The pod's GPU count as written: requests first, then limits (which default to the requests).
    value: int | str | None = resources.requests.get(GPU_RESOURCE, resources.limits.get(GPU_RESOURCE))
    return value


class ResourcesSpec(KubeModel):
    """How many workers, on what hardware."""

    api_path: ClassVar[str] = "spec.resources"
    api_rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel=(
                "!has(self.processesPerNode) || "
                f"((has(self.requests) && '{GPU_RESOURCE}' in self.requests) ? "
                f"string(self.requests['{GPU_RESOURCE}']) in ['0', string(self.processesPerNode)] : "
                f"(!has(self.limits) || !('{GPU_RESOURCE}' in self.limits) || "
                f"string(self.limits['{GPU_RESOURCE}']) in ['0', string(self.processesPerNode)]))"
            ),
            message=(
                f"processesPerNode must equal the pod's {GPU_RESOURCE} count in resources.requests (or "
                "resources.limits): one training process per GPU; omit processesPerNode to take the GPU count"
            ),
            field="processesPerNode",
            check=lambda r: (
                r.processes_per_node is None
                or _gpu_quantity(r) is None
                or str(_gpu_quantity(r)) in ("0", str(r.processes_per_node))
            ),
        ),
    )

    nodes: Annotated[int, Field(ge=1, le=4096)] = Field(default=1, description="Number of worker pods (nodes).")
    processes_per_node: Annotated[int, Field(ge=1, le=64)] | None = Field(
        default=None,
        description=(
            "Training processes per pod: one per GPU. Defaults to the pod's nvidia.com/gpu request "
            "(1 on CPU-only pods); when set with a GPU request the two must agree."
        ),
    )
    image: Annotated[str, Field(pattern=IMAGE_PATTERN, max_length=512)] | None = Field(
        default=None, description="Trainer image; the operator's default when omitted."
    )
    requests: ResourceMap = Field(
        default_factory=dict, description="Resource requests per pod, e.g. {cpu: '8', nvidia.com/gpu: 8}."
    )
    limits: ResourceMap = Field(
        default_factory=dict, description="Resource limits per pod; GPU limits default to the requests."
    )
    node_selector: LabelMap = Field(default_factory=dict, description="Node labels the pods must match.")
    tolerations: Annotated[list[Toleration], Field(max_length=32)] = Field(
        default_factory=list, description="Tolerations for the pods."
    )
    priority_class_name: Annotated[str, Field(pattern=DNS1123_SUBDOMAIN_PATTERN, max_length=253)] | None = Field(
        default=None, description="PriorityClass of the pods."
    )
    service_account_name: Annotated[str, Field(pattern=DNS1123_SUBDOMAIN_PATTERN, max_length=253)] | None = Field(
        default=None, description="ServiceAccount of the pods (they need no API access)."
    )
    shm_size: Quantity = Field(default="8Gi", description="Size of the in-memory /dev/shm volume.")

    accelerator_peak_tflops: Annotated[float, Field(gt=0.0, le=100000.0)] | None = Field(
        default=None,
        description=(
            "Dense bf16 peak TFLOP/s of one accelerator, the denominator of model FLOPs utilization (MFU); "
            "taken from a table of known GPUs when omitted."
        ),
    )

    def gpus_per_node(self) -> int:
        """GPUs requested per pod (0 when the job runs on CPUs)."""
        value = _gpu_quantity(self)
        return int(float(value)) if value is not None else 0

    def processes(self) -> int:
        """Training processes per pod: ``processesPerNode``, else the GPU count, else 1."""
        return self.processes_per_node or self.gpus_per_node() or 1


# --------------------------------------------------------------------------- storage


class CheckpointSpec(KubeModel):
    """Where and how often checkpoints are written."""

    uri: StorageUri | None = Field(
        default=None,
        description="s3://BUCKET/PREFIX, pvc://CLAIM/PATH or file:///PATH; the operator's default when omitted.",
    )
    endpoint: Annotated[str, Field(pattern=ENDPOINT_PATTERN, max_length=512)] | None = Field(
        default=None, description="Endpoint of an S3-compatible store, e.g. http://minio.storage:9000."
    )
    region: Annotated[str, Field(pattern=r"^[a-z0-9-]+$", max_length=64)] | None = Field(
        default=None, description="S3 region."
    )
    credentials_secret: Annotated[str, Field(pattern=DNS1123_SUBDOMAIN_PATTERN, max_length=253)] | None = Field(
        default=None,
        description=(
            "Name of a Secret in the job's namespace with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY; "
            "credentials are never given inline."
        ),
    )
    every_steps: Annotated[int, Field(ge=1)] = Field(default=500, description="Steps between checkpoints.")
    keep_last: Annotated[int, Field(ge=1, le=100)] = Field(default=3, description="Complete checkpoints kept.")
    async_upload: bool = Field(
        default=True, description="Upload in the background while training continues (one upload in flight)."
    )


class OutputSpec(KubeModel):
    """Where the fine-tuned model is published."""

    uri: StorageUri | None = Field(
        default=None,
        description=(
            "Where the Hugging Face-format model or PEFT adapter is written; <checkpoint.uri>/output when omitted."
        ),
    )
    merge_adapter: bool = Field(
        default=False, description="For lora, adalora and ia3: also write full weights with the adapter merged."
    )


class RunPolicy(KubeModel):
    """Restarts, deadlines, clean-up and suspension."""

    max_restarts: Annotated[int, Field(ge=0, le=1000)] = Field(
        default=3, description="Gang restarts allowed after retryable failures."
    )
    backoff_seconds: Annotated[int, Field(ge=0, le=86400)] = Field(
        default=30, description="Wait before a restarted attempt starts."
    )
    active_deadline_seconds: Annotated[int, Field(ge=1)] | None = Field(
        default=None, description="Fail the job after this many seconds of running in total."
    )
    ttl_seconds_after_finished: Annotated[int, Field(ge=0)] | None = Field(
        default=None, description="Delete the FineTuneJob this long after it finished (storage is kept)."
    )
    suspend: bool = Field(default=False, description="Suspend the job; resuming continues from the last checkpoint.")
    termination_grace_period_seconds: Annotated[int, Field(ge=30, le=86400)] = Field(
        default=600, description="Time a worker has to save a checkpoint after SIGTERM."
    )


# --------------------------------------------------------------------------- the job


_CLASSIFICATION_METRICS = ("accuracy", "f1", "precision", "recall", "loss")
IMMUTABLE_SPEC_FIELDS = (
    "model",
    "dataset",
    "strategy",
    "objective",
    "training",
    "deepspeed",
    "resources",
    "checkpoint",
    "output",
)


def _immutable_rule(name: str) -> Rule:
    return Rule(
        cel=f"has(self.{name}) == has(oldSelf.{name}) && (!has(self.{name}) || self.{name} == oldSelf.{name})",
        message=f"spec.{name} cannot change after creation; create a new FineTuneJob",
        field=name,
        check=lambda _s: True,
        transition=True,
    )


class FineTuneJobSpec(KubeModel):
    """What to fine-tune, how, on what resources, and where the results go."""

    api_path: ClassVar[str] = "spec"
    api_rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel=(
                "self.strategy.type != 'prefix' || self.model.task in "
                + _cel_list(tuple(t.value for t in STRATEGY_TASKS[StrategyType.PREFIX]))
            ),
            message="prefix tuning supports causal-lm only (use prompt or lora for classification)",
            field="strategy.type",
            check=lambda s: (
                s.strategy.type != StrategyType.PREFIX or s.model.task in STRATEGY_TASKS[StrategyType.PREFIX]
            ),
        ),
        Rule(
            cel=(
                "self.strategy.type != 'prompt' || self.model.task in "
                + _cel_list(tuple(t.value for t in STRATEGY_TASKS[StrategyType.PROMPT]))
            ),
            message="prompt tuning supports sequence-classification and causal-lm",
            field="strategy.type",
            check=lambda s: (
                s.strategy.type != StrategyType.PROMPT or s.model.task in STRATEGY_TASKS[StrategyType.PROMPT]
            ),
        ),
        Rule(
            cel=(
                "!has(self.objective.auxiliary) || "
                "self.model.task in ['sequence-classification', 'token-classification']"
            ),
            message="an auxiliary self-supervised loss applies to classification tasks only",
            field="objective.auxiliary",
            check=lambda s: s.objective.auxiliary is None or s.model.task in CLASSIFICATION_TASKS,
        ),
        Rule(
            cel="self.strategy.type != 'adalora' || self.deepspeed.zeroStage != 3",
            message="adalora's rank budget needs full parameters and gradients on every rank; use zeroStage 0-2",
            field="strategy.type",
            check=lambda s: s.strategy.type != StrategyType.ADALORA or s.deepspeed.zero_stage != 3,
        ),
        Rule(
            cel="self.objective.regularization.l2sp == 0.0 || self.deepspeed.zeroStage != 3",
            message="l2sp needs the full parameters on every rank; use zeroStage 0, 1 or 2",
            field="objective.regularization.l2sp",
            check=lambda s: s.objective.regularization.l2sp == 0.0 or s.deepspeed.zero_stage != 3,
        ),
        Rule(
            cel="!self.output.mergeAdapter || self.strategy.type in ['lora', 'adalora', 'ia3']",
            message="mergeAdapter applies to lora, adalora and ia3 only",
            field="output.mergeAdapter",
            check=lambda s: not s.output.merge_adapter or s.strategy.type in PEFT_MERGEABLE,
        ),
        Rule(
            cel=(
                "!has(self.training.evaluation.metric) || "
                "(self.model.task in ['causal-lm', 'masked-lm'] ? "
                "self.training.evaluation.metric in ['loss', 'perplexity'] : "
                f"self.training.evaluation.metric in {_cel_list(_CLASSIFICATION_METRICS)})"
            ),
            message="evaluation.metric must be loss or perplexity for language models, "
            "and accuracy, f1, precision, recall or loss for classification",
            field="training.evaluation.metric",
            check=lambda s: (
                s.training.evaluation.metric is None
                or (
                    s.training.evaluation.metric in LM_METRICS
                    if s.model.task in LANGUAGE_MODEL_TASKS
                    else s.training.evaluation.metric in _CLASSIFICATION_METRICS
                )
            ),
        ),
        Rule(
            cel="!has(self.dataset.packing) || !self.dataset.packing || self.model.task == 'causal-lm'",
            message="packing applies to causal-lm only",
            field="dataset.packing",
            check=lambda s: not s.dataset.packing or s.model.task == Task.CAUSAL_LM,
        ),
        Rule(
            cel="!has(self.dataset.promptField) || self.model.task == 'causal-lm'",
            message="promptField and responseField apply to causal-lm only",
            field="dataset.promptField",
            check=lambda s: s.dataset.prompt_field is None or s.model.task == Task.CAUSAL_LM,
        ),
        Rule(
            cel=(
                "self.training.precision != 'fp16' || "
                "('nvidia.com/gpu' in self.resources.requests) || ('nvidia.com/gpu' in self.resources.limits)"
            ),
            message="fp16 needs GPUs (request nvidia.com/gpu); use bf16 or fp32 on CPUs",
            field="training.precision",
            check=lambda s: (
                s.training.precision != "fp16"
                or "nvidia.com/gpu" in s.resources.requests
                or "nvidia.com/gpu" in s.resources.limits
            ),
        ),
        *(_immutable_rule(name) for name in IMMUTABLE_SPEC_FIELDS),
    )

    model: ModelSpec = Field(description="The pretrained backbone and the task.")
    dataset: DatasetSpec = Field(description="Training and validation data.")
    strategy: StrategySpec = Field(description="The fine-tuning strategy.")
    objective: ObjectiveSpec = Field(default_factory=ObjectiveSpec, description="Loss terms and regularizers.")
    training: TrainingSpec = Field(description="Optimization settings.")
    deepspeed: DeepSpeedSpec = Field(default_factory=DeepSpeedSpec, description="DeepSpeed ZeRO settings.")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, description="Workers and hardware.")
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec, description="Checkpoint storage and cadence.")
    output: OutputSpec = Field(default_factory=OutputSpec, description="Where the fine-tuned model is published.")
    run_policy: RunPolicy = Field(default_factory=RunPolicy, description="Restarts, deadlines, TTL and suspension.")
    queue_name: Annotated[str, Field(pattern=DNS1123_LABEL_PATTERN, max_length=63)] | None = Field(
        default=None, description="Kueue LocalQueue; the attempt's Job is created suspended for Kueue to admit."
    )
