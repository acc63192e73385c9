"""Pure desired-state builders: a FineTuneJob in, plain Kubernetes objects out.

``desired_children(resolved_job, attempt=n)`` returns exactly
``[config_map, service, attempt_job]`` as the API server wants them; the job
arrives resolved (:func:`kubetune_operator.resolve.load_job`), defaults filled in.  Nothing
here does I/O or reads the clock, so the output is a function of its inputs and
is pinned by golden YAML tests.

The pod command is a literal argv: spec values never reach a shell.  Everything
a pod needs (rendezvous address, config path, attempt) arrives as env values or
Kubernetes ``$(VAR)`` references; credentials only as ``secretKeyRef``.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from kubetune_operator import names
from kubetune_operator.resolve import ResolvedJob, pvc_claims
from kubetune_trainer.spec import API_VERSION, KIND
from kubetune_trainer.spec import layout as lay
from kubetune_trainer.spec import runtime as rt
from kubetune_trainer.spec._base import DNS1123_LABEL_PATTERN

METRICS_PORT_NAME = "metrics"
RENDEZVOUS_PORT_NAME = "rendezvous"
ENV_MASTER_ADDR = "KUBETUNE_MASTER_ADDR"
ENV_MASTER_PORT = "KUBETUNE_MASTER_PORT"
ENV_COMPLETION_INDEX = "JOB_COMPLETION_INDEX"
CREDENTIAL_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
OPTIONAL_CREDENTIAL_KEYS = ("HF_TOKEN",)
RUN_AS_USER = 1000
# NCCL and torch.distributed defaults for GPU clusters; spec.resources.env overrides any of them by name.
NCCL_DEFAULTS = (
    # A failed or timed-out collective tears the process down (so the pod fails and the gang restarts)
    # instead of leaving every rank hung in it.
    ("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1"),
    ("NCCL_ASYNC_ERROR_HANDLING", "1"),  # the same for torch releases before 2.2
    # The process-group timeout of deepspeed.init_distributed, in minutes: a hung collective fails within it.
    ("DEEPSPEED_TIMEOUT", "30"),
    # The watchdog kills a rank whose NCCL watchdog thread itself hangs.
    ("TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC", "600"),
    ("NCCL_DEBUG", "WARN"),
)
TMP_DIR = rt.TMP_DIR
SHM_DIR = rt.SHM_DIR
CONFIG_PATH = f"{rt.CONFIG_MOUNT_DIR}/{rt.CONFIG_FILE_NAME}"
_DNS1123_LABEL = re.compile(DNS1123_LABEL_PATTERN)


def trainer_config(resolved: ResolvedJob) -> dict[str, Any]:
    """The trainer's config file content: the resolved FineTuneJob without status and
    without server-side metadata (so the ConfigMap does not change on every write)."""
    job = resolved.job
    metadata: dict[str, Any] = {"name": job.metadata.name}
    if job.metadata.namespace:
        metadata["namespace"] = job.metadata.namespace
    wire: dict[str, Any] = job.model_dump(mode="json", by_alias=True, exclude_none=True, exclude={"status"})
    wire["metadata"] = metadata
    return wire


def owner_references(job: ResolvedJob) -> list[dict[str, Any]]:
    """Owner reference to the FineTuneJob (cascade deletion); empty when it has no uid yet."""
    uid = job.uid
    if not uid:
        return []
    return [
        {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "name": job.name,
            "uid": uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]


def _metadata(job: ResolvedJob, name: str, attempt: int, extra_labels: dict[str, str] | None = None) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name}
    if job.job.metadata.namespace:
        metadata["namespace"] = job.job.metadata.namespace
    metadata["labels"] = {**names.standard_labels(job.name, attempt), **(extra_labels or {})}
    owners = owner_references(job)
    if owners:
        metadata["ownerReferences"] = owners
    return metadata


def build_config_map(job: ResolvedJob, attempt: int) -> dict[str, Any]:
    """The ConfigMap with ``job.json`` (the resolved FineTuneJob) for the trainer."""
    text = json.dumps(trainer_config(job), indent=2, sort_keys=True) + "\n"
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(job, names.config_map_name(job.name), attempt),
        "data": {rt.CONFIG_FILE_NAME: text},
    }


def build_service(job: ResolvedJob, attempt: int) -> dict[str, Any]:
    """The headless Service that gives every pod a stable DNS name for rendezvous.

    Not-ready addresses are published because rendezvous happens before any pod is ready."""
    name = job.name
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(job, names.service_name(name), attempt),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": names.trainer_pod_selector(name),
            "ports": [
                {"name": RENDEZVOUS_PORT_NAME, "port": job.rendezvous_port, "targetPort": job.rendezvous_port},
                {"name": METRICS_PORT_NAME, "port": job.metrics_port, "targetPort": job.metrics_port},
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
        """``pvc-<claim>``; a claim name that is no DNS-1123 label that way (a dot, too long) gets a
        shortened, dot-free name with a hash of the claim, so that two claims never share a volume."""
        plain = f"pvc-{self.claim}"
        if _DNS1123_LABEL.match(plain):
            return plain
        digest = hashlib.sha256(self.claim.encode()).hexdigest()[:8]
        stem = plain.replace(".", "-")[:54].rstrip("-")
        return f"{stem}-{digest}"

    @property
    def mount_path(self) -> str:
        return lay.pvc_mount_path(self.claim)


def pvc_mounts(job: ResolvedJob) -> list[PvcMount]:
    """The claims the pods mount: inputs read-only, checkpoint/output claims writable."""
    return [PvcMount(claim, read_only) for claim, read_only in pvc_claims(job).items()]


def _quantities(values: dict[str, int | str]) -> dict[str, str]:
    return {key: str(value) for key, value in sorted(values.items())}


def _resources(job: ResolvedJob) -> dict[str, Any]:
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


def _env(job: ResolvedJob, attempt: int) -> list[dict[str, Any]]:
    name = job.name
    env: list[dict[str, Any]] = [
        {"name": ENV_COMPLETION_INDEX, "valueFrom": {"fieldRef": {"fieldPath": names.completion_index_field_path()}}},
        {"name": ENV_MASTER_ADDR, "value": names.master_address(name, attempt)},
        {"name": ENV_MASTER_PORT, "value": str(job.rendezvous_port)},
        {"name": rt.ENV_CONFIG, "value": CONFIG_PATH},
        {"name": rt.ENV_METRICS_PORT, "value": str(job.metrics_port)},
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
    if job.uid:
        env.append({"name": rt.ENV_JOB_UID, "value": job.uid})
    secret = job.spec.checkpoint.credentials_secret
    if secret:
        for key in CREDENTIAL_KEYS:
            env.append({"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}})
        for key in OPTIONAL_CREDENTIAL_KEYS:
            env.append({"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key, "optional": True}}})
    user = [entry.model_dump(mode="json", by_alias=True, exclude_none=True) for entry in job.spec.resources.env]
    chosen = {entry["name"] for entry in user}
    env.extend({"name": name, "value": value} for name, value in NCCL_DEFAULTS if name not in chosen)
    # Last, so that a $(VAR) reference in a user value can use every variable above.
    return env + user


def launcher_argv(job: ResolvedJob) -> tuple[list[str], list[str]]:
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


def _volumes(job: ResolvedJob, pvcs: list[PvcMount]) -> list[dict[str, Any]]:
    """The config, shared-memory, work and tmp volumes, the pvc:// claims, then the spec's extra volumes."""
    resources = job.spec.resources
    return [
        {
            "name": "config",
            "configMap": {
                "name": names.config_map_name(job.name),
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
        *(volume.to_wire() for volume in resources.volumes),
    ]


def _scheduling(job: ResolvedJob) -> dict[str, Any]:
    """Where the pods may run, as the spec says: account, priority, node selector, tolerations,
    affinity, topology spread."""
    resources = job.spec.resources
    pod: dict[str, Any] = {}
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
    if resources.affinity is not None:
        pod["affinity"] = resources.affinity.to_wire()
    if resources.topology_spread_constraints:
        pod["topologySpreadConstraints"] = [t.to_wire() for t in resources.topology_spread_constraints]
    return pod


def _pod_spec(job: ResolvedJob, attempt: int) -> dict[str, Any]:
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
        *(mount.to_wire() for mount in resources.volume_mounts),
    ]
    container: dict[str, Any] = {
        "name": names.CONTAINER_NAME,
        "image": resources.image,
        "imagePullPolicy": "IfNotPresent",
        "command": command,
        "args": args,
        "env": _env(job, attempt),
        "ports": [
            {"name": METRICS_PORT_NAME, "containerPort": job.metrics_port, "protocol": "TCP"},
            {"name": RENDEZVOUS_PORT_NAME, "containerPort": job.rendezvous_port, "protocol": "TCP"},
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
    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        "subdomain": names.service_name(job.name),
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
        "volumes": _volumes(job, pvcs),
    }
    pod.update(_scheduling(job))
    return pod


def _pod_metadata(job: ResolvedJob, attempt: int) -> dict[str, Any]:
    """The pods' labels (the user's, then ours, which the spec cannot override) and annotations."""
    resources = job.spec.resources
    metadata: dict[str, Any] = {
        "labels": {**dict(sorted(resources.pod_labels.items())), **names.standard_labels(job.name, attempt)}
    }
    if resources.pod_annotations:
        metadata["annotations"] = dict(sorted(resources.pod_annotations.items()))
    return metadata


def build_attempt_job(job: ResolvedJob, attempt: int) -> dict[str, Any]:
    """The Indexed batch/v1 Job running attempt ``attempt`` as one gang.

    ``backoffLimit: 0`` plus a podFailurePolicy that fails the Job on any container
    failure or disruption: a torch gang cannot lose a rank, so the operator restarts
    the whole gang as a new attempt instead.  ``podReplacementPolicy: Failed`` never
    lets two pods hold one index (rendezvous would break)."""
    spec = job.spec
    nodes = spec.resources.nodes
    name = job.name
    queued = bool(spec.queue_name)
    extra = {names.KUEUE_QUEUE_LABEL: spec.queue_name} if spec.queue_name else {}
    job_spec: dict[str, Any] = {
        "completionMode": "Indexed",
        "completions": nodes,
        "parallelism": nodes,
        "backoffLimit": 0,
        "podReplacementPolicy": "Failed",
        "podFailurePolicy": {
            # A disruption first: the Job's failure message then names it whatever the evicted pod exited
            # with (the pod itself is deleted and may be gone before the operator reads it).
            "rules": [
                {"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
                {
                    "action": "FailJob",
                    "onExitCodes": {"containerName": names.CONTAINER_NAME, "operator": "NotIn", "values": [0]},
                },
            ]
        },
        "suspend": queued or spec.run_policy.suspend,
        "template": {
            "metadata": _pod_metadata(job, attempt),
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


def desired_children(job: ResolvedJob, *, attempt: int) -> list[dict[str, Any]]:
    """``[config_map, service, attempt_job]`` for ``attempt`` of the resolved ``job``."""
    return [
        build_config_map(job, attempt),
        build_service(job, attempt),
        build_attempt_job(job, attempt),
    ]
