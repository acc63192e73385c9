"""Whether an attempt's pods have started, and if not, why (pure): the ``PodsReady`` condition.

A pod that cannot start says why in its status — the scheduler's ``PodScheduled=False``
(``Unschedulable`` with "0/8 nodes are available: 8 Insufficient nvidia.com/gpu."), or its
container's waiting reason (``ImagePullBackOff``, ``CreateContainerConfigError`` for a missing
Secret or key).  :func:`readiness` picks the most telling one, so ``status`` says it instead of
"0/N pods running" forever.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kubetune_operator.conditions import Reason
from kubetune_operator.observe import STARTING_REASONS, AttemptState, PodState

# Most telling first: a configuration error the user must fix beats a pull error beats capacity.
SEVERITY = (
    "CreateContainerConfigError",
    "CreateContainerError",
    "InvalidImageName",
    "ErrImageNeverPull",
    "ImagePullBackOff",
    "ErrImagePull",
    "Unschedulable",
    "RunContainerError",
    "CrashLoopBackOff",
)
_REASON = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class Readiness:
    """The ``PodsReady`` condition of one attempt."""

    ready: bool
    reason: str
    message: str


def _rank(pod: PodState) -> tuple[int, int]:
    reason = pod.waiting[0] if pod.waiting else ""
    return (SEVERITY.index(reason) if reason in SEVERITY else len(SEVERITY), pod.index)


def readiness(attempt: AttemptState, nodes: int) -> Readiness:
    """``PodsReady`` of ``attempt``: True once every completion index has a started pod; otherwise
    the most telling reason a pod gives (the scheduler's or its container's), with its message."""
    return readiness_of(attempt.attempt, attempt.pods, nodes)


def readiness_of(number: int, pods: tuple[PodState, ...], nodes: int) -> Readiness:
    """:func:`readiness` of attempt ``number`` with ``pods`` (none yet: a Job just created)."""
    started = len({pod.index for pod in pods if pod.started})
    if started >= nodes:
        return Readiness(True, Reason.PODS_RUNNING, f"attempt {number}: all {nodes} pods started")
    count = f"{started}/{nodes} pods started"
    waiting = [pod for pod in pods if not pod.started and not pod.deleting and pod.waiting]
    problems = sorted((pod for pod in waiting if pod.waiting and pod.waiting[0] not in STARTING_REASONS), key=_rank)
    if problems:
        pod = problems[0]
        assert pod.waiting is not None
        reason, text = pod.waiting
        reason = reason if _REASON.match(reason) else "PodNotStarting"
        return Readiness(False, reason, f"attempt {number}: pod {pod.name}: {text or reason}; {count}")
    if waiting:
        return Readiness(False, Reason.CONTAINER_CREATING, f"attempt {number}: {count}; containers are being created")
    missing = nodes - len({pod.index for pod in pods})
    created = f"; {missing} pod(s) not created yet" if missing > 0 else ""
    return Readiness(False, Reason.PENDING, f"attempt {number}: {count}{created}")
