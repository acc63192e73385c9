"""Conditions are the truth; ``phase`` is derived from them by one function.

The condition types, the phase each implies, their Event kind and which others
each one ends are one table: :class:`kubetune_trainer.spec.status.ConditionType`.
This module adds the CamelCase reasons the operator sets and the helpers that
apply the table.  Conditions are plain camelCase dicts as they live in
``status.conditions``.  :func:`set_condition` changes ``lastTransitionTime`` only
when ``status`` flips (the JobSet/Kubernetes convention), so re-running a
reconcile changes nothing.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from kubetune_trainer.spec import ConditionType, Phase
from kubetune_trainer.spec.status import phase_of

TRUE = "True"
FALSE = "False"

Conditions = list[dict[str, Any]]


class Reason(StrEnum):
    """CamelCase reasons of the conditions the operator sets (the trainer's failure reasons,
    e.g. ``InvalidData``, pass through as they are)."""

    CREATED = "AttemptCreated"  # Created: an attempt's Job exists
    QUEUED = "Queued"  # Created/Running=False: Kueue has not admitted the Job
    PENDING = "Pending"  # Running=False: not all pods run yet
    PODS_RUNNING = "PodsRunning"  # Running: every pod of the attempt runs
    NOT_RUNNING = "NotRunning"  # Running=False: the Job is suspended by someone else
    RESTART_SCHEDULED = "RestartScheduled"  # Restarting: a retryable failure, the next attempt follows
    USER_SUSPENDED = "SuspendedByUser"  # Suspended: spec.runPolicy.suspend
    RESUMED = "Resumed"  # Suspended=False
    SUCCEEDED = "Succeeded"  # Succeeded
    BACKOFF_LIMIT_EXCEEDED = "BackoffLimitExceeded"  # Failed: runPolicy.maxRestarts used up
    DEADLINE_EXCEEDED = "DeadlineExceeded"  # Failed: runPolicy.activeDeadlineSeconds
    INVALID_SPEC = "InvalidSpec"  # Failed: the spec cannot run (the message names the field)
    CHILD_DELETED = "AttemptJobLost"  # a retryable failure: the running attempt's Job vanished
    PREEMPTED = "Preempted"  # Restarting: a disruption ended the attempt; re-queued, not a restart
    EVICTED = "Evicted"  # Running=False: Kueue evicted the running attempt (its Job is suspended)
    PREEMPTION_LIMIT_EXCEEDED = "PreemptionLimitExceeded"  # Failed: runPolicy.maxPreemptions used up
    STARTUP_TIMEOUT = "StartupTimeout"  # a retryable failure: pods not all running within startupTimeoutSeconds
    STALLED = "Stalled"  # a retryable failure: no optimizer step for stallTimeoutSeconds
    NO_PROGRESS = "NoProgress"  # Stalled: rank 0's step stopped advancing
    CONTAINER_CREATING = "ContainerCreating"  # PodsReady=False: pods are being started (quiet)
    NAME_TAKEN = "NameTaken"  # ChildConflict: a foreign object holds a child's name
    RESOLVED = "Resolved"  # ChildConflict=False: the name is free again
    POD_FORCE_DELETED = "PodForceDeleted"  # an Event: a pod stuck Terminating on a lost node was force-deleted


# PodsReady=False reasons that are a normal part of starting: no Warning Event for them.
QUIET_REASONS = frozenset({Reason.PENDING, Reason.CONTAINER_CREATING, Reason.CREATED})


def rfc3339(moment: datetime) -> str:
    """``2026-01-02T03:04:05Z`` (UTC, whole seconds), the Kubernetes timestamp format."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str | None) -> datetime | None:
    """Inverse of :func:`rfc3339` (accepts fractional seconds and offsets); None for None."""
    if not text:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def get_condition(conditions: Conditions, kind: ConditionType) -> dict[str, Any] | None:
    """The condition of type ``kind``, if present."""
    for condition in conditions:
        if condition.get("type") == kind.value:
            return condition
    return None


def is_true(conditions: Conditions, kind: ConditionType) -> bool:
    """Whether condition ``kind`` is present with status True."""
    condition = get_condition(conditions, kind)
    return condition is not None and condition.get("status") == TRUE


def set_condition(
    conditions: Conditions,
    kind: ConditionType,
    status: bool,
    reason: str,
    message: str,
    now: datetime,
    generation: int | None = None,
) -> Conditions:
    """A new list with condition ``kind`` set; ``lastTransitionTime`` moves only on a flip."""
    value = TRUE if status else FALSE
    old = get_condition(conditions, kind)
    transition = old["lastTransitionTime"] if old is not None and old.get("status") == value else rfc3339(now)
    new: dict[str, Any] = {
        "type": kind.value,
        "status": value,
        "reason": str(reason),
        "message": message[:32768],
        "lastTransitionTime": transition,
    }
    if generation is not None:
        new["observedGeneration"] = generation
    result = [c for c in conditions if c.get("type") != kind.value]
    result.append(new)
    order = {k.value: i for i, k in enumerate(ConditionType)}
    return sorted(result, key=lambda c: order.get(str(c.get("type")), len(order)))


def derive_phase(conditions: Conditions) -> Phase:
    """The one-word phase for ``kubectl get``, from the conditions alone (the table decides)."""
    return phase_of({kind for kind in ConditionType if is_true(conditions, kind)})


def is_finished(conditions: Conditions) -> bool:
    """True once the job is in a terminal phase (Succeeded or Failed; nothing more is created)."""
    return derive_phase(conditions) in (Phase.SUCCEEDED, Phase.FAILED)


def event_type(kind: ConditionType) -> str:
    """The Event type of ``kind`` turning True: ``Warning`` or ``Normal``."""
    return "Warning" if kind.warning else "Normal"
