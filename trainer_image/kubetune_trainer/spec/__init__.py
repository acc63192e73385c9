"""The FineTuneJob API (pure pydantic, no torch): one module per section of the spec, status and the object.

``model`` · ``data`` · ``strategy`` · ``training`` (objective and training) ·
``resources`` (DeepSpeed and workers) · ``artifacts`` (checkpoint, output, run
policy) · ``jobspec`` (the spec and its cross-section rules) · ``status`` ·
``finetunejob`` (the object).  Everything is re-exported here.
"""

from __future__ import annotations

from kubetune_trainer.spec._base import KubeModel, Rule
from kubetune_trainer.spec.artifacts import CheckpointSpec, OutputSpec, RunPolicy
from kubetune_trainer.spec.data import DataFormat, DatasetSpec
from kubetune_trainer.spec.finetunejob import (
    API_VERSION,
    GROUP,
    KIND,
    NAME_PATTERN,
    PLURAL,
    VERSION,
    FineTuneJob,
    ObjectMeta,
)
from kubetune_trainer.spec.jobspec import IMMUTABLE_SPEC_FIELDS, FineTuneJobSpec
from kubetune_trainer.spec.model import CLASSIFICATION_TASKS, LANGUAGE_MODEL_TASKS, ModelSpec, Task
from kubetune_trainer.spec.resources import GPU_RESOURCE, DeepSpeedSpec, ResourcesSpec, Toleration
from kubetune_trainer.spec.status import (
    CheckpointStatus,
    Condition,
    ConditionType,
    FineTuneJobStatus,
    OutputStatus,
    Phase,
    Progress,
)
from kubetune_trainer.spec.strategy import (
    AdaLoraConfig,
    AdapterConfig,
    Ia3Config,
    LoraConfig,
    PartialConfig,
    PrefixConfig,
    PromptConfig,
    StrategyDefinition,
    StrategySpec,
    register_strategy,
    strategy_definition,
    strategy_definitions,
)
from kubetune_trainer.spec.training import (
    LM_METRICS,
    AuxiliaryObjective,
    EvaluationSpec,
    Metric,
    ObjectiveSpec,
    Regularization,
    TrainingSpec,
)

__all__ = [
    "API_VERSION",
    "CLASSIFICATION_TASKS",
    "GPU_RESOURCE",
    "GROUP",
    "IMMUTABLE_SPEC_FIELDS",
    "KIND",
    "LANGUAGE_MODEL_TASKS",
    "LM_METRICS",
    "NAME_PATTERN",
    "PLURAL",
    "VERSION",
    "AdaLoraConfig",
    "AdapterConfig",
    "AuxiliaryObjective",
    "CheckpointSpec",
    "CheckpointStatus",
    "Condition",
    "ConditionType",
    "DataFormat",
    "DatasetSpec",
    "DeepSpeedSpec",
    "EvaluationSpec",
    "FineTuneJob",
    "FineTuneJobSpec",
    "FineTuneJobStatus",
    "Ia3Config",
    "KubeModel",
    "LoraConfig",
    "Metric",
    "ModelSpec",
    "ObjectMeta",
    "ObjectiveSpec",
    "OutputSpec",
    "OutputStatus",
    "PartialConfig",
    "Phase",
    "PrefixConfig",
    "Progress",
    "PromptConfig",
    "Regularization",
    "ResourcesSpec",
    "Rule",
    "RunPolicy",
    "StrategyDefinition",
    "StrategySpec",
    "Task",
    "Toleration",
    "TrainingSpec",
    "register_strategy",
    "strategy_definition",
    "strategy_definitions",
]
