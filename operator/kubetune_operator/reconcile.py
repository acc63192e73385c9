"""The FineTuneJob state machine: ``next_status(job, observed, now) -> Plan`` (pure).

Level-based: every call looks at what exists (attempt Jobs, pods, the current
status) and says what the status should be and which few actions bring the
children closer to it.  Running it twice in a row gives the same answer, so a
killed operator, a duplicated event or a timer can all call it safely.

Failure policy (DESIGN §3): a failed attempt is classified from the trainer's
exit code and termination message.  Permanent (exit 10-19 or a spec/data
reason) fails the job at once; anything else restarts the gang as attempt N+1
after ``backoffSeconds`` (old Job and its pods gone first) until
``maxRestarts`` is used up.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from kubetune_operator import conditions as c
from kubetune_operator import names
from kubetune_operator.conditions import Reason
from kubetune_operator.observe import AttemptState, Observed, PodState
from kubetune_operator.resolve import ResolvedJob
from kubetune_trainer.spec import ConditionType, RunPolicy
from kubetune_trainer.spec import runtime as rt
from kubetune_trainer.spec.termination import TerminationMessage

SIGNAL_EXIT_CODES = frozenset({137, 143})  # killed by the Job controller after another pod failed
WAIT_FOR_CLEANUP_SECONDS = 1.0
MESSAGE_LIMIT = 1024


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
    suspend_job: str | None = None
    unsuspend_job: str | None = None
    delete_self: bool = False
    events: list[Event] = field(default_factory=list)
    requeue_after: float | None = None

    def requeue(self, seconds: float) -> None:
        """Ask to be called again within ``seconds`` (the earliest request wins)."""
        seconds = max(0.0, seconds)
        self.requeue_after = seconds if self.requeue_after is None else min(self.requeue_after, seconds)


@dataclass(frozen=True)
class Failure:
    """Why an attempt failed, as the trainer (or Kubernetes) told it."""

    reason: str
    message: str
    exit_code: int | None
    permanent: bool


class _Status:
    """A mutable working copy of the status with the condition helper bound to ``now``."""

    def __init__(self, old: Mapping[str, Any], now: datetime, generation: int | None) -> None:
        self.data: dict[str, Any] = {k: v for k, v in old.items() if v is not None}
        self.data["conditions"] = [dict(x) for x in old.get("conditions") or []]
        self.now = now
        self.generation = generation

    @property
    def conditions(self) -> c.Conditions:
        return list(self.data["conditions"])

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


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MESSAGE_LIMIT else text[: MESSAGE_LIMIT - 3] + "..."


def _pod_failure(pod: PodState) -> Failure:
    message = pod.message
    code = pod.exit_code if pod.exit_code is not None else (message.exit_code if message else None)
    reason = (message.reason if message else None) or pod.reason or "Error"
    if not reason.isidentifier():
        reason = "Error"
    text = (message.message if message else None) or pod.raw_message or ""
    detail = f"pod {pod.name} exited with code {code}" if code is not None else f"pod {pod.name} failed"
    human = _short(f"{detail}: {text}" if text else detail)
    permanent = (code is not None and rt.is_permanent_failure(code)) or reason in rt.PERMANENT_REASONS
    return Failure(reason, human, code, permanent)


def classify_failure(attempt: AttemptState) -> Failure:
    """The root cause of a failed attempt: a permanent failure wins, then a pod that
    failed by itself (not one the Job controller killed afterwards), lowest index first."""
    if attempt.failed_reason == "DeadlineExceeded":
        return Failure(
            Reason.DEADLINE_EXCEEDED, _short(attempt.failed_message or "activeDeadlineSeconds reached"), None, True
        )
    failures = [_pod_failure(pod) for pod in attempt.pods if pod.failed]
    if not failures:
        reason = attempt.failed_reason or "JobFailed"
        message = attempt.failed_message or f"Job {attempt.name} failed"
        return Failure(reason if reason.isidentifier() else "JobFailed", _short(message), None, False)
    for failure in failures:
        if failure.permanent:
            return failure
    for failure in failures:
        if failure.exit_code not in SIGNAL_EXIT_CODES:
            return failure
    return failures[0]


def _events(old: c.Conditions, new: c.Conditions) -> list[Event]:
    """One Event per condition that became True (or changed reason while True)."""
    events: list[Event] = []
    for condition in new:
        if condition.get("status") != c.TRUE:
            continue
        kind = ConditionType.of(condition["type"])
        before = c.get_condition(old, kind)
        same = before is not None and before.get("status") == c.TRUE and before.get("reason") == condition["reason"]
        # With the same reason, only a new attempt being created is news.
        if same and (kind != ConditionType.CREATED or before is None or before.get("message") == condition["message"]):
            continue
        events.append(Event(c.event_type(kind), str(condition["reason"]), str(condition["message"])))
    return events


def _finish_plan(plan: Plan, st: _Status, old: Mapping[str, Any]) -> Plan:
    st.data["phase"] = c.derive_phase(st.conditions).value
    if st.generation is not None:
        st.data["observedGeneration"] = st.generation
    plan.status = st.data
    plan.events = _events(list(old.get("conditions") or []), st.conditions)
    return plan


def invalid_spec_plan(old: Mapping[str, Any], field: str, message: str, now: datetime, generation: int | None) -> Plan:
    """A job whose spec cannot be run: ``Failed=True, reason=InvalidSpec`` naming the field."""
    st = _Status(old, now, generation)
    text = f"{field}: {message}" if field else message
    st.enter(ConditionType.FAILED, Reason.INVALID_SPEC, _short(f"invalid spec: {text}"))
    st.data.setdefault("restarts", 0)
    if "completionTime" not in st.data:
        st.data["completionTime"] = c.rfc3339(now)
    return _finish_plan(Plan(status={}), st, old)


def _fail(st: _Status, plan: Plan, reason: str, message: str, current: AttemptState | None) -> None:
    st.enter(ConditionType.FAILED, reason, message, why="the job failed")
    st.data["completionTime"] = st.data.get("completionTime") or c.rfc3339(st.now)
    if current is not None and not current.finished and not current.deleting:
        plan.delete_jobs.append(current.name)


@dataclass(frozen=True)
class Verdict:
    """What the failure policy makes of a failed attempt: restart it, or fail the job (and why)."""

    restart: bool
    reason: str  # of the Restarting or Failed condition
    message: str


def failure_verdict(policy: RunPolicy, attempt: int, restarts: int, failure: Failure) -> Verdict:
    """The failure policy (DESIGN §3), shared by the operator and ``kubetune run``: a permanent
    failure fails the job at once; a retryable one restarts the gang as attempt N+1 after
    ``backoffSeconds`` until ``maxRestarts`` restarts are used."""
    if failure.permanent:
        return Verdict(
            False, failure.reason, f"attempt {attempt} failed permanently ({failure.reason}): {failure.message}"
        )
    if restarts >= policy.max_restarts:
        return Verdict(
            False,
            Reason.BACKOFF_LIMIT_EXCEEDED,
            _short(
                f"attempt {attempt} failed ({failure.reason}) and all {policy.max_restarts} restarts are used: "
                f"{failure.message}"
            ),
        )
    return Verdict(
        True,
        Reason.RESTART_SCHEDULED,
        _short(
            f"attempt {attempt} failed ({failure.reason}): {failure.message}; attempt {attempt + 1} starts "
            f"{policy.backoff_seconds}s after its pods are gone (restart {restarts + 1}/{policy.max_restarts})"
        ),
    )


def _retry_or_fail(
    job: ResolvedJob, st: _Status, plan: Plan, current: AttemptState | None, attempt: int, failure: Failure
) -> None:
    restarts = int(st.data.get("restarts") or 0)
    verdict = failure_verdict(job.spec.run_policy, attempt, restarts, failure)
    if not verdict.restart:
        _fail(st, plan, verdict.reason, verdict.message, current)
        return
    st.data["restarts"] = restarts + 1
    st.data["attempt"] = attempt + 1
    st.enter(
        ConditionType.RESTARTING,
        verdict.reason,
        verdict.message,
        cleared=failure.reason,
        why=f"attempt {attempt} failed",
    )
    if current is not None and not current.deleting:
        plan.delete_jobs.append(current.name)
    plan.requeue(WAIT_FOR_CLEANUP_SECONDS)


def _succeed(st: _Status, attempt: AttemptState, job: ResolvedJob) -> None:
    rank0 = attempt.pod(0)
    message = (rank0.message if rank0 else None) or TerminationMessage(reason=Reason.SUCCEEDED)
    if message.evaluation is not None:
        st.data["evaluation"] = dict(message.evaluation)
    st.data["output"] = {"uri": message.output.uri if message.output else job.output_uri}
    if message.data is not None:
        st.data["data"] = message.data.model_dump(by_alias=True, mode="json")
    step = message.checkpoint.step if message.checkpoint else None
    if step is not None:
        # The step folder, as status.progress' reader writes it while the job runs: one meaning.
        merged = dict(st.data.get("checkpoint") or {})
        merged.update({"uri": job.checkpoint_step_uri(step), "step": step})
        if message.checkpoint and message.checkpoint.time:
            merged["time"] = message.checkpoint.time
        st.data["checkpoint"] = merged
    if message.step is not None:
        progress = dict(st.data.get("progress") or {})
        progress["step"] = message.step
        st.data["progress"] = progress
    summary = ", ".join(f"{k}={v:.4g}" for k, v in sorted((st.data.get("evaluation") or {}).items()))
    text = f"attempt {attempt.attempt} succeeded" + (f": {summary}" if summary else "")
    st.enter(ConditionType.SUCCEEDED, Reason.SUCCEEDED, text, why="the job finished")
    st.data["completionTime"] = st.data.get("completionTime") or attempt.completion_time or c.rfc3339(st.now)


def _finished(job: ResolvedJob, observed: Observed, st: _Status, plan: Plan) -> None:
    # Nothing may keep running once the job is terminal (e.g. the deadline failed it).
    for attempt in observed.attempts.values():
        if attempt.owned and not attempt.finished and not attempt.deleting:
            plan.delete_jobs.append(attempt.name)
    ttl = job.spec.run_policy.ttl_seconds_after_finished
    finished_at = c.parse_time(st.data.get("completionTime"))
    if ttl is None or finished_at is None:
        return
    due = finished_at + timedelta(seconds=ttl)
    if st.now >= due:
        plan.delete_self = True
    else:
        plan.requeue((due - st.now).total_seconds())


def next_status(job: ResolvedJob, observed: Observed, now: datetime) -> Plan:
    """The new status of ``job`` (resolved once by the caller) and the actions that bring its children there."""
    old = observed.status
    st = _Status(old, now, job.generation)
    plan = Plan(status={})
    spec = job.spec
    policy = spec.run_policy
    st.data.setdefault("restarts", 0)

    if c.is_finished(st.conditions):
        _finished(job, observed, st, plan)
        return _finish_plan(plan, st, old)

    owned_numbers = [n for n, a in observed.attempts.items() if a.owned]
    number = max([int(old.get("attempt") or 1), *owned_numbers])
    st.data["attempt"] = number
    current = observed.attempts.get(number)

    # Older attempts never outlive a newer one (at most one gang runs).
    for n, attempt in sorted(observed.attempts.items()):
        if n < number and attempt.owned and not attempt.deleting:
            plan.delete_jobs.append(attempt.name)

    started = c.parse_time(st.data.get("startTime"))
    deadline = policy.active_deadline_seconds
    if deadline is not None and started is not None and now >= started + timedelta(seconds=deadline):
        _fail(st, plan, Reason.DEADLINE_EXCEEDED, f"the job ran longer than activeDeadlineSeconds={deadline}", current)
        return _finish_plan(plan, st, old)

    if current is not None and not current.owned and (current.stale_owner or current.deleting):
        # A FineTuneJob of this name was deleted and recreated: wait for the old Job's GC.
        plan.requeue(WAIT_FOR_CLEANUP_SECONDS)
        return _finish_plan(plan, st, old)
    if current is not None and not current.owned:
        _fail(
            st,
            plan,
            Reason.NAME_TAKEN,
            f"a Job named {current.name} exists and is not owned by this FineTuneJob; delete it or rename the job",
            None,
        )
        return _finish_plan(plan, st, old)

    if current is None or current.deleting:
        _without_job(job, observed, st, plan, number, current)
    elif current.complete:
        _succeed(st, current, job)
        _finished(job, observed, st, plan)
    elif current.failed:
        failure = classify_failure(current)
        if failure.reason == Reason.DEADLINE_EXCEEDED:
            _fail(st, plan, Reason.DEADLINE_EXCEEDED, failure.message, None)
        else:
            _retry_or_fail(job, st, plan, current, number, failure)
    elif spec.run_policy.suspend:
        if not current.suspended:
            plan.suspend_job = current.name
        st.enter(
            ConditionType.SUSPENDED,
            Reason.USER_SUSPENDED,
            f"spec.runPolicy.suspend is true: attempt {number} is suspended (its pods checkpoint and stop)",
            why="suspended",
        )
    elif current.suspended:
        _suspended_job(st, plan, current, number)
    else:
        _active(job, st, current, number)
    if deadline is not None and started is not None and not c.is_finished(st.conditions):
        plan.requeue((started + timedelta(seconds=deadline) - now).total_seconds())
    return _finish_plan(plan, st, old)


def _without_job(
    job: ResolvedJob, observed: Observed, st: _Status, plan: Plan, number: int, current: AttemptState | None
) -> None:
    """The current attempt has no (live) Job: create it, once the previous one is gone."""
    if st.true(ConditionType.RUNNING) and current is None:
        failure = Failure(Reason.CHILD_DELETED, f"the Job of attempt {number} disappeared while it ran", None, False)
        _retry_or_fail(job, st, plan, None, number, failure)
        return
    if job.spec.run_policy.suspend:
        st.set(
            ConditionType.SUSPENDED,
            True,
            Reason.USER_SUSPENDED,
            f"spec.runPolicy.suspend is true: attempt {number} is not started",
        )
        return
    leftovers = [a for n, a in observed.attempts.items() if n <= number and a.owned]
    pods_left = sum(count for n, count in observed.pods_left.items() if n <= number)
    if leftovers or pods_left:
        plan.requeue(WAIT_FOR_CLEANUP_SECONDS)  # Foreground-style: never two gangs at once
        return
    if st.true(ConditionType.RESTARTING):
        since = st.since(ConditionType.RESTARTING) or st.now
        due = since + timedelta(seconds=job.spec.run_policy.backoff_seconds)
        if st.now < due:
            plan.requeue((due - st.now).total_seconds())
            return
    plan.create_attempt = number
    st.set(ConditionType.CREATED, True, Reason.CREATED, _created_message(job, number))
    st.clear(ConditionType.RESTARTING, Reason.CREATED, f"attempt {number} created")
    if st.true(ConditionType.SUSPENDED):
        st.set(ConditionType.SUSPENDED, False, Reason.RESUMED, f"resumed as attempt {number}")
    st.set(ConditionType.RUNNING, False, Reason.PENDING, _pending_message(job, number, 0))


def _created_message(job: ResolvedJob, number: int) -> str:
    how = "resumes from the latest checkpoint" if number > 1 else "starts"
    return f"attempt {number}: Job {names.job_name_for(job.name, number)} created; training {how}"


def _pending_message(job: ResolvedJob, number: int, running: int) -> str:
    return f"attempt {number}: {running}/{job.spec.resources.nodes} pods running"


def _suspended_job(st: _Status, plan: Plan, current: AttemptState, number: int) -> None:
    """The Job is suspended but the spec is not: the user resumed, or Kueue holds it."""
    if st.true(ConditionType.SUSPENDED) and st.reason(ConditionType.SUSPENDED) == Reason.USER_SUSPENDED:
        if st.data.get("startTime") is None and not current.queued:
            plan.unsuspend_job = current.name  # it never ran: start it as it is
            st.set(ConditionType.SUSPENDED, False, Reason.RESUMED, f"attempt {number} resumed")
        elif st.data.get("startTime") is None:
            st.set(ConditionType.SUSPENDED, False, Reason.RESUMED, f"attempt {number} waits for Kueue to admit it")
        else:
            # Pods of a suspended Job are gone; resume as a new attempt from the checkpoint.
            plan.delete_jobs.append(current.name)
            st.data["attempt"] = number + 1
            st.set(
                ConditionType.SUSPENDED, False, Reason.RESUMED, f"resuming as attempt {number + 1} from the checkpoint"
            )
            plan.requeue(WAIT_FOR_CLEANUP_SECONDS)
        return
    if current.queued:
        st.set(
            ConditionType.CREATED,
            True,
            Reason.QUEUED,
            f"attempt {number}: waiting for Kueue to admit Job {current.name}",
        )
        st.set(ConditionType.RUNNING, False, Reason.QUEUED, "queued in Kueue")
    else:
        st.set(ConditionType.RUNNING, False, Reason.NOT_RUNNING, f"Job {current.name} is suspended")


def _active(job: ResolvedJob, st: _Status, current: AttemptState, number: int) -> None:
    nodes = job.spec.resources.nodes
    running = current.running_pods()
    st.set(ConditionType.CREATED, True, Reason.CREATED, _created_message(job, number))
    if running >= nodes:
        st.enter(
            ConditionType.RUNNING,
            Reason.PODS_RUNNING,
            f"attempt {number}: all {nodes} pods running",
            why=f"attempt {number} is running",
        )
        if st.data.get("startTime") is None:
            st.data["startTime"] = c.rfc3339(st.now)
    else:
        st.set(ConditionType.RUNNING, False, Reason.PENDING, _pending_message(job, number, running))
