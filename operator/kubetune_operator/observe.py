"""Observed state of a FineTuneJob's children, distilled from raw API objects (pure).

:func:`observe` turns the attempt Jobs and pods read by :mod:`kubetune_operator.apply`
into small frozen records the state machine can reason about: which attempts
exist, whether they run, finished, failed and why (exit codes and the trainer's
:class:`~kubetune_trainer.spec.termination.TerminationMessage`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from kubetune_operator import names
from kubetune_operator.conditions import parse_time
from kubetune_trainer.spec import KIND
from kubetune_trainer.spec.termination import TerminationMessage

# Container waiting reasons that are a normal part of starting (not worth a warning).
STARTING_REASONS = frozenset({"ContainerCreating", "PodInitializing"})
UNSCHEDULABLE = "Unschedulable"
DISRUPTION_TARGET = "DisruptionTarget"
EVICTED = "Evicted"  # status.reason of a pod the kubelet evicted under node pressure


@dataclass(frozen=True)
class PodState:
    """One pod of an attempt."""

    name: str
    index: int
    phase: str  # Pending | Running | Succeeded | Failed | Unknown
    exit_code: int | None  # of the trainer container, once terminated
    reason: str | None  # container termination reason (Error, OOMKilled, Completed)
    message: TerminationMessage | None  # the trainer's termination message (None: plain text or none)
    raw_message: str
    ip: str | None
    deleting: bool
    node: str | None = None  # spec.nodeName once scheduled
    deletion_deadline: datetime | None = None  # deletionTimestamp: when the grace period ends
    disruption: str | None = None  # the reason of a True DisruptionTarget condition (EvictionByEvictionAPI, ...)
    waiting: tuple[str, str] | None = None  # (reason, message) of why a pending pod does not start

    @property
    def running(self) -> bool:
        return self.phase == "Running" and not self.deleting

    @property
    def started(self) -> bool:
        """Its container ran (or runs): the pod is past scheduling, image pull and container creation."""
        return self.phase in ("Running", "Succeeded", "Failed") or self.exit_code is not None

    @property
    def failed(self) -> bool:
        return self.phase == "Failed" or (self.exit_code is not None and self.exit_code != 0)

    @property
    def disrupted(self) -> bool:
        """Kubernetes is taking this pod away (eviction, preemption, lost node): the gang cannot go on."""
        return self.disruption is not None and (self.deleting or self.failed)


@dataclass(frozen=True)
class AttemptState:
    """One attempt's batch/v1 Job and its pods."""

    attempt: int
    name: str
    owned: bool  # owned by this FineTuneJob (uid matches)
    stale_owner: bool  # owned by an earlier FineTuneJob of the same name (garbage collection pending)
    suspended: bool
    queued: bool  # carries Kueue's queue-name label
    active: int
    succeeded: int
    complete: bool
    failed: bool  # the Job failed, or a pod of it failed or was disrupted (the gang is broken)
    failed_reason: str | None
    failed_message: str | None
    completion_time: str | None
    deleting: bool
    pods: tuple[PodState, ...] = ()
    start_time: datetime | None = None  # status.startTime: when the Job last started (reset by a suspend)
    job_failed: bool = False  # the Job itself says Failed (its pods stopping alone is not enough)
    created: datetime | None = None  # metadata.creationTimestamp of the Job

    @property
    def finished(self) -> bool:
        return self.complete or self.failed

    def running_pods(self) -> int:
        return sum(1 for pod in self.pods if pod.running)

    def started_pods(self) -> int:
        """Pods whose container ran, one per completion index."""
        return len({pod.index for pod in self.pods if pod.started})

    def pod(self, index: int) -> PodState | None:
        """The newest live pod of completion ``index``."""
        for pod in self.pods:
            if pod.index == index:
                return pod
        return None


@dataclass(frozen=True)
class Observed:
    """Everything ``next_status`` needs besides the spec and the clock."""

    status: Mapping[str, Any] = field(default_factory=dict)
    attempts: Mapping[int, AttemptState] = field(default_factory=dict)
    pods_left: Mapping[int, int] = field(default_factory=dict)  # attempt -> pods not yet gone
    pods: Mapping[int, tuple[PodState, ...]] = field(default_factory=dict)  # attempt -> every pod of it
    unready_nodes: frozenset[str] = frozenset()  # nodes of stuck pods that are NotReady, unreachable or gone
    conflicts: tuple[Conflict, ...] = ()  # children the next attempt would create whose names are taken


@dataclass(frozen=True)
class Conflict:
    """An object that holds the name of a child the operator must create."""

    kind: str
    name: str
    stale: bool  # owned by an earlier FineTuneJob of the same name: garbage collection will remove it
    owner: str  # who owns it, for the message ("no owner" when none)

    def describe(self, namespace: str) -> str:
        """``Service ml/x (owner: ...)``."""
        return f"{self.kind} {namespace}/{self.name} ({self.owner})"


def _true(conditions: Mapping[str, Mapping[str, Any]], kind: str) -> Mapping[str, Any] | None:
    condition = conditions.get(kind)
    return condition if condition is not None and condition.get("status") == "True" else None


def _conditions(obj: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return {str(c.get("type")): c for c in (obj.get("status") or {}).get("conditions") or [] if isinstance(c, dict)}


def _waiting(status: Mapping[str, Any], conditions: Mapping[str, Mapping[str, Any]]) -> tuple[str, str] | None:
    """Why a pod has not started: the scheduler's verdict, or its container's waiting reason."""
    scheduled = conditions.get("PodScheduled")
    if scheduled and scheduled.get("status") == "False":
        return str(scheduled.get("reason") or UNSCHEDULABLE), str(scheduled.get("message") or "")
    for container in status.get("containerStatuses") or []:
        waiting = (container.get("state") or {}).get("waiting")
        if waiting and waiting.get("reason"):
            return str(waiting["reason"]), str(waiting.get("message") or "")
    return None


def _disruption(status: Mapping[str, Any], conditions: Mapping[str, Mapping[str, Any]]) -> str | None:
    target = conditions.get(DISRUPTION_TARGET)
    if target and target.get("status") == "True":
        return str(target.get("reason") or DISRUPTION_TARGET)
    return EVICTED if status.get("reason") == EVICTED else None


def _terminated(status: Mapping[str, Any]) -> tuple[int | None, str | None, str]:
    """Exit code, reason and message of the trainer container, once it terminated."""
    for container in status.get("containerStatuses") or []:
        if container.get("name") != names.CONTAINER_NAME:
            continue
        terminated = (container.get("state") or {}).get("terminated") or (container.get("lastState") or {}).get(
            "terminated"
        )
        if terminated:
            return int(terminated.get("exitCode", 0)), terminated.get("reason"), str(terminated.get("message") or "")
    return None, None, ""


def pod_state(pod: Mapping[str, Any]) -> PodState:
    """Distil one raw pod."""
    metadata = pod.get("metadata") or {}
    labels = metadata.get("labels") or {}
    annotations = metadata.get("annotations") or {}
    index_text = str(labels.get(names.COMPLETION_INDEX_KEY, annotations.get(names.COMPLETION_INDEX_KEY, "0")))
    status = pod.get("status") or {}
    conditions = _conditions(pod)
    exit_code, reason, raw = _terminated(status)
    deletion = metadata.get("deletionTimestamp")
    return PodState(
        name=str(metadata.get("name", "")),
        index=int(index_text) if index_text.isdigit() else 0,
        phase=str(status.get("phase") or "Pending"),
        exit_code=exit_code,
        reason=reason,
        message=TerminationMessage.parse(raw),
        raw_message=raw,
        ip=status.get("podIP"),
        deleting=bool(deletion),
        node=(pod.get("spec") or {}).get("nodeName"),
        deletion_deadline=parse_time(str(deletion)) if deletion else None,
        disruption=_disruption(status, conditions),
        waiting=_waiting(status, conditions) if exit_code is None else None,
    )


def attempt_state(
    job: Mapping[str, Any], owner_uid: str | None, pods: Iterable[PodState], attempt: int
) -> AttemptState:
    """Distil one raw attempt Job (and its pods)."""
    metadata = job.get("metadata") or {}
    spec = job.get("spec") or {}
    status = job.get("status") or {}
    conditions = _conditions(job)
    owners = metadata.get("ownerReferences") or []
    owned = owner_uid is None or any(ref.get("uid") == owner_uid for ref in owners)
    name = str(metadata.get("name", ""))
    stale_owner = not owned and any(
        ref.get("kind") == KIND and names.attempt_of(name, str(ref.get("name", ""))) is not None for ref in owners
    )
    # FailureTarget comes first (the Job is failing: its pods are being stopped), Failed once they stopped.
    failed_condition = _true(conditions, "Failed") or _true(conditions, "FailureTarget")
    failed = job_failed = failed_condition is not None
    complete_condition = conditions.get("Complete")
    complete = bool(complete_condition and complete_condition.get("status") == "True")
    pods_sorted = tuple(sorted(pods, key=lambda p: (p.index, p.deleting, p.name)))
    if not failed and any((pod.failed and not pod.deleting) or pod.disrupted for pod in pods_sorted):
        # The podFailurePolicy fails the Job; do not wait for the controller to say so.  A disrupted pod
        # (evicted, preempted, on a lost node) may never reach a terminal phase: the gang is broken anyway.
        # A pod that failed while being deleted for no disruption is left to the Job's own verdict: the
        # Job controller ignores those it deleted itself (a suspension), and fails the Job for the others.
        failed = True
    return AttemptState(
        attempt=attempt,
        name=str(metadata.get("name", "")),
        owned=owned,
        stale_owner=stale_owner,
        suspended=bool(spec.get("suspend")),
        queued=names.KUEUE_QUEUE_LABEL in (metadata.get("labels") or {}),
        active=int(status.get("active") or 0),
        succeeded=int(status.get("succeeded") or 0),
        complete=complete and not failed,
        failed=failed,
        failed_reason=str(failed_condition.get("reason")) if failed_condition else None,
        failed_message=str(failed_condition.get("message", "")) if failed_condition else None,
        completion_time=status.get("completionTime"),
        deleting=bool(metadata.get("deletionTimestamp")),
        pods=pods_sorted,
        start_time=parse_time(status.get("startTime")),
        job_failed=job_failed,
        created=parse_time(metadata.get("creationTimestamp")),
    )


def observe(
    name: str,
    owner_uid: str | None,
    status: Mapping[str, Any] | None,
    jobs: Iterable[Mapping[str, Any]],
    pods: Iterable[Mapping[str, Any]],
) -> Observed:
    """Group the raw Jobs and pods of FineTuneJob ``name`` by attempt."""
    pods_by_attempt: dict[int, list[PodState]] = {}
    for pod in pods:
        labels = (pod.get("metadata") or {}).get("labels") or {}
        if labels.get(names.LABEL_JOB_NAME) != name:
            continue
        text = str(labels.get(names.LABEL_ATTEMPT, ""))
        if text.isdigit():
            pods_by_attempt.setdefault(int(text), []).append(pod_state(pod))
    attempts: dict[int, AttemptState] = {}
    for job in jobs:
        job_name = str((job.get("metadata") or {}).get("name", ""))
        number = names.attempt_of(job_name, name)
        if number is None:
            continue
        attempts[number] = attempt_state(job, owner_uid, pods_by_attempt.get(number, []), number)
    pods_left = {number: len(states) for number, states in pods_by_attempt.items() if states}
    grouped = {number: tuple(states) for number, states in pods_by_attempt.items()}
    return Observed(status=dict(status or {}), attempts=attempts, pods_left=pods_left, pods=grouped)


def stuck_pods(observed: Observed, now: datetime) -> list[PodState]:
    """Pods still there after their grace period ended (``deletionTimestamp`` passed), or terminated and
    still not gone, on a known node: on a NotReady or unreachable node nothing will ever finish deleting them."""
    return [
        pod
        for states in observed.pods.values()
        for pod in states
        if pod.deleting
        and pod.node
        and pod.deletion_deadline is not None
        # A terminated pod holds nothing: there is no grace period to wait for.
        and (now >= pod.deletion_deadline or pod.phase in ("Succeeded", "Failed"))
    ]


def ownership(obj: Mapping[str, Any], owner_uid: str | None, owner_name: str) -> tuple[bool, bool, str]:
    """``(ours, stale, who)`` of an existing object: owned by FineTuneJob ``owner_uid``; owned by an earlier
    FineTuneJob of the same name (garbage collection will remove it); who owns it, for a message."""
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    if owner_uid is not None and any(ref.get("uid") == owner_uid for ref in refs):
        return True, False, "owned by this FineTuneJob"
    stale = any(ref.get("kind") == KIND and ref.get("name") == owner_name for ref in refs)
    who = ", ".join(f"{ref.get('kind')} {ref.get('name')}" for ref in refs)
    return False, stale, f"owned by {who}" if who else "no owner"


def node_ready(node: Mapping[str, Any]) -> bool:
    """Whether a node's kubelet reports in: Ready=True and no unreachable/not-ready taint."""
    conditions = {c.get("type"): c.get("status") for c in (node.get("status") or {}).get("conditions") or []}
    taints = {t.get("key") for t in (node.get("spec") or {}).get("taints") or []}
    return conditions.get("Ready") == "True" and not taints & set(names.NODE_UNREACHABLE_TAINTS)
