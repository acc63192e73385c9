"""Conditions are the truth; ``phase`` is derived from them by one function.

Conditions are plain camelCase dicts as they live in ``status.conditions``.
:func:`set_condition` changes ``lastTransitionTime`` only when ``status`` flips
(the JobSet/Kubernetes convention), so re-running a reconcile changes nothing.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from kubetune_trainer.spec import ConditionType, Phase

TRUE = "True"
FALSE = "False"

# Reasons (CamelCase) of the conditions the operator sets.
CREATED = "AttemptCreated"
PENDING = "Pending"
PODS_RUNNING = "PodsRunning"
NOT_RUNNING = "NotRunning"
RESTART_SCHEDULED = "RestartScheduled"
USER_SUSPENDED = "SuspendedByUser"
QUEUED = "Queued"
RESUMED = "Resumed"
SUCCEEDED = "Succeeded"
BACKOFF_LIMIT_EXCEEDED = "BackoffLimitExceeded"
DEADLINE_EXCEEDED = "DeadlineExceeded"
INVALID_SPEC = "InvalidSpec"
CHILD_DELETED = "AttemptJobLost"

Conditions = list[dict[str, Any]]


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
        "reason": reason,
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
    """The one-word phase for ``kubectl get``, from the conditions alone (terminal ones win)."""
    for kind, phase in (
        (ConditionType.FAILED, Phase.FAILED),
        (ConditionType.SUCCEEDED, Phase.SUCCEEDED),
        (ConditionType.SUSPENDED, Phase.SUSPENDED),
        (ConditionType.RESTARTING, Phase.RESTARTING),
        (ConditionType.RUNNING, Phase.RUNNING),
    ):
        if is_true(conditions, kind):
            return phase
    return Phase.PENDING


def is_finished(conditions: Conditions) -> bool:
    """True once the job Succeeded or Failed (terminal; nothing more is created)."""
    return is_true(conditions, ConditionType.SUCCEEDED) or is_true(conditions, ConditionType.FAILED)
