"""``spec.strategy``: how much of the backbone is trained, and how — one registry entry per strategy.

Each strategy is one :class:`StrategyDefinition`: its name (the value of
``strategy.type`` and the key of its settings block), the model of its
settings, the tasks it supports, whether its adapter merges into full weights,
whether it trains under ZeRO-3, its own validation rules, and where the
trainer finds its implementation.  The API's ``strategy.type`` enum, the CRD
schema of every settings block, the CEL rules and the pydantic validation are
all derived from the registry, so adding a strategy is one implementation
module, one :func:`register_strategy` line (with its settings model) and an
example.  Platform teams add their own through ``KUBETUNE_PLUGINS``
(:mod:`kubetune_trainer.plugins`); a spec only ever names a registered strategy.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, GetJsonSchemaHandler, ValidationError, model_validator
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import PydanticCustomError, core_schema

from kubetune_trainer.spec._base import KubeModel, ModuleName, Rule, cel_list
from kubetune_trainer.spec.model import Task

STRATEGY_NAME_PATTERN = r"^[a-z][a-z0-9]{0,30}$"
TargetModules = Annotated[list[ModuleName], Field(min_length=1, max_length=64)]


@dataclass(frozen=True)
class StrategyDefinition:
    """One strategy: everything the API, the CRD, validation and the trainer need to know about it."""

    name: str  # strategy.type, and the key of its settings block (strategy.<name>)
    summary: str  # what it trains, one line (kubetune validate, docs)
    implementation: str  # "module:function" with apply(model, settings, ctx) -> Prepared; the trainer imports it
    settings: type[KubeModel] | None = None  # the model of strategy.<name>; None: the strategy has no settings
    tasks: tuple[Task, ...] = tuple(Task)
    task_note: str = ""  # why other tasks are not supported, for the error message
    mergeable: bool = False  # output.mergeAdapter can fold it into full weights
    zero3: bool = True  # trains under deepspeed.zeroStage 3
    zero3_note: str = ""  # why not, for the error message
    trains_backbone: bool = False  # updates pretrained weights (the auxiliary LM head then trains too)
    rules: tuple[Rule, ...] = ()  # rules over its settings; fields relative to spec.strategy ("adalora.targetR")
    extra: dict[str, Any] = field(default_factory=dict)  # strategy-specific facts for its implementation


_REGISTRY: dict[str, StrategyDefinition] = {}


def register_strategy(definition: StrategyDefinition) -> StrategyDefinition:
    """Add a strategy to the registry (a name can be registered once)."""
    if not re.match(STRATEGY_NAME_PATTERN, definition.name) or definition.name == "type":
        raise ValueError(f"strategy name {definition.name!r} must match {STRATEGY_NAME_PATTERN} and not be 'type'")
    if definition.name in _REGISTRY:
        raise ValueError(f"strategy {definition.name!r} is already registered")
    if ":" not in definition.implementation:
        raise ValueError(f"strategy {definition.name!r}: implementation must be 'module:function'")
    _REGISTRY[definition.name] = definition
    return definition


def unregister_strategy(name: str) -> None:
    """Remove a strategy (tests that register their own clean up with this)."""
    _REGISTRY.pop(name, None)


def strategy_definitions() -> tuple[StrategyDefinition, ...]:
    """Every registered strategy, in registration order."""
    return tuple(_REGISTRY.values())


def strategy_definition(name: str) -> StrategyDefinition:
    """The registered strategy called ``name`` (KeyError naming the known ones)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown strategy {name!r}; known: {', '.join(_REGISTRY)}") from None


# --------------------------------------------------------------------------- built-in settings


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


# --------------------------------------------------------------------------- strategy.type and its settings block


def _settings_rules() -> tuple[Rule, ...]:
    rules: list[Rule] = []
    for definition in strategy_definitions():
        if definition.settings is not None:
            rules.append(_block_matches_type(definition.name))
        rules.extend(definition.rules)
    return tuple(rules)


def _block_matches_type(name: str) -> Rule:
    return Rule(
        cel=f"!has(self.{name}) || self.type == '{name}'",
        message=f"strategy.{name} is set but strategy.type is not '{name}'",
        field=name,
        check=lambda s: s.block(name) is None or s.type == name,
    )


def _error(key: str, value: Any, message: str) -> ValidationError:
    """A validation error at ``strategy.<key>``."""
    kind = PydanticCustomError("strategy", "{message}", {"message": message})
    return ValidationError.from_exception_data("StrategySpec", [{"type": kind, "loc": (key,), "input": value}])


def _under(key: str, error: ValidationError) -> ValidationError:
    """``error`` of a settings block, its locations under ``key`` (``r`` → ``lora.r``)."""
    details: list[Any] = []
    for item in error.errors(include_url=False):
        detail: Any = {"type": item["type"], "loc": (key, *item["loc"]), "input": item["input"]}
        if "ctx" in item:
            detail["ctx"] = item["ctx"]
        try:
            ValidationError.from_exception_data("probe", [detail])
        except (KeyError, TypeError, ValueError):  # not one of pydantic's own error types: keep its message
            detail = {
                "type": PydanticCustomError(item["type"], "{message}", {"message": item["msg"]}),
                "loc": (key, *item["loc"]),
                "input": item["input"],
            }
        details.append(detail)
    return ValidationError.from_exception_data(error.title, details)


class StrategySpec(KubeModel):
    """The fine-tuning strategy and its settings (one settings block, matching ``type``)."""

    # The settings blocks are the registry's, not fields of this class: extra keys are allowed
    # here and each is validated with its strategy's settings model by _validate_blocks.
    model_config = KubeModel.model_config | {"extra": "allow"}
    api_path: ClassVar[str] = "spec.strategy"

    type: str = Field(description="The registered strategy to apply (full, partial, lora, adalora, ia3, ...).")

    @classmethod
    def dynamic_rules(cls) -> tuple[Rule, ...]:
        """Each registered settings block belongs to its type, plus every strategy's own rules."""
        return _settings_rules()

    @model_validator(mode="before")
    @classmethod
    def _validate_blocks(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        known = {d.name: d for d in strategy_definitions()}
        kind = data.get("type")
        if isinstance(kind, str) and kind not in known:
            raise _error("type", kind, f"unknown strategy; expected one of {', '.join(known)}")
        blocks: dict[str, Any] = {}
        for key, value in data.items():
            if key == "type":
                continue
            definition = known.get(key)
            if definition is None or definition.settings is None:
                raise _error(key, value, f"unknown field: no strategy has settings called {key!r}")
            if isinstance(value, definition.settings):
                blocks[key] = value
                continue
            try:
                blocks[key] = definition.settings.model_validate(value)
            except ValidationError as error:
                raise _under(key, error) from None
        return {"type": kind, **blocks} if "type" in data else {**blocks}

    @classmethod
    def __get_pydantic_json_schema__(
        cls, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        """The registry's view: ``type`` is an enum of the strategy names, one property per settings block."""
        reference = handler(schema)
        target = handler.resolve_ref_schema(reference)
        properties = target.setdefault("properties", {})
        properties["type"]["enum"] = [d.name for d in strategy_definitions()]
        properties["type"]["description"] = (
            "The strategy: " + "; ".join(f"{d.name} ({d.summary})" for d in strategy_definitions()) + "."
        )
        for definition in strategy_definitions():
            if definition.settings is not None:
                block = handler(definition.settings.__pydantic_core_schema__)
                # As an optional field's schema: absent unless written (no default object for the API server to add).
                properties[definition.name] = {
                    "anyOf": [block, {"type": "null"}],
                    "default": None,
                    "description": f"Settings for type {definition.name}.",
                }
        target["additionalProperties"] = False
        return reference

    def block(self, name: str) -> KubeModel | None:
        """The settings block ``strategy.<name>`` as written (None when absent)."""
        value = (self.__pydantic_extra__ or {}).get(name)
        return value if isinstance(value, KubeModel) else None

    def definition(self) -> StrategyDefinition:
        """The registry entry of ``type``."""
        return strategy_definition(self.type)

    def settings(self) -> KubeModel | None:
        """The settings of the selected type, with defaults when the block was omitted (None: no settings)."""
        definition = self.definition()
        if definition.settings is None:
            return None
        return self.block(definition.name) or definition.settings()


# --------------------------------------------------------------------------- rules between the strategy and the rest


def strategy_job_rules() -> tuple[Rule, ...]:
    """Rules on the whole spec derived from the registry: supported tasks, ZeRO-3, mergeable adapters."""
    rules: list[Rule] = []
    for d in strategy_definitions():
        if set(d.tasks) != set(Task):
            names = tuple(t.value for t in d.tasks)
            rules.append(
                Rule(
                    cel=f"self.strategy.type != '{d.name}' || self.model.task in {cel_list(names)}",
                    message=f"{d.name} supports {', '.join(names)} only" + (f" ({d.task_note})" if d.task_note else ""),
                    field="strategy.type",
                    check=_supports_task(d.name, d.tasks),
                )
            )
        if not d.zero3:
            rules.append(
                Rule(
                    cel=f"self.strategy.type != '{d.name}' || self.deepspeed.zeroStage != 3",
                    message=f"{d.name} does not train under zeroStage 3"
                    + (f": {d.zero3_note}" if d.zero3_note else ""),
                    field="strategy.type",
                    check=_not_zero3(d.name),
                )
            )
    mergeable = tuple(d.name for d in strategy_definitions() if d.mergeable)
    rules.append(
        Rule(
            cel=f"!self.output.mergeAdapter || self.strategy.type in {cel_list(mergeable)}",
            message=f"mergeAdapter applies to {', '.join(mergeable)} only",
            field="output.mergeAdapter",
            check=lambda s: not s.output.merge_adapter or s.strategy.type in mergeable,
        )
    )
    return tuple(rules)


def _supports_task(name: str, tasks: tuple[Task, ...]) -> Callable[[Any], bool]:
    return lambda s: s.strategy.type != name or s.model.task in tasks


def _not_zero3(name: str) -> Callable[[Any], bool]:
    return lambda s: s.strategy.type != name or s.deepspeed.zero_stage != 3


# --------------------------------------------------------------------------- the built-in strategies

_PEFT = "kubetune_trainer.strategies.peft_methods"
register_strategy(
    StrategyDefinition("full", "every parameter", "kubetune_trainer.strategies.full:apply", trains_backbone=True)
)
register_strategy(
    StrategyDefinition(
        "partial",
        "the top layers and the task head",
        "kubetune_trainer.strategies.partial:apply",
        settings=PartialConfig,
        trains_backbone=True,
    )
)
register_strategy(
    StrategyDefinition("lora", "low-rank adapters (PEFT)", f"{_PEFT}:apply_lora", settings=LoraConfig, mergeable=True)
)
register_strategy(
    StrategyDefinition(
        "adalora",
        "low-rank adapters with an adaptive rank budget (PEFT)",
        f"{_PEFT}:apply_adalora",
        settings=AdaLoraConfig,
        mergeable=True,
        zero3=False,
        zero3_note="its rank budget needs full parameters and gradients on every rank; use zeroStage 0-2",
        rules=(
            Rule(
                cel="!has(self.adalora) || self.adalora.targetR <= self.adalora.initR",
                message="adalora.targetR must not exceed adalora.initR",
                field="adalora.targetR",
                check=lambda s: (b := s.block("adalora")) is None or b.target_r <= b.init_r,
            ),
            Rule(
                cel="!has(self.adalora) || self.adalora.tinitRatio + self.adalora.tfinalRatio < 1.0",
                message="adalora.tinitRatio + adalora.tfinalRatio must be below 1",
                field="adalora.tfinalRatio",
                check=lambda s: (b := s.block("adalora")) is None or b.tinit_ratio + b.tfinal_ratio < 1.0,
            ),
        ),
    )
)
register_strategy(
    StrategyDefinition(
        "ia3",
        "learned rescaling vectors (PEFT)",
        f"{_PEFT}:apply_ia3",
        settings=Ia3Config,
        mergeable=True,
        rules=(
            Rule(
                cel=(
                    "!has(self.ia3) || !has(self.ia3.feedforwardModules) || !has(self.ia3.targetModules) || "
                    "self.ia3.feedforwardModules.all(m, m in self.ia3.targetModules)"
                ),
                message="ia3.feedforwardModules must be a subset of ia3.targetModules",
                field="ia3.feedforwardModules",
                check=lambda s: (
                    (b := s.block("ia3")) is None
                    or b.feedforward_modules is None
                    or b.target_modules is None
                    or set(b.feedforward_modules) <= set(b.target_modules)
                ),
            ),
        ),
    )
)
register_strategy(
    StrategyDefinition(
        "adapter",
        "bottleneck adapters after every layer",
        "kubetune_trainer.strategies.adapter:apply",
        settings=AdapterConfig,
    )
)
register_strategy(
    StrategyDefinition(
        "prefix",
        "trainable key/value prefixes (PEFT)",
        f"{_PEFT}:apply_prefix",
        settings=PrefixConfig,
        # PEFT's prefix tuning feeds past_key_values, which no transformers 5 classification forward accepts.
        tasks=(Task.CAUSAL_LM,),
        task_note="use prompt or lora for classification",
    )
)
register_strategy(
    StrategyDefinition(
        "prompt",
        "trainable soft-prompt embeddings (PEFT)",
        f"{_PEFT}:apply_prompt",
        settings=PromptConfig,
        # Virtual tokens shift token positions, so they cannot label tokens; PEFT has no masked-LM prompt head.
        tasks=(Task.SEQUENCE_CLASSIFICATION, Task.CAUSAL_LM),
    )
)
