"""Observed state of a FineTuneJob's children, distilled from raw API objects (pure).

:func:`observe` turns the attempt Jobs and pods read by :mod:`kubetune_operator.apply`
into small frozen records the state machine can reason about: which attempts
exist, whether they run, finished, failed and why (exit codes and the trainer's
:class:`~kubetune_trainer.spec.termination.TerminationMessage`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kubetune_operator import names
from kubetune_trainer.spec import KIND
from kubetune_trainer.spec.termination import TerminationMessage


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

    @property
    def running(self) -> bool:
        return self.phase == "Running" and not self.deleting

    @property
    def failed(self) -> bool:
        return self.phase == "Failed" or (self.exit_code is not None and self.exit_code != 0)


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
    failed: bool
    failed_reason: str | None
    failed_message: str | None
    completion_time: str | None
    deleting: bool
    pods: tuple[PodState, ...] = ()

    @property
    def finished(self) -> bool:
        return self.complete or self.failed

    def running_pods(self) -> int:
        return sum(1 for pod in self.pods if pod.running)

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


def _conditions(obj: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return {str(c.get("type")): c for c in (obj.get("status") or {}).get("conditions") or [] if isinstance(c, dict)}


def pod_state(pod: Mapping[str, Any]) -> PodState:
    """Distil one raw pod."""
    metadata = pod.get("metadata") or {}
    labels = metadata.get("labels") or {}
    annotations = metadata.get("annotations") or {}
    index_text = str(labels.get(names.COMPLETION_INDEX_KEY, annotations.get(names.COMPLETION_INDEX_KEY, "0")))
    status = pod.get("status") or {}
    exit_code: int | None = None
    reason: str | None = None
    raw = ""
    for container in status.get("containerStatuses") or []:
        if container.get("name") != names.CONTAINER_NAME:
            continue
        terminated = (container.get("state") or {}).get("terminated") or (container.get("lastState") or {}).get(
            "terminated"
        )
        if terminated:
            exit_code = int(terminated.get("exitCode", 0))
            reason = terminated.get("reason")
            raw = str(terminated.get("message") or "")
    return PodState(
        name=str(metadata.get("name", "")),
        index=int(index_text) if index_text.isdigit() else 0,
        phase=str(status.get("phase") or "Pending"),
        exit_code=exit_code,
        reason=reason,
        message=TerminationMessage.parse(raw),
        raw_message=raw,
        ip=status.get("podIP"),
        deleting=bool(metadata.get("deletionTimestamp")),
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
    failed_condition = conditions.get("Failed")
    failed = bool(failed_condition and failed_condition.get("status") == "True")
    complete_condition = conditions.get("Complete")
    complete = bool(complete_condition and complete_condition.get("status") == "True")
    pods_sorted = tuple(sorted(pods, key=lambda p: (p.index, p.deleting, p.name)))
    if not failed and any(pod.failed for pod in pods_sorted):
        failed = True  # the podFailurePolicy fails the Job; do not wait for the controller to say so
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
    return Observed(status=dict(status or {}), attempts=attempts, pods_left=pods_left)
