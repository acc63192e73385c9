"""Why an attempt ended, and what the failure policy makes of it (pure; shared with ``kubetune run``).

An attempt ends in one of three ways that matter for accounting (DESIGN §3):

* a **permanent** failure (exit 10-19, or a spec/data reason such as ``OutOfMemory`` or
  ``IncompatibleCheckpoint``) fails the job at once;
* a **preemption** — Kubernetes or a user took pods away: a ``DisruptionTarget`` condition
  (scheduler preemption, API eviction and node drains, taint-manager deletion of pods on a lost
  node, graceful node shutdown of a spot reclaim), a kubelet eviction, or a trainer that exited
  after SIGTERM (``Preempted``, exit 21) — re-queues the gang and counts in
  ``status.preemptions``, never in ``restarts``;
* any other (retryable) failure restarts the gang and counts against ``maxRestarts``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from kubetune_operator.conditions import Reason
from kubetune_operator.observe import AttemptState, PodState
from kubetune_trainer.spec import RunPolicy
from kubetune_trainer.spec import runtime as rt
from kubetune_trainer.spec.termination import PREEMPTED

SIGNAL_EXIT_CODES = frozenset({137, 143})  # killed by the Job controller after another pod failed
OOM_KILLED = "OOMKilled"  # the kernel's SIGKILL (exit 137) of a container over its memory limit: a failure of its own
MESSAGE_LIMIT = 1024
# How the Job controller words the podFailurePolicy rule that failed a Job: the evidence that is left
# when the pod itself is gone (an evicted pod is deleted, and goes once it has terminated).
_DISRUPTION_RULE = re.compile(r"\bhas condition DisruptionTarget\b")
_EXIT_CODE_RULE = re.compile(r"\bfailed with exit code (\d+)\b")


@dataclass(frozen=True)
class Failure:
    """Why an attempt failed, as the trainer (or Kubernetes) told it."""

    reason: str
    message: str
    exit_code: int | None
    permanent: bool
    preempted: bool = False  # a disruption ended it, not a fault of the job


def short(text: str) -> str:
    """One line of at most :data:`MESSAGE_LIMIT` characters."""
    text = " ".join(text.split())
    return text if len(text) <= MESSAGE_LIMIT else text[: MESSAGE_LIMIT - 3] + "..."


def _pod_failure(pod: PodState) -> Failure:
    message = pod.message
    code = pod.exit_code if pod.exit_code is not None else (message.exit_code if message else None)
    told = (message.reason if message else None) or pod.reason or "Error"
    told = told if told.isidentifier() else "Error"
    permanent = (code is not None and rt.is_permanent_failure(code)) or told in rt.PERMANENT_REASONS
    reason = pod.disruption if pod.disruption is not None and not permanent else told
    text = (message.message if message else None) or pod.raw_message or ""
    if pod.disruption is not None:
        detail = f"pod {pod.name} was disrupted ({pod.disruption})" + (f" on node {pod.node}" if pod.node else "")
    elif code is not None:
        detail = f"pod {pod.name} exited with code {code}"
    else:
        detail = f"pod {pod.name} failed"
    human = short(f"{detail}: {text}" if text else detail)
    signalled = code == rt.ExitCode.PREEMPTED or told == PREEMPTED
    return Failure(reason, human, code, permanent, preempted=not permanent and (pod.disrupted or signalled))


def _job_failure(attempt: AttemptState) -> Failure | None:
    """What the Job's own failure condition says of its culprit pod (None when it names no rule)."""
    text = attempt.failed_message or ""
    if _DISRUPTION_RULE.search(text):
        return Failure("DisruptionTarget", short(f"Job {attempt.name}: {text}"), None, False, preempted=True)
    match = _EXIT_CODE_RULE.search(text)
    if match is None:
        return None
    code = int(match.group(1))
    permanent = rt.is_permanent_failure(code)
    preempted = not permanent and code == rt.ExitCode.PREEMPTED
    reason = rt.reason_of(rt.ExitCode(code)) if code in set(rt.ExitCode) else "Error"
    return Failure(reason, short(f"Job {attempt.name}: {text}"), code, permanent, preempted)


def classify_failure(attempt: AttemptState) -> Failure:
    """The root cause of a failed attempt, lowest index first within each rank of evidence:
    a permanent failure; a pod Kubernetes disrupted (DisruptionTarget, eviction); a pod that failed
    by itself (not killed by the Job controller after another pod failed, not stopped by SIGTERM);
    a pod stopped by SIGTERM (someone deleted it: a preemption); then whatever failed first."""
    if attempt.failed_reason == "DeadlineExceeded":
        return Failure(
            Reason.DEADLINE_EXCEEDED, short(attempt.failed_message or "activeDeadlineSeconds reached"), None, True
        )
    failures: list[tuple[PodState | None, Failure]] = [
        (pod, _pod_failure(pod)) for pod in attempt.pods if pod.failed or pod.disrupted
    ]
    told = _job_failure(attempt)
    if told is not None:
        failures.append((None, told))
    if not failures:
        reason = attempt.failed_reason or "JobFailed"
        message = attempt.failed_message or f"Job {attempt.name} failed"
        return Failure(reason if reason.isidentifier() else "JobFailed", short(message), None, False)
    ranked: tuple[Callable[[PodState | None, Failure], bool], ...] = (
        lambda pod, f: f.permanent,
        lambda pod, f: f.preempted and (pod is None or pod.disrupted),
        lambda pod, f: not f.preempted and (f.exit_code not in SIGNAL_EXIT_CODES or f.reason == OOM_KILLED),
        lambda pod, f: f.preempted,
    )
    for matches in ranked:
        for pod, failure in failures:
            if matches(pod, failure):
                return failure
    return failures[0][1]


@dataclass(frozen=True)
class Verdict:
    """What the failure policy makes of a failed attempt: restart it, or fail the job (and why)."""

    restart: bool
    reason: str  # of the Restarting or Failed condition
    message: str
    preempted: bool = False  # counts in status.preemptions, not in restarts


def failure_verdict(policy: RunPolicy, attempt: int, restarts: int, failure: Failure, preemptions: int = 0) -> Verdict:
    """The failure policy (DESIGN §3), shared by the operator and ``kubetune run``: a permanent
    failure fails the job at once; a preemption re-queues the gang at once (up to
    ``maxPreemptions``); a retryable failure restarts it as attempt N+1 after ``backoffSeconds``
    until ``maxRestarts`` restarts are used."""
    if failure.permanent:
        return Verdict(
            False, failure.reason, f"attempt {attempt} failed permanently ({failure.reason}): {failure.message}"
        )
    if failure.preempted:
        return _preemption_verdict(policy, attempt, preemptions, failure)
    if restarts >= policy.max_restarts:
        return Verdict(
            False,
            Reason.BACKOFF_LIMIT_EXCEEDED,
            short(
                f"attempt {attempt} failed ({failure.reason}) and all {policy.max_restarts} restarts are used: "
                f"{failure.message}"
            ),
        )
    return Verdict(
        True,
        Reason.RESTART_SCHEDULED,
        short(
            f"attempt {attempt} failed ({failure.reason}): {failure.message}; attempt {attempt + 1} starts once "
            f"its pods are gone, {policy.backoff_seconds}s after this failure at the earliest "
            f"(restart {restarts + 1}/{policy.max_restarts})"
        ),
    )


def _preemption_verdict(policy: RunPolicy, attempt: int, preemptions: int, failure: Failure) -> Verdict:
    limit = policy.max_preemptions
    if limit is not None and preemptions >= limit:
        return Verdict(
            False,
            Reason.PREEMPTION_LIMIT_EXCEEDED,
            short(f"attempt {attempt} was preempted and all {limit} preemptions are used: {failure.message}"),
        )
    allowed = f"/{limit}" if limit is not None else ""
    return Verdict(
        True,
        Reason.PREEMPTED,
        short(
            f"attempt {attempt} was preempted ({failure.reason}): {failure.message}; attempt {attempt + 1} is "
            f"queued once its pods are gone and resumes from the last checkpoint (preemption "
            f"{preemptions + 1}{allowed}; restarts are not used)"
        ),
        preempted=True,
    )
