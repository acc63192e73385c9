"""Pod settings GPU clusters need, under ``spec.resources``: env, labels, annotations, scheduling, volumes.

A subset of the Kubernetes Pod API, typed so that ``kubectl explain`` documents it and a bad
value is named by its field: env entries take a literal value or a ``secretKeyRef`` only
(credentials never inline), volumes are limited to the types the Pod Security Standard
"restricted" allows, and nothing here can replace what the operator sets itself (its labels,
annotations, environment variables, volumes and mount paths).  The rules that tie these fields
together live on :class:`~kubetune_trainer.spec.resources.ResourcesSpec`.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field

from kubetune_trainer.spec import runtime as rt
from kubetune_trainer.spec import volumes as vol
from kubetune_trainer.spec._base import (
    DNS1123_LABEL_PATTERN,
    DNS1123_SUBDOMAIN_PATTERN,
    LABEL_KEY_PATTERN,
    LABEL_VALUE_PATTERN,
    KubeModel,
    Rule,
    cel_list,
)

ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
SECRET_KEY_PATTERN = r"^[-._a-zA-Z0-9]+$"  # noqa: S105 (a key-name pattern, not a password)

# What the operator owns and a spec may not set or replace.
RESERVED_ENV_PREFIX = "KUBETUNE_"
RESERVED_ENV_NAMES = ("JOB_COMPLETION_INDEX",)
# Names that look like credentials must come from a Secret (RE2 and Python agree on this pattern).
CREDENTIAL_ENV_PATTERN = "(?i)(SECRET|PASSWORD|PASSWD|TOKEN|ACCESS_KEY|API_KEY|CREDENTIAL|PRIVATE_KEY)"
RESERVED_LABEL_PREFIXES = ("app.kubernetes.io/", "kubetune.io/", "batch.kubernetes.io/", "kueue.x-k8s.io/")
RESERVED_LABELS = ("job-name", "controller-uid")  # the Job controller's legacy pod labels
RESERVED_ANNOTATION_PREFIXES = ("kubetune.io/", "batch.kubernetes.io/")
RESERVED_VOLUME_NAMES = ("config", "shm", "work", "tmp")
RESERVED_VOLUME_PREFIX = "pvc-"  # the operator's pvc:// claims
RESERVED_MOUNT_PATHS = (
    rt.CONFIG_MOUNT_DIR,
    rt.SHM_DIR,
    rt.DEFAULT_WORK_DIR,
    rt.TMP_DIR,
    rt.DEFAULT_PVC_ROOT,
    rt.DEFAULT_TERMINATION_LOG,
)

LabelKey = Annotated[str, Field(pattern=LABEL_KEY_PATTERN, max_length=317)]
LabelValue = Annotated[str, Field(pattern=LABEL_VALUE_PATTERN, max_length=63)]
ObjectName = Annotated[str, Field(pattern=DNS1123_SUBDOMAIN_PATTERN, max_length=253)]


# ---------------------------------------------------------------------------------------------- env


class SecretKeySelector(KubeModel):
    """One key of a Secret in the job's namespace."""

    name: ObjectName = Field(description="Name of the Secret.")
    key: Annotated[str, Field(pattern=SECRET_KEY_PATTERN, max_length=253)] = Field(description="Key in the Secret.")
    optional: bool | None = Field(default=None, description="Start the pod even when the Secret or key is missing.")


class EnvVarSource(KubeModel):
    """Where a variable's value comes from: a Secret key (the only source allowed)."""

    secret_key_ref: SecretKeySelector = Field(description="A key of a Secret in the job's namespace.")


class EnvVar(KubeModel):
    """An environment variable of the trainer container (e.g. NCCL or RDMA tuning)."""

    name: Annotated[str, Field(pattern=ENV_NAME_PATTERN, max_length=256)] = Field(
        description="Variable name; KUBETUNE_* and JOB_COMPLETION_INDEX belong to the operator."
    )
    value: Annotated[str, Field(max_length=32768)] | None = Field(
        default=None, description="A literal value (never a credential: use valueFrom.secretKeyRef)."
    )
    value_from: EnvVarSource | None = Field(default=None, description="The value from a Secret key.")


# ---------------------------------------------------------------------------------------- scheduling


class LabelSelectorRequirement(KubeModel):
    """A set-based label requirement."""

    key: LabelKey = Field(description="Label key.")
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"] = Field(description="In, NotIn, Exists, DoesNotExist.")
    values: Annotated[list[LabelValue], Field(max_length=64)] | None = Field(
        default=None, description="Values for In and NotIn."
    )


class LabelSelector(KubeModel):
    """A label query over pods."""

    match_labels: Annotated[dict[LabelKey, LabelValue], Field(max_length=32)] | None = Field(
        default=None, description="Labels a pod must carry."
    )
    match_expressions: Annotated[list[LabelSelectorRequirement], Field(max_length=32)] | None = Field(
        default=None, description="Set-based requirements."
    )


class NodeSelectorRequirement(KubeModel):
    """A requirement on a node's labels or fields."""

    key: LabelKey = Field(description="Label key (or field name for matchFields).")
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"] = Field(
        description="In, NotIn, Exists, DoesNotExist, Gt, Lt."
    )
    values: Annotated[list[LabelValue], Field(max_length=64)] | None = Field(default=None, description="Values.")


class NodeSelectorTerm(KubeModel):
    """Requirements ANDed together."""

    match_expressions: Annotated[list[NodeSelectorRequirement], Field(max_length=32)] | None = Field(
        default=None, description="Requirements on node labels."
    )
    match_fields: Annotated[list[NodeSelectorRequirement], Field(max_length=32)] | None = Field(
        default=None, description="Requirements on node fields."
    )


class NodeSelector(KubeModel):
    """Terms ORed together."""

    node_selector_terms: Annotated[list[NodeSelectorTerm], Field(min_length=1, max_length=32)] = Field(
        description="A node matches when it matches any term."
    )


class PreferredSchedulingTerm(KubeModel):
    """A weighted node preference."""

    weight: Annotated[int, Field(ge=1, le=100)] = Field(description="1-100.")
    preference: NodeSelectorTerm = Field(description="The preferred nodes.")


class NodeAffinity(KubeModel):
    """Which nodes the pods may or prefer to run on."""

    required_during_scheduling_ignored_during_execution: NodeSelector | None = Field(
        default=None, description="Nodes the pods must run on."
    )
    preferred_during_scheduling_ignored_during_execution: (
        Annotated[list[PreferredSchedulingTerm], Field(max_length=32)] | None
    ) = Field(default=None, description="Nodes the pods prefer.")


class PodAffinityTerm(KubeModel):
    """Pods (by label) whose topology domain this pod should (not) share."""

    label_selector: LabelSelector | None = Field(default=None, description="The pods this term is about.")
    namespaces: (
        Annotated[list[Annotated[str, Field(pattern=DNS1123_LABEL_PATTERN, max_length=63)]], Field(max_length=32)]
        | None
    ) = Field(default=None, description="Their namespaces (default: the job's).")
    namespace_selector: LabelSelector | None = Field(default=None, description="Their namespaces, by label.")
    topology_key: LabelKey = Field(description="Node label defining the domain, e.g. topology.kubernetes.io/zone.")
    match_label_keys: Annotated[list[LabelKey], Field(max_length=32)] | None = Field(
        default=None,
        description="Pod label keys whose values join the selector (e.g. the attempt label).",
    )
    mismatch_label_keys: Annotated[list[LabelKey], Field(max_length=32)] | None = Field(
        default=None, description="Pod label keys whose values must differ."
    )


class WeightedPodAffinityTerm(KubeModel):
    """A weighted pod (anti-)affinity preference."""

    weight: Annotated[int, Field(ge=1, le=100)] = Field(description="1-100.")
    pod_affinity_term: PodAffinityTerm = Field(description="The term.")


class PodAffinity(KubeModel):
    """Pod affinity or anti-affinity."""

    required_during_scheduling_ignored_during_execution: (
        Annotated[list[PodAffinityTerm], Field(max_length=32)] | None
    ) = Field(default=None, description="Terms that must hold.")
    preferred_during_scheduling_ignored_during_execution: (
        Annotated[list[WeightedPodAffinityTerm], Field(max_length=32)] | None
    ) = Field(default=None, description="Terms preferred.")


class Affinity(KubeModel):
    """Node and pod (anti-)affinity of the worker pods (e.g. one rack or one NVLink domain)."""

    node_affinity: NodeAffinity | None = Field(default=None, description="Node affinity.")
    pod_affinity: PodAffinity | None = Field(default=None, description="Pod affinity.")
    pod_anti_affinity: PodAffinity | None = Field(default=None, description="Pod anti-affinity.")


class TopologySpreadConstraint(KubeModel):
    """How the worker pods spread over topology domains."""

    max_skew: Annotated[int, Field(ge=1, le=4096)] = Field(description="Largest allowed difference between domains.")
    topology_key: LabelKey = Field(description="Node label defining the domain.")
    when_unsatisfiable: Literal["DoNotSchedule", "ScheduleAnyway"] = Field(
        description="DoNotSchedule or ScheduleAnyway."
    )
    label_selector: LabelSelector | None = Field(default=None, description="The pods counted in each domain.")
    min_domains: Annotated[int, Field(ge=1, le=4096)] | None = Field(default=None, description="Minimum domains.")
    node_affinity_policy: Literal["Honor", "Ignore"] | None = Field(default=None, description="Honor or Ignore.")
    node_taints_policy: Literal["Honor", "Ignore"] | None = Field(default=None, description="Honor or Ignore.")
    match_label_keys: Annotated[list[LabelKey], Field(max_length=32)] | None = Field(
        default=None,
        description="Pod label keys whose values join the selector (e.g. the attempt label).",
    )


def _starts_with_any(var: str, prefixes: tuple[str, ...]) -> str:
    return " || ".join(f"{var}.startsWith('{p}')" for p in prefixes)


def _source_count(var: str) -> str:
    return " + ".join(f"(has({var}.{name}) ? 1 : 0)" for name in vol.VOLUME_SOURCES)


def _env_rules() -> tuple[Rule, ...]:
    reserved_env = cel_list(RESERVED_ENV_NAMES)
    return (
        Rule(
            cel="!has(self.env) || self.env.all(e, has(e.value) != has(e.valueFrom))",
            message="each env entry needs exactly one of value and valueFrom.secretKeyRef",
            field="env",
            check=lambda r: all((e.value is None) != (e.value_from is None) for e in r.env),
        ),
        Rule(
            cel=(
                f"!has(self.env) || self.env.all(e, !e.name.startsWith('{RESERVED_ENV_PREFIX}') "
                f"&& !(e.name in {reserved_env}))"
            ),
            message=f"env names {RESERVED_ENV_PREFIX}* and {', '.join(RESERVED_ENV_NAMES)} are the operator's",
            field="env",
            check=lambda r: all(
                not e.name.startswith(RESERVED_ENV_PREFIX) and e.name not in RESERVED_ENV_NAMES for e in r.env
            ),
        ),
        Rule(
            cel=f"!has(self.env) || self.env.all(e, !has(e.value) || !e.name.matches('{CREDENTIAL_ENV_PATTERN}'))",
            message="a variable named like a credential (secret, password, token, key) must use valueFrom.secretKeyRef",
            field="env",
            check=lambda r: all(e.value is None or not re.search(CREDENTIAL_ENV_PATTERN, e.name) for e in r.env),
        ),
        Rule(
            cel=None,  # x-kubernetes-list-type: map makes the API server enforce it
            message="env names must be unique",
            field="env",
            check=lambda r: len({e.name for e in r.env}) == len(r.env),
        ),
    )


def _metadata_rules() -> tuple[Rule, ...]:
    return (
        Rule(
            cel=(
                "!has(self.podLabels) || self.podLabels.all(k, !("
                + _starts_with_any("k", RESERVED_LABEL_PREFIXES)
                + f") && !(k in {cel_list(RESERVED_LABELS)}))"
            ),
            message="podLabels may not set the operator's, Kubernetes' or Kueue's labels "
            f"({', '.join(p + '*' for p in RESERVED_LABEL_PREFIXES)}, {', '.join(RESERVED_LABELS)})",
            field="podLabels",
            check=lambda r: all(
                not k.startswith(RESERVED_LABEL_PREFIXES) and k not in RESERVED_LABELS for k in r.pod_labels
            ),
        ),
        Rule(
            cel="!has(self.podAnnotations) || self.podAnnotations.all(k, !("
            + _starts_with_any("k", RESERVED_ANNOTATION_PREFIXES)
            + "))",
            message="podAnnotations may not set "
            + ", ".join(p + "*" for p in RESERVED_ANNOTATION_PREFIXES)
            + " (the operator's and the Job controller's)",
            field="podAnnotations",
            check=lambda r: all(not k.startswith(RESERVED_ANNOTATION_PREFIXES) for k in r.pod_annotations),
        ),
    )


def _volume_rules() -> tuple[Rule, ...]:
    reserved_volumes = cel_list(RESERVED_VOLUME_NAMES)
    paths = RESERVED_MOUNT_PATHS
    path_clash = " || ".join(f"m.mountPath == '{p}' || m.mountPath.startsWith('{p}/')" for p in paths)
    return (
        Rule(
            cel="!has(self.volumes) || self.volumes.all(v, !has(v.hostPath))",
            message="hostPath volumes are not allowed (Pod Security 'restricted'): use persistentVolumeClaim, csi, "
            "ephemeral, emptyDir, configMap or secret",
            field="volumes",
            check=lambda r: all(v.host_path is None for v in r.volumes),
        ),
        Rule(
            cel=f"!has(self.volumes) || self.volumes.all(v, !has(v.hostPath) ? {_source_count('v')} == 1 : true)",
            message="each volume needs exactly one of " + ", ".join(vol.VOLUME_SOURCES),
            field="volumes",
            check=lambda r: all(v.host_path is not None or len(vol.volume_sources(v)) == 1 for v in r.volumes),
        ),
        Rule(
            cel=(
                f"!has(self.volumes) || self.volumes.all(v, !(v.name in {reserved_volumes}) "
                f"&& !v.name.startsWith('{RESERVED_VOLUME_PREFIX}'))"
            ),
            message=f"volume names {', '.join(RESERVED_VOLUME_NAMES)} and {RESERVED_VOLUME_PREFIX}* are the operator's",
            field="volumes",
            check=lambda r: all(
                v.name not in RESERVED_VOLUME_NAMES and not v.name.startswith(RESERVED_VOLUME_PREFIX) for v in r.volumes
            ),
        ),
        Rule(
            cel=None,  # x-kubernetes-list-type: map makes the API server enforce it
            message="volume names must be unique",
            field="volumes",
            check=lambda r: len({v.name for v in r.volumes}) == len(r.volumes),
        ),
        Rule(
            cel=(
                "!has(self.volumeMounts) || self.volumeMounts.all(m, "
                "has(self.volumes) && self.volumes.exists(v, v.name == m.name))"
            ),
            message="each volumeMount must name a volume of spec.resources.volumes",
            field="volumeMounts",
            check=lambda r: all(any(v.name == m.name for v in r.volumes) for m in r.volume_mounts),
        ),
        Rule(
            cel=f"!has(self.volumeMounts) || self.volumeMounts.all(m, !({path_clash}))",
            message="volumeMounts may not use the operator's paths (" + ", ".join(paths) + ")",
            field="volumeMounts",
            check=lambda r: all(not any(vol.under(m.mount_path, p) for p in paths) for m in r.volume_mounts),
        ),
        Rule(
            cel=None,  # x-kubernetes-list-type: map makes the API server enforce it
            message="volumeMount paths must be unique",
            field="volumeMounts",
            check=lambda r: len({m.mount_path for m in r.volume_mounts}) == len(r.volume_mounts),
        ),
    )


def pod_settings_rules() -> tuple[Rule, ...]:
    """The rules of the pod settings (this module and :mod:`~kubetune_trainer.spec.volumes`), stated once for
    both validators: they apply to ``spec.resources``."""
    return (*_env_rules(), *_metadata_rules(), *_volume_rules())
