"""Operator settings from ``KUBETUNE_*`` environment variables, validated at start-up.

One immutable object is built once (:func:`load_settings`) and passed down to the
pure builders, so nothing below the handlers reads the environment.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from kubetune_trainer.spec import runtime as rt
from kubetune_trainer.spec._base import (
    DNS1123_SUBDOMAIN_PATTERN,
    ENDPOINT_PATTERN,
    IMAGE_PATTERN,
    STORAGE_URI_PATTERN,
)

ENV_PREFIX = "KUBETUNE_"
ALL_NAMESPACES = "all"
_NAMESPACE_PATTERN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class SettingsError(ValueError):
    """The operator's environment is invalid; the message names the variable."""


class OperatorSettings(BaseSettings):
    """What the platform team configures once for every FineTuneJob of this operator."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    default_image: Annotated[str, Field(pattern=IMAGE_PATTERN, max_length=512)] = Field(
        default="ghcr.io/kubetune/kubetune-trainer:0.1.0",
        description="Trainer image for jobs that do not name one.",
    )
    default_checkpoint_uri: Annotated[str, Field(pattern=STORAGE_URI_PATTERN, max_length=900)] | None = Field(
        default=None,
        description="Prefix for jobs without spec.checkpoint.uri: <prefix>/<namespace>/<name>.",
    )
    default_output_uri: Annotated[str, Field(pattern=STORAGE_URI_PATTERN, max_length=900)] | None = Field(
        default=None,
        description="Prefix for jobs without spec.output.uri: <prefix>/<namespace>/<name> "
        "(else <checkpoint.uri>/output).",
    )
    checkpoint_endpoint: Annotated[str, Field(pattern=ENDPOINT_PATTERN, max_length=512)] | None = Field(
        default=None, description="S3 endpoint for jobs that do not name one."
    )
    credentials_secret: Annotated[str, Field(pattern=DNS1123_SUBDOMAIN_PATTERN, max_length=253)] | None = Field(
        default=None, description="Secret (in the job's namespace) with S3 credentials for jobs that name none."
    )
    watch_namespaces: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Namespaces to watch (comma-separated or a JSON list); empty or 'all' means every namespace.",
    )
    metrics_port: Annotated[int, Field(ge=1, le=65535)] = Field(default=8080, description="Port of /metrics.")
    health_port: Annotated[int, Field(ge=1, le=65535)] = Field(default=8081, description="Port of /healthz.")
    trainer_metrics_port: Annotated[int, Field(ge=1, le=65535)] = Field(
        default=rt.DEFAULT_METRICS_PORT, description="Port of the trainer pods' named `metrics` port."
    )
    rendezvous_port: Annotated[int, Field(ge=1, le=65535)] = Field(
        default=rt.RENDEZVOUS_PORT, description="torch.distributed rendezvous port of the trainer pods."
    )
    progress_interval_seconds: Annotated[float, Field(gt=0.0, le=3600.0)] = Field(
        default=30.0, description="How often rank 0's metrics are read into status.progress."
    )
    resync_interval_seconds: Annotated[float, Field(gt=0.0, le=86400.0)] = Field(
        default=60.0, description="Level-based re-reconcile period of every unfinished job."
    )
    peering_name: Annotated[str, Field(pattern=DNS1123_SUBDOMAIN_PATTERN, max_length=253)] = Field(
        default="kubetune", description="kopf peering object shared by the operator's replicas."
    )
    peering_priority: int = Field(default=0, description="This replica's peering priority (distinct per replica).")
    standalone: bool = Field(default=False, description="Local runs: no API server, no peering.")

    @field_validator("watch_namespaces", mode="before")
    @classmethod
    def _split_namespaces(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                import json

                return json.loads(text)
            if text in ("", ALL_NAMESPACES, "*"):
                return []
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @field_validator("watch_namespaces")
    @classmethod
    def _check_namespaces(cls, value: list[str]) -> list[str]:
        if value == [ALL_NAMESPACES] or value == ["*"]:
            return []
        for namespace in value:
            if not _NAMESPACE_PATTERN.match(namespace) or len(namespace) > 63:
                raise ValueError(f"{namespace!r} is not a namespace name")
        return value

    @model_validator(mode="after")
    def _distinct_trainer_ports(self) -> OperatorSettings:
        if self.trainer_metrics_port == self.rendezvous_port:
            raise ValueError("KUBETUNE_TRAINER_METRICS_PORT and KUBETUNE_RENDEZVOUS_PORT must differ")
        return self

    @property
    def all_namespaces(self) -> bool:
        """True when the operator watches every namespace (cluster-wide peering)."""
        return not self.watch_namespaces


def load_settings(**overrides: Any) -> OperatorSettings:
    """Read the settings from the environment; a bad value raises :class:`SettingsError`
    naming the environment variable and what is wrong with it."""
    try:
        return OperatorSettings(**overrides)
    except ValidationError as error:
        problems = []
        for item in error.errors():
            field = str(item["loc"][0]) if item["loc"] else "?"
            problems.append(f"{ENV_PREFIX}{field.upper()}: {item['msg']}")
        raise SettingsError("invalid operator settings: " + "; ".join(problems)) from None
