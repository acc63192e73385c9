"""``spec.strategy``: how much of the backbone is trained, and how."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, ClassVar, Literal

from pydantic import Field, Strict

from kubetune_trainer.spec._base import KubeModel, ModuleName, Rule
from kubetune_trainer.spec.model import Task


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
TargetModules = Annotated[list[ModuleName], Field(min_length=1, max_length=64)]


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
