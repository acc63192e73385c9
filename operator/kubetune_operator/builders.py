"""Pure desired-state builders: a FineTuneJob in, plain Kubernetes objects out.

``desired_children(job, settings, attempt=n)`` returns exactly
``[config_map, service, attempt_job]`` as the API server wants them.  Nothing
here does I/O or reads the clock, so the output is a function of its inputs and
is pinned by golden YAML tests.

The pod command is a literal argv: spec values never reach a shell.  Everything
a pod needs (rendezvous address, config path, attempt) arrives as env values or
Kubernetes ``$(VAR)`` references; credentials only as ``secretKeyRef``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from kubetune_operator import names
from kubetune_operator.settings import OperatorSettings
from kubetune_trainer.spec import API_VERSION, KIND, FineTuneJob
from kubetune_trainer.spec import runtime as rt
from kubetune_trainer.spec._base import DNS1123_SUBDOMAIN_PATTERN

LABEL_NAME = "app.kubernetes.io/name"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_JOB_NAME = "kubetune.io/job-name"
LABEL_ATTEMPT = "kubetune.io/attempt"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
MANAGED_BY = "kubetune-operator"

CONTAINER_NAME = "trainer"
METRICS_PORT_NAME = "metrics"
RENDEZVOUS_PORT_NAME = "rendezvous"
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
ENV_MASTER_ADDR = "KUBETUNE_MASTER_ADDR"
ENV_MASTER_PORT = "KUBETUNE_MASTER_PORT"
ENV_COMPLETION_INDEX = "JOB_COMPLETION_INDEX"
CREDENTIAL_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
OPTIONAL_CREDENTIAL_KEYS = ("HF_TOKEN",)
RUN_AS_USER = 1000
TMP_DIR = "/tmp"  # noqa: S108 (a container path backed by its own emptyDir)
SHM_DIR = "/dev/shm"  # noqa: S108 (a container path backed by an in-memory emptyDir)
CONFIG_PATH = f"{rt.CONFIG_MOUNT_DIR}/{rt.CONFIG_FILE_NAME}"

_SUBDOMAIN = __import__("re").compile(DNS1123_SUBDOMAIN_PATTERN)


class InvalidSpec(ValueError):  # noqa: N818 (named after the condition reason it becomes)
    """A FineTuneJob that cannot be run; ``field`` is the offending field path."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.message = message


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


def _namespace(job: FineTuneJob) -> str:
    return job.metadata.namespace or "default"


def resolve_job(job: FineTuneJob, settings: OperatorSettings) -> FineTuneJob:
    """The job with the operator's defaults filled in: image, checkpoint URI, endpoint,
    credentials Secret and output URI.  Idempotent."""
    spec = job.spec
    where = f"{_namespace(job)}/{job.metadata.name}"
    checkpoint = spec.checkpoint
    uri = checkpoint.uri
    if uri is None:
        if settings.default_checkpoint_uri is None:
            raise InvalidSpec(
                "spec.checkpoint.uri",
                "not set, and the operator has no default (KUBETUNE_DEFAULT_CHECKPOINT_URI)",
            )
        uri = f"{settings.default_checkpoint_uri.rstrip('/')}/{where}"
    checkpoint = checkpoint.model_copy(
        update={
            "uri": uri,
            "endpoint": checkpoint.endpoint or (settings.checkpoint_endpoint if uri.startswith("s3://") else None),
            "credentials_secret": checkpoint.credentials_secret
            or (settings.credentials_secret if uri.startswith("s3://") else None),
        }
    )
    output_uri = spec.output.uri
    if output_uri is None:
        output_uri = (
            f"{settings.default_output_uri.rstrip('/')}/{where}" if settings.default_output_uri else f"{uri}/output"
        )
    output = spec.output.model_copy(update={"uri": output_uri})
    resources = spec.resources.model_copy(
        update={
            "image": spec.resources.image or settings.default_image,
            "processes_per_node": spec.resources.processes(),
        }
    )
    new_spec = spec.model_copy(update={"checkpoint": checkpoint, "output": output, "resources": resources})
    return job.model_copy(update={"spec": new_spec})


def trainer_config(job: FineTuneJob) -> dict[str, Any]:
    """The trainer's config file content: the resolved FineTuneJob without status and
    without server-side metadata (so the ConfigMap does not change on every write)."""
    metadata: dict[str, Any] = {"name": job.metadata.name}
    if job.metadata.namespace:
        metadata["namespace"] = job.metadata.namespace
    wire: dict[str, Any] = job.model_dump(mode="json", by_alias=True, exclude_none=True, exclude={"status"})
    wire["metadata"] = metadata
    return wire


def standard_labels(name: str, attempt: int) -> dict[str, str]:
    """The labels on everything the operator creates for job ``name``."""
    return {
        LABEL_NAME: "kubetune",
        LABEL_COMPONENT: "trainer",
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_INSTANCE: name,
        LABEL_JOB_NAME: name,
        LABEL_ATTEMPT: str(attempt),
    }


def owner_references(job: FineTuneJob) -> list[dict[str, Any]]:
    """Owner reference to the FineTuneJob (cascade deletion); empty when it has no uid yet."""
    uid = (job.metadata.model_extra or {}).get("uid")
    if not uid:
        return []
    return [
        {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "name": job.metadata.name,
            "uid": uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]


def _metadata(job: FineTuneJob, name: str, attempt: int, extra_labels: dict[str, str] | None = None) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name}
    if job.metadata.namespace:
        metadata["namespace"] = job.metadata.namespace
    metadata["labels"] = {**standard_labels(job.metadata.name, attempt), **(extra_labels or {})}
    owners = owner_references(job)
    if owners:
        metadata["ownerReferences"] = owners
    return metadata


def build_config_map(job: FineTuneJob, attempt: int) -> dict[str, Any]:
    """The ConfigMap with ``job.json`` (the resolved FineTuneJob) for the trainer."""
    text = json.dumps(trainer_config(job), indent=2, sort_keys=True) + "\n"
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(job, names.config_map_name(job.metadata.name), attempt),
        "data": {rt.CONFIG_FILE_NAME: text},
    }


def build_service(job: FineTuneJob, attempt: int) -> dict[str, Any]:
    """The headless Service that gives every pod a stable DNS name for rendezvous.

    Not-ready addresses are published because rendezvous happens before any pod is ready."""
    name = job.metadata.name
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(job, names.service_name(name), attempt),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {LABEL_JOB_NAME: name, LABEL_COMPONENT: "trainer"},
            "ports": [
                {"name": RENDEZVOUS_PORT_NAME, "port": rt.RENDEZVOUS_PORT, "targetPort": rt.RENDEZVOUS_PORT},
                {"name": METRICS_PORT_NAME, "port": rt.DEFAULT_METRICS_PORT, "targetPort": rt.DEFAULT_METRICS_PORT},
            ],
        },
    }


@dataclass(frozen=True)
class PvcMount:
    """A PersistentVolumeClaim named by a pvc:// URI of the spec."""

    claim: str
    read_only: bool

    @property
    def volume_name(self) -> str:
        return f"pvc-{self.claim}"[:63].rstrip("-.")

    @property
    def mount_path(self) -> str:
        return f"{rt.DEFAULT_PVC_ROOT}/{self.claim}"


def pvc_mounts(job: FineTuneJob) -> list[PvcMount]:
    """The claims the pods mount: inputs read-only, checkpoint/output claims writable."""
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
        if not uri or not uri.startswith("pvc://"):
            continue
        claim = uri[len("pvc://") :].split("/", 1)[0]
        if not claim or len(claim) > 253 or not _SUBDOMAIN.match(claim):
            raise InvalidSpec(field, f"{claim!r} is not a PersistentVolumeClaim name")
        claims[claim] = claims.get(claim, True) and read_only
    return [PvcMount(claim, read_only) for claim, read_only in sorted(claims.items())]


def _quantities(values: dict[str, int | str]) -> dict[str, str]:
    return {key: str(value) for key, value in sorted(values.items())}


def _resources(job: FineTuneJob) -> dict[str, Any]:
    spec = job.spec.resources
    requests = _quantities(spec.requests)
    limits = _quantities(spec.limits)
    # Extended resources (GPUs) must have limit == request; default the limit to the request.
    for key, value in requests.items():
        if "/" in key and key not in limits:
            limits[key] = value
    resources: dict[str, Any] = {}
    if requests:
        resources["requests"] = requests
    if limits:
        resources["limits"] = limits
    return resources


def _env(job: FineTuneJob, attempt: int) -> list[dict[str, Any]]:
    name = job.metadata.name
    env: list[dict[str, Any]] = [
        {
            "name": ENV_COMPLETION_INDEX,
            "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"}},
        },
        {"name": ENV_MASTER_ADDR, "value": names.master_address(name, attempt)},
        {"name": ENV_MASTER_PORT, "value": str(rt.RENDEZVOUS_PORT)},
        {"name": rt.ENV_CONFIG, "value": CONFIG_PATH},
        {"name": rt.ENV_METRICS_PORT, "value": str(rt.DEFAULT_METRICS_PORT)},
        {"name": rt.ENV_WORK_DIR, "value": rt.DEFAULT_WORK_DIR},
        {"name": rt.ENV_TERMINATION_LOG, "value": rt.DEFAULT_TERMINATION_LOG},
        {"name": rt.ENV_ATTEMPT, "value": str(attempt)},
        {"name": rt.ENV_PVC_ROOT, "value": rt.DEFAULT_PVC_ROOT},
        # The root filesystem is read-only: caches and home live on the work volume.
        {"name": "HOME", "value": rt.DEFAULT_WORK_DIR},
        {"name": "HF_HOME", "value": f"{rt.DEFAULT_WORK_DIR}/.cache/huggingface"},
        {"name": "TMPDIR", "value": TMP_DIR},
        # Several S3-compatible stores reject the checksums boto3 >= 1.36 sends by default.
        {"name": "AWS_REQUEST_CHECKSUM_CALCULATION", "value": "when_required"},
        {"name": "AWS_RESPONSE_CHECKSUM_VALIDATION", "value": "when_required"},
    ]
    secret = job.spec.checkpoint.credentials_secret
    if secret:
        for key in CREDENTIAL_KEYS:
            env.append({"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}})
        for key in OPTIONAL_CREDENTIAL_KEYS:
            env.append({"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key, "optional": True}}})
    return env


def launcher_argv(job: FineTuneJob) -> tuple[list[str], list[str]]:
    """``(command, args)`` of the trainer container: the launcher with literal flags.

    ``$(VAR)`` is expanded by Kubernetes from the container's env, not by a shell."""
    resources = job.spec.resources
    command = ["python", "-m", "kubetune_trainer.launch"]
    args = [
        f"--nnodes={resources.nodes}",
        f"--nproc-per-node={resources.processes()}",
        f"--node-rank=$({ENV_COMPLETION_INDEX})",
        f"--master-addr=$({ENV_MASTER_ADDR})",
        f"--master-port=$({ENV_MASTER_PORT})",
        "-m",
        rt.TRAINER_MODULE,
        "--config",
        CONFIG_PATH,
    ]
    return command, args


def _pod_spec(job: FineTuneJob, attempt: int) -> dict[str, Any]:
    spec = job.spec
    resources = spec.resources
    pvcs = pvc_mounts(job)
    command, args = launcher_argv(job)
    mounts: list[dict[str, Any]] = [
        {"name": "config", "mountPath": rt.CONFIG_MOUNT_DIR, "readOnly": True},
        {"name": "shm", "mountPath": SHM_DIR},
        {"name": "work", "mountPath": rt.DEFAULT_WORK_DIR},
        {"name": "tmp", "mountPath": TMP_DIR},
        *({"name": p.volume_name, "mountPath": p.mount_path, "readOnly": p.read_only} for p in pvcs),
    ]
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": resources.image,
        "imagePullPolicy": "IfNotPresent",
        "command": command,
        "args": args,
        "env": _env(job, attempt),
        "ports": [
            {"name": METRICS_PORT_NAME, "containerPort": rt.DEFAULT_METRICS_PORT, "protocol": "TCP"},
            {"name": RENDEZVOUS_PORT_NAME, "containerPort": rt.RENDEZVOUS_PORT, "protocol": "TCP"},
        ],
        "resources": _resources(job),
        "volumeMounts": mounts,
        "terminationMessagePath": rt.DEFAULT_TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_USER,
            "runAsGroup": RUN_AS_USER,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    volumes: list[dict[str, Any]] = [
        {
            "name": "config",
            "configMap": {
                "name": names.config_map_name(job.metadata.name),
                "items": [{"key": rt.CONFIG_FILE_NAME, "path": rt.CONFIG_FILE_NAME}],
            },
        },
        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": str(resources.shm_size)}},
        {"name": "work", "emptyDir": {}},
        {"name": "tmp", "emptyDir": {}},
        *(
            {"name": p.volume_name, "persistentVolumeClaim": {"claimName": p.claim, "readOnly": p.read_only}}
            for p in pvcs
        ),
    ]
    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        "subdomain": names.service_name(job.metadata.name),
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": spec.run_policy.termination_grace_period_seconds,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_USER,
            "runAsGroup": RUN_AS_USER,
            "fsGroup": RUN_AS_USER,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
    }
    if resources.service_account_name:
        pod["serviceAccountName"] = resources.service_account_name
    if resources.priority_class_name:
        pod["priorityClassName"] = resources.priority_class_name
    if resources.node_selector:
        pod["nodeSelector"] = dict(sorted(resources.node_selector.items()))
    if resources.tolerations:
        pod["tolerations"] = [
            t.model_dump(mode="json", by_alias=True, exclude_none=True) for t in resources.tolerations
        ]
    return pod


def build_attempt_job(job: FineTuneJob, attempt: int) -> dict[str, Any]:
    """The Indexed batch/v1 Job running attempt ``attempt`` as one gang.

    ``backoffLimit: 0`` plus a podFailurePolicy that fails the Job on any container
    failure or disruption: a torch gang cannot lose a rank, so the operator restarts
    the whole gang as a new attempt instead.  ``podReplacementPolicy: Failed`` never
    lets two pods hold one index (rendezvous would break)."""
    spec = job.spec
    nodes = spec.resources.nodes
    name = job.metadata.name
    queued = bool(spec.queue_name)
    extra = {KUEUE_QUEUE_LABEL: spec.queue_name} if spec.queue_name else {}
    job_spec: dict[str, Any] = {
        "completionMode": "Indexed",
        "completions": nodes,
        "parallelism": nodes,
        "backoffLimit": 0,
        "podReplacementPolicy": "Failed",
        "podFailurePolicy": {
            "rules": [
                {
                    "action": "FailJob",
                    "onExitCodes": {"containerName": CONTAINER_NAME, "operator": "NotIn", "values": [0]},
                },
                {"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            ]
        },
        "suspend": queued or spec.run_policy.suspend,
        "template": {
            "metadata": {"labels": standard_labels(name, attempt)},
            "spec": _pod_spec(job, attempt),
        },
    }
    if spec.run_policy.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = spec.run_policy.active_deadline_seconds
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _metadata(job, names.job_name_for(name, attempt), attempt, extra),
        "spec": job_spec,
    }


def desired_children(job: FineTuneJob, settings: OperatorSettings, *, attempt: int) -> list[dict[str, Any]]:
    """``[config_map, service, attempt_job]`` for ``attempt`` of ``job`` (defaults resolved)."""
    resolved = resolve_job(job, settings)
    return [
        build_config_map(resolved, attempt),
        build_service(resolved, attempt),
        build_attempt_job(resolved, attempt),
    ]
