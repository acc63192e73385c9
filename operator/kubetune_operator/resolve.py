"""Parse a FineTuneJob and fill in the operator's defaults, once (pure).

:func:`load_job` is the one way from an object as read from the API server (or a
manifest file) to a :class:`ResolvedJob`: the reconcile, the progress timer,
``kubetune render`` and ``kubetune run`` (with local settings) all go through it,
and everything downstream — the state machine, the builders, the status writers —
takes the :class:`ResolvedJob` it returns instead of resolving again.  The URIs
derived from a job come from :mod:`kubetune_trainer.spec.layout`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from kubetune_operator.settings import OperatorSettings
from kubetune_trainer.spec import API_VERSION, KIND, FineTuneJob, FineTuneJobSpec
from kubetune_trainer.spec import layout as lay
from kubetune_trainer.spec import runtime as rt
from kubetune_trainer.spec._base import DNS1123_SUBDOMAIN_PATTERN

DEFAULT_NAMESPACE = "default"
_SUBDOMAIN = re.compile(DNS1123_SUBDOMAIN_PATTERN)


class InvalidSpec(ValueError):  # noqa: N818 (named after the condition reason it becomes)
    """A FineTuneJob that cannot be run; ``field`` is the offending field path."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.message = message


@dataclass(frozen=True)
class ResolvedJob:
    """A FineTuneJob with every operator default filled in (image, checkpoint and output URIs,
    endpoint, credentials Secret, processes per node).  Made by :func:`resolve_job` only."""

    job: FineTuneJob
    metrics_port: int = rt.DEFAULT_METRICS_PORT  # the trainer pods' `metrics` port (KUBETUNE_TRAINER_METRICS_PORT)
    rendezvous_port: int = rt.RENDEZVOUS_PORT  # torch.distributed rendezvous (KUBETUNE_RENDEZVOUS_PORT)

    @property
    def name(self) -> str:
        """``metadata.name``."""
        return self.job.metadata.name

    @property
    def namespace(self) -> str:
        """``metadata.namespace``, or ``default``."""
        return self.job.metadata.namespace or DEFAULT_NAMESPACE

    @property
    def spec(self) -> FineTuneJobSpec:
        """The resolved spec."""
        return self.job.spec

    @property
    def uid(self) -> str | None:
        """``metadata.uid`` once the API server assigned one."""
        value = (self.job.metadata.model_extra or {}).get("uid")
        return str(value) if value else None

    @property
    def generation(self) -> int | None:
        """``metadata.generation`` as the API server counts it."""
        value = (self.job.metadata.model_extra or {}).get("generation")
        return value if isinstance(value, int) else None

    @property
    def checkpoint_uri(self) -> str:
        """The checkpoint root (always set once resolved)."""
        uri = self.job.spec.checkpoint.uri
        assert uri is not None, "resolve_job sets spec.checkpoint.uri"
        return uri

    @property
    def output_uri(self) -> str:
        """Where the model is published (always set once resolved)."""
        uri = self.job.spec.output.uri
        assert uri is not None, "resolve_job sets spec.output.uri"
        return uri

    def checkpoint_step_uri(self, step: int) -> str:
        """The step folder of checkpoint ``step``: what ``status.checkpoint.uri`` shows."""
        return lay.checkpoint_step_uri(self.checkpoint_uri, step)


def parse_job(body: dict[str, Any]) -> FineTuneJob:
    """Validate an object as read from the API server (its status is ignored).

    Raises :class:`InvalidSpec` naming the first bad field, e.g. when the CRD was
    installed without its schema and the API server accepted anything."""
    manifest = {key: body.get(key) for key in ("apiVersion", "kind", "metadata", "spec")}
    manifest.setdefault("apiVersion", API_VERSION)
    manifest.setdefault("kind", KIND)
    try:
        return FineTuneJob.from_manifest(manifest)
    except ValidationError as error:
        first = error.errors()[0]
        context = first.get("ctx") or {}
        if "path" in context:
            raise InvalidSpec(str(context["path"]), str(context.get("message", first["msg"]))) from None
        field = ".".join(str(part) for part in first["loc"])
        raise InvalidSpec(field, first["msg"]) from None


def resolve_job(job: FineTuneJob, settings: OperatorSettings) -> ResolvedJob:
    """The job with the operator's defaults filled in: image, checkpoint URI, endpoint,
    credentials Secret and output URI.  Idempotent.  Raises :class:`InvalidSpec` when a
    default is missing or a ``pvc://`` URI names no valid claim."""
    spec = job.spec
    namespace = job.metadata.namespace or DEFAULT_NAMESPACE
    checkpoint = spec.checkpoint
    uri = checkpoint.uri
    if uri is None:
        if settings.default_checkpoint_uri is None:
            raise InvalidSpec(
                "spec.checkpoint.uri",
                "not set, and the operator has no default (KUBETUNE_DEFAULT_CHECKPOINT_URI)",
            )
        uri = lay.job_uri(settings.default_checkpoint_uri, namespace, job.metadata.name)
    remote = uri.startswith("s3://")
    checkpoint = checkpoint.model_copy(
        update={
            "uri": uri,
            "endpoint": checkpoint.endpoint or (settings.checkpoint_endpoint if remote else None),
            "credentials_secret": checkpoint.credentials_secret or (settings.credentials_secret if remote else None),
        }
    )
    output_uri = spec.output.uri
    if output_uri is None:
        output_uri = (
            lay.job_uri(settings.default_output_uri, namespace, job.metadata.name)
            if settings.default_output_uri
            else lay.default_output_uri(uri)
        )
    output = spec.output.model_copy(update={"uri": output_uri})
    resources = spec.resources.model_copy(
        update={
            "image": spec.resources.image or settings.default_image,
            "processes_per_node": spec.resources.processes(),
        }
    )
    new_spec = spec.model_copy(update={"checkpoint": checkpoint, "output": output, "resources": resources})
    resolved = ResolvedJob(
        job.model_copy(update={"spec": new_spec}),
        metrics_port=settings.trainer_metrics_port,
        rendezvous_port=settings.rendezvous_port,
    )
    pvc_claims(resolved)
    return resolved


def load_job(body: dict[str, Any], settings: OperatorSettings) -> ResolvedJob:
    """:func:`parse_job` then :func:`resolve_job`: an API object (or manifest) to a runnable job."""
    return resolve_job(parse_job(body), settings)


def pvc_claims(job: ResolvedJob) -> dict[str, bool]:
    """Claim name → read-only, of every ``pvc://`` URI of the job: inputs read-only, the
    checkpoint and output claims writable.  InvalidSpec names a URI whose claim is no valid name."""
    spec = job.spec
    sources = [
        ("spec.model.source", spec.model.source, True),
        ("spec.dataset.train", spec.dataset.train, True),
        ("spec.dataset.validation", spec.dataset.validation, True),
        ("spec.checkpoint.uri", spec.checkpoint.uri, False),
        ("spec.output.uri", spec.output.uri, False),
    ]
    claims: dict[str, bool] = {}
    for field, uri, read_only in sources:
        claim = lay.pvc_claim(uri) if uri else None
        if claim is None:
            continue
        if not claim or len(claim) > 253 or not _SUBDOMAIN.match(claim):
            raise InvalidSpec(field, f"{claim!r} is not a PersistentVolumeClaim name")
        claims[claim] = claims.get(claim, True) and read_only
    return dict(sorted(claims.items()))
