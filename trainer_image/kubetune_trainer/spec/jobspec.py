"""``spec``: the whole FineTuneJob spec and its cross-section rules (DESIGN §2)."""

from __future__ import annotations

from typing import Annotated, ClassVar

from pydantic import Field

from kubetune_trainer.spec._base import DNS1123_LABEL_PATTERN, KubeModel, Rule, cel_list
from kubetune_trainer.spec.artifacts import CheckpointSpec, OutputSpec, RunPolicy
from kubetune_trainer.spec.data import DatasetSpec
from kubetune_trainer.spec.model import CLASSIFICATION_TASKS, LANGUAGE_MODEL_TASKS, ModelSpec, Task
from kubetune_trainer.spec.resources import DeepSpeedSpec, ResourcesSpec
from kubetune_trainer.spec.strategy import StrategySpec, strategy_job_rules
from kubetune_trainer.spec.training import LM_METRICS, EvaluationSpec, ObjectiveSpec, TrainingSpec

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
                "!has(self.objective.auxiliary) || "
                "self.model.task in ['sequence-classification', 'token-classification']"
            ),
            message="an auxiliary self-supervised loss applies to classification tasks only",
            field="objective.auxiliary",
            check=lambda s: s.objective.auxiliary is None or s.model.task in CLASSIFICATION_TASKS,
        ),
        Rule(
            cel="self.objective.regularization.l2sp == 0.0 || self.deepspeed.zeroStage != 3",
            message="l2sp needs the full parameters on every rank; use zeroStage 0, 1 or 2",
            field="objective.regularization.l2sp",
            check=lambda s: s.objective.regularization.l2sp == 0.0 or s.deepspeed.zero_stage != 3,
        ),
        Rule(
            cel=(
                "!has(self.training.evaluation.metric) || "
                "(self.model.task in ['causal-lm', 'masked-lm'] ? "
                "self.training.evaluation.metric in ['loss', 'perplexity'] : "
                f"self.training.evaluation.metric in {cel_list(_CLASSIFICATION_METRICS)})"
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
            cel=(
                "(!has(self.training.evaluation.everySteps) && !has(self.training.evaluation.metric) && "
                "!has(self.training.evaluation.earlyStoppingPatience)) || "
                "has(self.dataset.validation) || has(self.dataset.validationSplit)"
            ),
            message="evaluation settings need validation data: set dataset.validation or dataset.validationSplit",
            field="training.evaluation",
            check=lambda s: (
                s.training.evaluation == EvaluationSpec()
                or s.dataset.validation is not None
                or s.dataset.validation_split is not None
            ),
        ),
        Rule(
            cel="!has(self.dataset.textPairField) || self.model.task == 'sequence-classification'",
            message="textPairField applies to sequence-classification only",
            field="dataset.textPairField",
            check=lambda s: s.dataset.text_pair_field is None or s.model.task == Task.SEQUENCE_CLASSIFICATION,
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
            cel="!has(self.dataset.chatTemplate) || self.model.task == 'causal-lm'",
            message="chatTemplate applies to causal-lm only",
            field="dataset.chatTemplate",
            check=lambda s: s.dataset.chat_template is None or s.model.task == Task.CAUSAL_LM,
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

    @classmethod
    def dynamic_rules(cls) -> tuple[Rule, ...]:
        """The registry's rules: which tasks each strategy supports, ZeRO-3, mergeable adapters."""
        return strategy_job_rules()

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
