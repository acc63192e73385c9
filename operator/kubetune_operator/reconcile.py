"""The FineTuneJob state machine: ``next_status(job, observed, now) -> Plan`` (pure).

Level-based: every call looks at what exists (attempt Jobs, pods, the current
status) and says what the status should be and which few actions bring the
children closer to it.  Running it twice in a row gives the same answer, so a
killed operator, a duplicated event or a timer can all call it safely.

Failure policy (DESIGN §3, :mod:`kubetune_operator.failures`): a permanent failure fails
the job at once; a preemption re-queues the gang and counts in ``status.preemptions``; any
other failure restarts the gang as attempt N+1 after ``backoffSeconds`` (old Job and its pods
gone first) until ``maxRestarts`` is used up.  A suspended attempt never fails: its pods
stopping is what a suspension does.  Pods that cannot start are reported as ``PodsReady=False``
(:mod:`kubetune_operator.readiness`); ``startupTimeoutSeconds`` and ``stallTimeoutSeconds``
turn pods that never start and a rank 0 that stopped stepping into retryable failures.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from kubetune_operator import conditions as c
from kubetune_operator import names
from kubetune_operator.conditions import Reason
from kubetune_operator.failures import Failure, classify_failure, failure_verdict, short
from kubetune_operator.observe import AttemptState, Conflict, Observed, stuck_pods
from kubetune_operator.plan import Event, Plan, WorkingStatus, finish
from kubetune_operator.readiness import readiness, readiness_of
from kubetune_operator.resolve import ResolvedJob
from kubetune_trainer.spec import ConditionType
from kubetune_trainer.spec.termination import TerminationMessage

__all__ = ["Event", "Plan", "invalid_spec_plan", "next_status"]

WAIT_FOR_CLEANUP_SECONDS = 1.0
CONFLICT_RECHECK_SECONDS = 10.0


def invalid_spec_plan(
    old: Mapping[str, Any],
    field: str,
    message: str,
    now: datetime,
    generation: int | None,
    ttl_seconds: int | None = None,
) -> Plan:
    """A job whose spec cannot be run: ``Failed=True, reason=InvalidSpec`` naming the field; deleted
    ``ttl_seconds`` (``runPolicy.ttlSecondsAfterFinished``, as far as it could be read) after that."""
    st = WorkingStatus(old, now, generation)
    text = f"{field}: {message}" if field else message
    st.enter(ConditionType.FAILED, Reason.INVALID_SPEC, short(f"invalid spec: {text}"))
    st.data.setdefault("restarts", 0)
    if "completionTime" not in st.data:
        st.data["completionTime"] = c.rfc3339(now)
    plan = Plan(status={})
    _expire(st, plan, ttl_seconds)
    return finish(plan, st, old)


def _fail(st: WorkingStatus, plan: Plan, reason: str, message: str, current: AttemptState | None) -> None:
    st.enter(ConditionType.FAILED, reason, message, why="the job failed")
    st.data["completionTime"] = st.data.get("completionTime") or c.rfc3339(st.now)
    if current is not None and not current.finished and not current.deleting:
        plan.delete_jobs.append(current.name)


def _retry_or_fail(
    job: ResolvedJob, st: WorkingStatus, plan: Plan, current: AttemptState | None, attempt: int, failure: Failure
) -> None:
    restarts, preemptions = st.count("restarts"), st.count("preemptions")
    verdict = failure_verdict(job.spec.run_policy, attempt, restarts, failure, preemptions)
    if not verdict.restart:
        _fail(st, plan, verdict.reason, verdict.message, current)
        return
    if verdict.preempted:
        st.data["preemptions"] = preemptions + 1
    else:
        st.data["restarts"] = restarts + 1
    st.data["attempt"] = attempt + 1
    st.enter(
        ConditionType.RESTARTING,
        verdict.reason,
        verdict.message,
        cleared=failure.reason,
        why=f"attempt {attempt} ended",
    )
    if current is not None and not current.deleting:
        plan.delete_jobs.append(current.name)
    plan.requeue(WAIT_FOR_CLEANUP_SECONDS)


def _succeed(st: WorkingStatus, attempt: AttemptState, job: ResolvedJob) -> None:
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


def _finished(job: ResolvedJob, observed: Observed, st: WorkingStatus, plan: Plan) -> None:
    # Nothing may keep running once the job is terminal (e.g. the deadline failed it).
    for attempt in observed.attempts.values():
        if attempt.owned and not attempt.finished and not attempt.deleting:
            plan.delete_jobs.append(attempt.name)
    _expire(st, plan, job.spec.run_policy.ttl_seconds_after_finished)


def _expire(st: WorkingStatus, plan: Plan, ttl: int | None) -> None:
    """``ttlSecondsAfterFinished``: delete the finished job once it is due, else look again then."""
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
    st = WorkingStatus(old, now, job.generation)
    plan = Plan(status={})
    policy = job.spec.run_policy
    st.data.setdefault("restarts", 0)
    st.data.setdefault("preemptions", 0)

    if c.is_finished(st.conditions):
        _finished(job, observed, st, plan)
        return finish(plan, st, old)

    owned_numbers = [n for n, a in observed.attempts.items() if a.owned]
    number = max([int(old.get("attempt") or 1), *owned_numbers])
    st.data["attempt"] = number
    current = observed.attempts.get(number)

    # Older attempts never outlive a newer one (at most one gang runs).
    for n, attempt in sorted(observed.attempts.items()):
        if n < number and attempt.owned and not attempt.deleting:
            plan.delete_jobs.append(attempt.name)

    started = _deadline_origin(st, policy.suspend)
    deadline = policy.active_deadline_seconds
    if deadline is not None and started is not None and now >= started + timedelta(seconds=deadline):
        _fail(st, plan, Reason.DEADLINE_EXCEEDED, f"the job ran longer than activeDeadlineSeconds={deadline}", current)
        return finish(plan, st, old)

    if current is not None and not current.owned and (current.stale_owner or current.deleting):
        # A FineTuneJob of this name was deleted and recreated: wait for the old Job's GC.
        plan.requeue(WAIT_FOR_CLEANUP_SECONDS)
        return finish(plan, st, old)
    if current is not None and not current.owned:
        _child_conflict(job, st, plan, (Conflict("Job", current.name, False, "not owned by this FineTuneJob"),))
        return finish(plan, st, old)

    _step(job, observed, st, plan, number, current)
    if deadline is not None and started is not None and not c.is_finished(st.conditions):
        plan.requeue((started + timedelta(seconds=deadline) - now).total_seconds())
    return finish(plan, st, old)


def _deadline_origin(st: WorkingStatus, suspend: bool) -> datetime | None:
    """Where ``activeDeadlineSeconds`` counts from (None: not now).  It counts running time: as a batch/v1
    Job's, its clock stops while the job is suspended and starts again when it is resumed."""
    started = c.parse_time(st.data.get("startTime"))
    if started is None or suspend or st.true(ConditionType.SUSPENDED):
        return None  # suspended, or resumed by this very reconcile
    resumed = st.since(ConditionType.SUSPENDED) if st.reason(ConditionType.SUSPENDED) == Reason.RESUMED else None
    return max(started, resumed) if resumed is not None else started


def _step(
    job: ResolvedJob, observed: Observed, st: WorkingStatus, plan: Plan, number: int, current: AttemptState | None
) -> None:
    """The one branch of the state machine that applies to the current attempt."""
    user_suspended = st.true(ConditionType.SUSPENDED) and st.reason(ConditionType.SUSPENDED) == Reason.USER_SUSPENDED
    if current is None or current.deleting:
        _without_job(job, observed, st, plan, number, current)
    elif current.complete:
        _succeed(st, current, job)
        _finished(job, observed, st, plan)
    elif job.spec.run_policy.suspend:
        # Pods stopping (and failing, with a real kubelet) is what a suspension does: never a failure.
        if not current.suspended and not current.finished:
            plan.suspend_job = current.name
        st.enter(
            ConditionType.SUSPENDED,
            Reason.USER_SUSPENDED,
            f"spec.runPolicy.suspend is true: attempt {number} is suspended (its pods checkpoint and stop)",
            why="suspended",
        )
    elif user_suspended:
        _resume(st, plan, current, number)
    elif current.suspended:
        _suspended_job(job, st, plan, current, number)
    elif current.failed:
        failure = classify_failure(current)
        if failure.reason == Reason.DEADLINE_EXCEEDED:
            _fail(st, plan, Reason.DEADLINE_EXCEEDED, failure.message, None)
        else:
            _retry_or_fail(job, st, plan, current, number, failure)
    else:
        _active(job, st, plan, current, number)


def _without_job(
    job: ResolvedJob, observed: Observed, st: WorkingStatus, plan: Plan, number: int, current: AttemptState | None
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
        _unstick(observed, st, plan, number)
        plan.requeue(WAIT_FOR_CLEANUP_SECONDS)  # Foreground-style: never two gangs at once
        return
    if observed.conflicts:
        _conflicting(job, st, plan, observed.conflicts)
        return
    if st.true(ConditionType.RESTARTING) and st.reason(ConditionType.RESTARTING) != Reason.PREEMPTED:
        since = st.since(ConditionType.RESTARTING) or st.now
        due = since + timedelta(seconds=job.spec.run_policy.backoff_seconds)
        if st.now < due:
            plan.requeue((due - st.now).total_seconds())
            return
    plan.create_attempt = number
    st.set(ConditionType.CREATED, True, Reason.CREATED, _created_message(job, number))
    st.clear(ConditionType.RESTARTING, Reason.CREATED, f"attempt {number} created")
    # A stall ended the previous attempt, not this one (Stalled implies phase Running while it is True).
    st.clear(ConditionType.STALLED, Reason.CREATED, f"attempt {number} created")
    st.clear(ConditionType.CHILD_CONFLICT, Reason.RESOLVED, "every child's name is free")
    if st.true(ConditionType.SUSPENDED):
        st.set(ConditionType.SUSPENDED, False, Reason.RESUMED, f"resumed as attempt {number}")
    st.set(ConditionType.RUNNING, False, Reason.PENDING, _pending_message(job, number, 0))
    ready = readiness_of(number, (), job.spec.resources.nodes)
    st.set(ConditionType.PODS_READY, ready.ready, ready.reason, ready.message)


def _unstick(observed: Observed, st: WorkingStatus, plan: Plan, number: int) -> None:
    """Force-delete pods stuck Terminating past their grace period on a lost node (nothing else ever
    will: the kubelet that would confirm their end is gone), so that attempt ``number`` can start."""
    for pod in stuck_pods(observed, st.now):
        if pod.node not in observed.unready_nodes or pod.deletion_deadline is None:
            continue
        late = int((st.now - pod.deletion_deadline).total_seconds())
        when = f"{late}s after its grace period ended" if late >= 0 else f"after its container ended ({pod.phase})"
        plan.force_delete_pods.append(pod.name)
        plan.notices.append(
            Event(
                "Warning",
                Reason.POD_FORCE_DELETED,
                f"pod {pod.name} was still Terminating {when}, on node {pod.node}, which is NotReady, "
                f"unreachable or gone: force-deleted so that attempt {number} can start",
            )
        )
    for states in observed.pods.values():
        for pod in states:
            if pod.deleting and pod.deletion_deadline is not None and pod.deletion_deadline > st.now:
                plan.requeue((pod.deletion_deadline - st.now).total_seconds() + WAIT_FOR_CLEANUP_SECONDS)


def _conflicting(job: ResolvedJob, st: WorkingStatus, plan: Plan, conflicts: tuple[Conflict, ...]) -> None:
    foreign = tuple(conflict for conflict in conflicts if not conflict.stale)
    if foreign:
        _child_conflict(job, st, plan, foreign)
    else:
        plan.requeue(WAIT_FOR_CLEANUP_SECONDS)  # an earlier FineTuneJob's children: garbage collection is due


def _child_conflict(job: ResolvedJob, st: WorkingStatus, plan: Plan, conflicts: tuple[Conflict, ...]) -> None:
    """Foreign objects hold the names of this job's children: say so, adopt nothing, check again later."""
    listed = "; ".join(conflict.describe(job.namespace) for conflict in conflicts)
    st.set(
        ConditionType.CHILD_CONFLICT,
        True,
        Reason.NAME_TAKEN,
        short(
            f"{listed} already exists and is not owned by this FineTuneJob: nothing was adopted or changed; "
            "delete or rename it and the job starts"
        ),
    )
    plan.requeue(CONFLICT_RECHECK_SECONDS)


def _created_message(job: ResolvedJob, number: int) -> str:
    how = "resumes from the latest checkpoint" if number > 1 else "starts"
    return f"attempt {number}: Job {names.job_name_for(job.name, number)} created; training {how}"


def _pending_message(job: ResolvedJob, number: int, running: int) -> str:
    return f"attempt {number}: {running}/{job.spec.resources.nodes} pods running"


def _resume(st: WorkingStatus, plan: Plan, current: AttemptState, number: int) -> None:
    """The user lifted ``spec.runPolicy.suspend``: continue, or resume as a new attempt from the checkpoint."""
    if not current.suspended and not current.finished:
        st.set(ConditionType.SUSPENDED, False, Reason.RESUMED, f"attempt {number} continues")
    elif st.data.get("startTime") is None and not current.queued and not current.finished:
        plan.unsuspend_job = current.name  # it never ran: start it as it is
        st.set(ConditionType.SUSPENDED, False, Reason.RESUMED, f"attempt {number} resumed")
    elif st.data.get("startTime") is None and not current.finished:
        st.set(ConditionType.SUSPENDED, False, Reason.RESUMED, f"attempt {number} waits for Kueue to admit it")
    else:
        # Pods of a suspended Job are gone; resume as a new attempt from the checkpoint (not a restart).
        plan.delete_jobs.append(current.name)
        st.data["attempt"] = number + 1
        st.set(ConditionType.SUSPENDED, False, Reason.RESUMED, f"resuming as attempt {number + 1} from the checkpoint")
        plan.requeue(WAIT_FOR_CLEANUP_SECONDS)


def _suspended_job(job: ResolvedJob, st: WorkingStatus, plan: Plan, current: AttemptState, number: int) -> None:
    """The Job is suspended but the spec is not: Kueue holds it (not admitted yet, or evicted it)."""
    if current.job_failed:
        # A Job that failed while evicted cannot be admitted again: re-queue a new attempt.
        failure = Failure(Reason.EVICTED, f"Job {current.name} failed while it was suspended", None, False, True)
        _retry_or_fail(job, st, plan, current, number, failure)
        return
    if st.true(ConditionType.RUNNING):
        # Evicted while it ran (Kueue preemption): a preemption, counted once, as Running turns False.
        preemptions, limit = st.count("preemptions"), job.spec.run_policy.max_preemptions
        text = f"attempt {number} was evicted (Job {current.name} suspended, its pods checkpoint and stop)"
        if limit is not None and preemptions >= limit:
            _fail(st, plan, Reason.PREEMPTION_LIMIT_EXCEEDED, f"{text}; all {limit} preemptions are used", current)
            return
        st.data["preemptions"] = preemptions + 1
        text += (
            f"; it resumes from the last checkpoint when admitted again (preemption {preemptions + 1}; "
            "restarts are not used)"
        )
        st.set(ConditionType.RUNNING, False, Reason.EVICTED, text)
        plan.notices.append(Event("Warning", Reason.EVICTED, text))
    if current.queued:
        st.set(
            ConditionType.CREATED,
            True,
            Reason.QUEUED,
            f"attempt {number}: waiting for Kueue to admit Job {current.name}",
        )
        if not st.true(ConditionType.RUNNING) and st.reason(ConditionType.RUNNING) != Reason.EVICTED:
            st.set(ConditionType.RUNNING, False, Reason.QUEUED, "queued in Kueue")
    elif st.reason(ConditionType.RUNNING) != Reason.EVICTED:
        st.set(ConditionType.RUNNING, False, Reason.NOT_RUNNING, f"Job {current.name} is suspended")


def _active(job: ResolvedJob, st: WorkingStatus, plan: Plan, current: AttemptState, number: int) -> None:
    nodes = job.spec.resources.nodes
    running = current.running_pods()
    st.set(ConditionType.CREATED, True, Reason.CREATED, _created_message(job, number))
    ready = readiness(current, nodes)
    st.set(ConditionType.PODS_READY, ready.ready, ready.reason, ready.message)
    if running >= nodes:
        st.enter(
            ConditionType.RUNNING,
            Reason.PODS_RUNNING,
            f"attempt {number}: all {nodes} pods running",
            why=f"attempt {number} is running",
        )
        if st.data.get("startTime") is None:
            st.data["startTime"] = c.rfc3339(st.now)
        _check_stall(job, st, plan, current, number)
        return
    st.set(ConditionType.RUNNING, False, Reason.PENDING, _pending_message(job, number, running))
    timeout = job.spec.run_policy.startup_timeout_seconds
    origin = current.start_time or current.created  # this attempt's start: never an earlier attempt's
    if ready.ready or timeout is None or origin is None:
        return
    due = origin + timedelta(seconds=timeout)
    if st.now < due:
        plan.requeue((due - st.now).total_seconds())
        return
    text = f"pods did not all start within startupTimeoutSeconds={timeout}: {ready.message}"
    _retry_or_fail(job, st, plan, current, number, Failure(Reason.STARTUP_TIMEOUT, short(text), None, False))


def _check_stall(job: ResolvedJob, st: WorkingStatus, plan: Plan, current: AttemptState, number: int) -> None:
    """No new optimizer step for ``stallTimeoutSeconds`` (rank 0's metrics, read into status.progress in
    this attempt) is a hang: ``Stalled``, and the gang restarts as a retryable failure."""
    timeout = job.spec.run_policy.stall_timeout_seconds
    progress = st.data.get("progress") or {}
    last = c.parse_time(progress.get("lastStepTime"))
    since = st.since(ConditionType.RUNNING)
    if timeout is None or last is None or since is None or last < since:
        return  # no step read in this attempt yet: nothing to judge by
    due = last + timedelta(seconds=timeout)
    if st.now < due:
        plan.requeue((due - st.now).total_seconds())
        return
    text = (
        f"attempt {number}: rank 0 reported no new optimizer step for {timeout}s (stallTimeoutSeconds): "
        f"still at step {progress.get('step')} since {progress.get('lastStepTime')}"
    )
    st.set(ConditionType.STALLED, True, Reason.NO_PROGRESS, text)
    _retry_or_fail(job, st, plan, current, number, Failure(Reason.STALLED, text, None, False))
