"""What one reconcile decides (pure): the new status, the actions that lead there, and the Events.

:class:`Plan` is the state machine's answer; :class:`WorkingStatus` is the status being built,
with the condition helpers bound to ``now`` and the table of
:class:`~kubetune_trainer.spec.status.ConditionType` (what each condition ends, which Events it
makes); :func:`finish` derives the phase and the Events of the transitions.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from kubetune_operator import conditions as c
from kubetune_trainer.spec import ConditionType


@dataclass(frozen=True)
class Event:
    """A Kubernetes Event to post once the status has landed."""

    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass
class Plan:
    """The outcome of one reconcile: the new status and the actions that lead there."""

    status: dict[str, Any]
    create_attempt: int | None = None
    delete_jobs: list[str] = field(default_factory=list)
    force_delete_pods: list[str] = field(default_factory=list)  # stuck Terminating on a lost node
    suspend_job: str | None = None
    unsuspend_job: str | None = None
    delete_self: bool = False
    events: list[Event] = field(default_factory=list)  # condition transitions: posted with the status
    notices: list[Event] = field(default_factory=list)  # actions (a force deletion, an eviction): posted after them
    requeue_after: float | None = None

    def requeue(self, seconds: float) -> None:
        """Ask to be called again within ``seconds`` (the earliest request wins)."""
        seconds = max(0.0, seconds)
        self.requeue_after = seconds if self.requeue_after is None else min(self.requeue_after, seconds)


class WorkingStatus:
    """A mutable working copy of the status with the condition helper bound to ``now``."""

    def __init__(self, old: Mapping[str, Any], now: datetime, generation: int | None) -> None:
        self.data: dict[str, Any] = {k: v for k, v in old.items() if v is not None}
        self.data["conditions"] = [dict(x) for x in old.get("conditions") or []]
        self.now = now
        self.generation = generation

    @property
    def conditions(self) -> c.Conditions:
        return list(self.data["conditions"])

    def count(self, key: str) -> int:
        """An integer counter of the status (``restarts``, ``preemptions``); 0 when unset."""
        return int(self.data.get(key) or 0)

    def set(self, kind: ConditionType, status: bool, reason: str, message: str) -> None:
        self.data["conditions"] = c.set_condition(
            self.data["conditions"], kind, status, reason, message, self.now, self.generation
        )

    def enter(self, kind: ConditionType, reason: str, message: str, *, why: str = "", cleared: str = "") -> None:
        """Set ``kind`` True and clear the conditions the table says it ends (``kind.clears``) with
        reason ``cleared`` (default: ``reason``) and message ``why``."""
        self.set(kind, True, reason, message)
        for other in kind.clears:
            self.clear(ConditionType.of(other), cleared or reason, why)

    def clear(self, kind: ConditionType, reason: str, message: str = "") -> None:
        """Set ``kind`` False, but only if it is present (absent conditions stay absent)."""
        if c.get_condition(self.data["conditions"], kind) is not None:
            self.set(kind, False, reason, message)

    def true(self, kind: ConditionType) -> bool:
        return c.is_true(self.data["conditions"], kind)

    def since(self, kind: ConditionType) -> datetime | None:
        condition = c.get_condition(self.data["conditions"], kind)
        return c.parse_time(condition.get("lastTransitionTime")) if condition else None

    def reason(self, kind: ConditionType) -> str | None:
        condition = c.get_condition(self.data["conditions"], kind)
        return str(condition.get("reason")) if condition else None


def _news_when_false(condition: Mapping[str, Any], before: Mapping[str, Any] | None) -> bool:
    """A condition whose turning False is the news (PodsReady): a new reason for being False."""
    if condition.get("status") != c.FALSE or condition.get("reason") in c.QUIET_REASONS:
        return False
    return before is None or before.get("status") != c.FALSE or before.get("reason") != condition.get("reason")


def condition_events(old: c.Conditions, new: c.Conditions) -> list[Event]:
    """One Event per condition that became True (or changed reason while True); for a condition
    whose turning False is the news, one Warning per new reason for being False."""
    events: list[Event] = []
    for condition in new:
        kind = ConditionType.of(condition["type"])
        before = c.get_condition(old, kind)
        if kind.false_is_news:
            if _news_when_false(condition, before):
                events.append(Event("Warning", str(condition["reason"]), str(condition["message"])))
            continue
        if condition.get("status") != c.TRUE:
            continue
        same = before is not None and before.get("status") == c.TRUE and before.get("reason") == condition["reason"]
        # With the same reason, only a new attempt being created is news.
        if same and (kind != ConditionType.CREATED or before is None or before.get("message") == condition["message"]):
            continue
        events.append(Event(c.event_type(kind), str(condition["reason"]), str(condition["message"])))
    return events


def finish(plan: Plan, st: WorkingStatus, old: Mapping[str, Any]) -> Plan:
    """Derive the phase, stamp ``observedGeneration`` and list the Events of the transitions."""
    st.data["phase"] = c.derive_phase(st.conditions).value
    if st.generation is not None:
        st.data["observedGeneration"] = st.generation
    plan.status = st.data
    plan.events = condition_events(list(old.get("conditions") or []), st.conditions)
    return plan
