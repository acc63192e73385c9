"""The ``FineTuneJob`` object: API group and version, metadata, spec and status."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field

from kubetune_trainer.spec._base import KubeModel, Rule
from kubetune_trainer.spec.jobspec import FineTuneJobSpec
from kubetune_trainer.spec.status import FineTuneJobStatus

GROUP = "kubetune.io"
VERSION = "v1alpha1"
KIND = "FineTuneJob"
PLURAL = "finetunejobs"
API_VERSION = f"{GROUP}/{VERSION}"

NAME_PATTERN = r"^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$"


class ObjectMeta(KubeModel):
    """The parts of Kubernetes object metadata kubetune reads.

    Names are limited to 40 characters so that child names
    (``<name>-a<attempt>-<index>-<suffix>``) stay within Kubernetes' 63.
    """

    model_config = KubeModel.model_config | {"extra": "allow"}

    name: Annotated[str, Field(pattern=NAME_PATTERN, max_length=40)] = Field(description="Name of the job.")
    namespace: Annotated[str, Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=63)] | None = Field(
        default=None, description="Namespace of the job."
    )


class FineTuneJob(KubeModel):
    """A distributed fine-tuning job: a pretrained backbone, data, strategy and objective."""

    api_rules: ClassVar[tuple[Rule, ...]] = ()

    api_version: Literal["kubetune.io/v1alpha1"] = Field(description="kubetune.io/v1alpha1")
    kind: Literal["FineTuneJob"] = Field(description="FineTuneJob")
    metadata: ObjectMeta = Field(description="Standard object metadata.")
    spec: FineTuneJobSpec = Field(description="What to fine-tune and how.")
    status: FineTuneJobStatus | None = Field(default=None, description="Observed state, written by the operator.")

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> FineTuneJob:
        """Validate a manifest as read from YAML or from the API server."""
        return cls.model_validate(manifest)
