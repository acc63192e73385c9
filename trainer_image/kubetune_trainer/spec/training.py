"""``spec.objective`` and ``spec.training``: the loss terms, the optimizer and the evaluation schedule."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, ClassVar, Literal

from pydantic import Field, Strict

from kubetune_trainer.spec._base import KubeModel, Rule


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
            "Metric early stopping watches: f1 for classification, loss for language models by default. "
            "It selects no checkpoint: the published model is the last step's."
        ),
    )
    early_stopping_patience: Annotated[int, Field(ge=1)] | None = Field(
        default=None,
        description=(
            "Stop after this many evaluations without improvement (off when omitted); the model published is the "
            "one of that last evaluation."
        ),
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
