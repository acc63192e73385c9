"""Table tests of the state machine's handling of real-cluster behaviour: preemptions, suspension, pods that
cannot start, stalls, pods stuck on lost nodes and children whose names are taken (all pure)."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest

from kubetune_operator.conditions import rfc3339
from kubetune_operator.failures import classify_failure
from kubetune_operator.observe import Conflict, node_ready, observe, ownership
from kubetune_operator.progress import with_step_time
from kubetune_operator.reconcile import next_status
from kubetune_trainer.spec import ConditionType, Phase
from tests.unit.statekit import NAME, NOW, UID, cond, job_obj, make_job, pod_obj, run, running_status

PREEMPTED = {"reason": "Preempted", "message": "SIGTERM at step 40: checkpoint step-00000040 committed", "exitCode": 21}


def disruption(reason: str) -> list[dict[str, Any]]:
    return [{"type": "DisruptionTarget", "status": "True", "reason": reason, "message": reason}]


# -- what ended an attempt


@pytest.mark.parametrize(
    ("pods", "job_message", "reason", "preempted", "permanent"),
    [
        pytest.param(
            [pod_obj(1, 1, "Failed", 21, PREEMPTED, conditions=disruption("EvictionByEvictionAPI"))],
            "",
            "EvictionByEvictionAPI",
            True,
            False,
            id="evicted-pod",
        ),
        pytest.param(
            [
                pod_obj(
                    1,
                    0,
                    "Running",
                    conditions=disruption("DeletionByTaintManager"),
                    deleting_until="2026-01-02T03:10:00Z",
                )
            ],
            "",
            "DeletionByTaintManager",
            True,
            False,
            id="pod-on-a-lost-node-never-terminates",
        ),
        pytest.param(
            [pod_obj(1, 1, "Failed", 21, PREEMPTED)],
            "",
            "Preempted",
            True,
            False,
            id="sigterm-after-kubectl-delete-pod",
        ),
        pytest.param(
            [],
            "Pod ml/reviews-lora-a1-1-x has condition DisruptionTarget matching FailJob rule at index 0",
            "DisruptionTarget",
            True,
            False,
            id="evicted-pod-already-gone",
        ),
        pytest.param(
            [],
            "Container trainer for pod ml/x failed with exit code 14 matching FailJob rule at index 1",
            "OutOfMemory",
            False,
            True,
            id="oom-pod-gone-job-says-exit-14",
        ),
        pytest.param(
            [
                pod_obj(1, 0, "Failed", 20, {"reason": "StorageUnavailable", "exitCode": 20}),
                pod_obj(1, 1, "Failed", 21, PREEMPTED),
            ],
            "",
            "StorageUnavailable",
            False,
            False,
            id="a-real-failure-beats-the-sigterm-it-caused",
        ),
        pytest.param(
            [
                pod_obj(1, 0, "Failed", 20, {"reason": "Error", "exitCode": 20}),
                pod_obj(1, 1, "Failed", 21, PREEMPTED, conditions=disruption("PreemptionByKubeScheduler")),
            ],
            "",
            "PreemptionByKubeScheduler",
            True,
            False,
            id="a-disruption-beats-the-crash-it-caused",
        ),
        pytest.param(
            [
                pod_obj(
                    1,
                    0,
                    "Failed",
                    14,
                    {"reason": "OutOfMemory", "exitCode": 14},
                    conditions=disruption("EvictionByEvictionAPI"),
                )
            ],
            "",
            "OutOfMemory",
            False,
            True,
            id="permanent-wins",
        ),
    ],
)
def test_what_ended_an_attempt(
    pods: list[dict[str, Any]], job_message: str, reason: str, preempted: bool, permanent: bool
) -> None:
    jobs = [job_obj(1, conditions=["Failed"] if job_message else [], message=job_message)]
    attempt = observe(NAME, UID, {}, jobs, pods).attempts[1]
    assert attempt.failed
    failure = classify_failure(attempt)
    assert (failure.reason, failure.preempted, failure.permanent) == (reason, preempted, permanent)


def test_a_disrupted_pod_ends_the_attempt_before_it_terminates() -> None:
    pods = [
        pod_obj(1, 0),
        pod_obj(1, 1, conditions=disruption("DeletionByTaintManager"), deleting_until="2026-01-02T03:10:00Z"),
    ]
    plan = run(make_job(), running_status(), [job_obj(1)], pods)
    assert plan.delete_jobs == [f"{NAME}-a1"]
    assert (plan.status["restarts"], plan.status["preemptions"], plan.status["attempt"]) == (0, 1, 2)
    assert cond(plan, ConditionType.RESTARTING)["reason"] == "Preempted"


def oom_killed(attempt: int, index: int) -> dict[str, Any]:
    """A pod whose trainer container the kernel OOM-killed (SIGKILL: exit 137, reason OOMKilled)."""
    pod = pod_obj(attempt, index, "Failed", 137)
    pod["status"]["containerStatuses"][0]["state"]["terminated"]["reason"] = "OOMKilled"
    return pod


def test_an_oom_killed_pod_is_a_retryable_failure_not_the_preemption_of_its_sigtermed_peer() -> None:
    # Rank 1's container is OOM-killed; the Job's podFailurePolicy then deletes rank 0, whose trainer
    # checkpoints on SIGTERM and exits 21.  docs/operations.md: an OOMKilled container is a retryable
    # failure, restarted after backoffSeconds and counted in restarts (BackoffLimitExceeded), never a preemption.
    pods = [pod_obj(1, 0, "Failed", 21, PREEMPTED), oom_killed(1, 1)]
    message = f"Container trainer for pod ml/{NAME}-a1-1-x failed with exit code 137 matching FailJob rule"
    jobs = [job_obj(1, conditions=["Failed"], message=message)]
    failure = classify_failure(observe(NAME, UID, {}, jobs, pods).attempts[1])
    assert (failure.reason, failure.preempted, failure.permanent) == ("OOMKilled", False, False)
    plan = run(make_job(), running_status(), jobs, pods)
    assert (plan.status["restarts"], plan.status["preemptions"]) == (1, 0)
    assert cond(plan, ConditionType.RESTARTING)["reason"] == "RestartScheduled"
    # An OOM that repeats uses up maxRestarts instead of looping forever as "preemptions".
    last = [pod_obj(3, 0, "Failed", 21, PREEMPTED), oom_killed(3, 1)]
    used = run(make_job(), running_status(attempt=3, restarts=2), [job_obj(3, conditions=["Failed"])], last)
    assert cond(used, ConditionType.FAILED)["reason"] == "BackoffLimitExceeded"


# -- preemptions are not restarts


def test_a_preemption_requeues_without_backoff_and_counts_apart() -> None:
    pods = [pod_obj(1, 0, "Failed", 21, PREEMPTED), pod_obj(1, 1, "Failed", 143)]
    preempted = run(make_job(backoffSeconds=3600), running_status(), [job_obj(1, conditions=["Failed"])], pods)
    assert (preempted.status["restarts"], preempted.status["preemptions"]) == (0, 1)
    assert [e.reason for e in preempted.events] == ["Preempted"]
    # The old attempt is gone: attempt 2 is created at once, not after backoffSeconds.
    plan = next_status(make_job(backoffSeconds=3600), observe(NAME, UID, preempted.status, [], []), NOW)
    assert plan.create_attempt == 2


def test_max_preemptions() -> None:
    status = {**running_status(), "preemptions": 2}
    pods = [pod_obj(1, 0, "Failed", 21, PREEMPTED)]
    plan = run(make_job(maxPreemptions=2), status, [job_obj(1, conditions=["Failed"])], pods)
    assert plan.status["phase"] == Phase.FAILED
    assert cond(plan, ConditionType.FAILED)["reason"] == "PreemptionLimitExceeded"


def test_suspension_is_never_a_failure_even_when_pods_end_failed() -> None:
    suspending = run(make_job(suspend=True), running_status(), [job_obj(1)], [pod_obj(1, 0), pod_obj(1, 1)])
    assert suspending.suspend_job == f"{NAME}-a1"
    # The real kubelet: every pod got SIGTERM, checkpointed and ended Failed with exit 21; the Job is
    # suspended (and might even be marked Failed by a Job controller that counted them).
    stopped = [pod_obj(1, 0, "Failed", 21, PREEMPTED), pod_obj(1, 1, "Failed", 21, PREEMPTED)]
    for conditions in ([], ["Failed"]):
        jobs = [job_obj(1, suspend=True, conditions=conditions)]
        plan = run(make_job(suspend=True), suspending.status, jobs, stopped)
        assert plan.status["phase"] == Phase.SUSPENDED
        assert (plan.status["restarts"], plan.status["preemptions"]) == (0, 0)
        resumed = run(make_job(), plan.status, jobs, stopped)
        assert resumed.delete_jobs == [f"{NAME}-a1"]
        assert (resumed.status["attempt"], resumed.status["restarts"], resumed.status["preemptions"]) == (2, 0, 0)


def test_kueue_eviction_of_a_running_attempt_counts_once() -> None:
    status = running_status()
    evicted = run(make_job(), status, [job_obj(1, suspend=True, queue=True)], [pod_obj(1, 0, "Failed", 21, PREEMPTED)])
    assert evicted.status["preemptions"] == 1
    assert cond(evicted, ConditionType.RUNNING)["reason"] == "Evicted"
    assert [e.reason for e in evicted.notices] == ["Evicted"]
    again = run(make_job(), evicted.status, [job_obj(1, suspend=True, queue=True)], [])
    assert again.status["preemptions"] == 1
    assert again.notices == []
    assert again.delete_jobs == []


# -- pods that cannot start, and the startup timeout


@pytest.mark.parametrize(
    ("pods", "reason", "words"),
    [
        (
            [pod_obj(1, 0, "Pending", waiting=("CreateContainerConfigError", 'secret "s3" not found')), pod_obj(1, 1)],
            "CreateContainerConfigError",
            'secret "s3" not found',
        ),
        (
            [
                pod_obj(
                    1,
                    0,
                    "Pending",
                    conditions=[
                        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/3 nodes"}
                    ],
                ),
                pod_obj(1, 1, "Pending", waiting=("ImagePullBackOff", "Back-off pulling image")),
            ],
            "ImagePullBackOff",
            "Back-off pulling image",
        ),
        ([pod_obj(1, 0, "Pending", waiting=("ContainerCreating", ""))], "ContainerCreating", "1 pod(s) not created"),
        ([], "Pending", "0/2 pods started; 2 pod(s) not created yet"),
    ],
)
def test_pods_ready_says_why_pods_do_not_start(pods: list[dict[str, Any]], reason: str, words: str) -> None:
    plan = run(make_job(), running_status(), [job_obj(1)], pods)
    ready = cond(plan, ConditionType.PODS_READY)
    assert (ready["status"], ready["reason"]) == ("False", reason)
    assert words in ready["message"] or reason == "ContainerCreating"
    quiet = reason in ("Pending", "ContainerCreating")
    assert ("Warning", reason) in [(e.type, e.reason) for e in plan.events] or quiet


def test_startup_timeout_counts_from_the_attempt_jobs_start() -> None:
    waiting = [pod_obj(1, 0, "Pending", waiting=("ImagePullBackOff", "x")), pod_obj(1, 1)]
    started = rfc3339(NOW - timedelta(seconds=50))
    job = job_obj(1, start_time=started)
    early = run(make_job(startupTimeoutSeconds=60), running_status(), [job], waiting)
    assert early.status["attempt"] == 1
    assert early.requeue_after is not None
    assert 9 <= early.requeue_after <= 10
    late = run(make_job(startupTimeoutSeconds=60), running_status(), [job], waiting, NOW + timedelta(seconds=11))
    assert (late.status["attempt"], late.status["restarts"]) == (2, 1)
    assert "StartupTimeout" in cond(late, ConditionType.RESTARTING)["message"]


# -- stalls


def _progress(status: dict[str, Any], step: int, at: str) -> dict[str, Any]:
    return {**status, "progress": {"step": step, "lastStepTime": at}}


def test_stall_restarts_the_gang_once_rank0_stops_stepping() -> None:
    status = running_status()  # Running since NOW - 10 min
    stepped = rfc3339(NOW - timedelta(seconds=100))
    pods = [pod_obj(1, 0), pod_obj(1, 1)]
    fine = run(make_job(stallTimeoutSeconds=300), _progress(status, 40, stepped), [job_obj(1)], pods)
    assert fine.status["phase"] == Phase.RUNNING
    assert fine.requeue_after == pytest.approx(200, abs=1)
    stalled = run(make_job(stallTimeoutSeconds=60), _progress(status, 40, stepped), [job_obj(1)], pods)
    assert cond(stalled, ConditionType.STALLED)["reason"] == "NoProgress"
    assert (stalled.status["restarts"], stalled.status["attempt"], stalled.status["phase"]) == (1, 2, Phase.RESTARTING)
    assert {e.reason for e in stalled.events} >= {"NoProgress", "RestartScheduled"}


def test_no_stall_judged_without_a_step_read_in_this_attempt() -> None:
    status = running_status()
    before_this_attempt = rfc3339(NOW - timedelta(hours=1))
    plan = run(
        make_job(stallTimeoutSeconds=60),
        _progress(status, 40, before_this_attempt),
        [job_obj(1)],
        [pod_obj(1, 0), pod_obj(1, 1)],
    )
    assert plan.status["phase"] == Phase.RUNNING


def test_last_step_time_moves_with_the_step_and_with_a_new_attempt() -> None:
    since = NOW - timedelta(minutes=1)
    first = with_step_time({"step": 5}, {}, since, NOW)
    assert first["lastStepTime"] == rfc3339(NOW)
    same = with_step_time({"step": 5}, first, since, NOW + timedelta(seconds=30))
    assert same["lastStepTime"] == rfc3339(NOW)
    moved = with_step_time({"step": 6}, same, since, NOW + timedelta(seconds=31))
    assert moved["lastStepTime"] == rfc3339(NOW + timedelta(seconds=31))
    new_attempt = with_step_time({"step": 6}, moved, NOW + timedelta(minutes=5), NOW + timedelta(minutes=6))
    assert new_attempt["lastStepTime"] == rfc3339(NOW + timedelta(minutes=6))


def test_a_read_that_states_no_step_never_starts_or_moves_the_stall_clock() -> None:
    since = NOW - timedelta(minutes=10)  # running_status(): this attempt Running since then
    stalls_after_a_minute = make_job(stallTimeoutSeconds=60)
    pods = [pod_obj(1, 0), pod_obj(1, 1)]
    # The first attempt loads (backbone, tokens, checkpoint) for nine minutes: its endpoint states no step.
    loading = with_step_time({"updated": rfc3339(NOW - timedelta(minutes=9))}, {}, since, NOW - timedelta(minutes=9))
    assert "lastStepTime" not in loading
    plan = run(stalls_after_a_minute, {**running_status(), "progress": loading}, [job_obj(1)], pods)
    assert plan.status["phase"] == Phase.RUNNING
    # A restarted attempt reloading keeps the last attempt's step and time; the stall check ignores both.
    earlier = {"step": 7, "lastStepTime": rfc3339(NOW - timedelta(hours=1))}
    reloading = with_step_time({}, earlier, since, NOW - timedelta(minutes=9))
    assert reloading == earlier
    plan = run(stalls_after_a_minute, {**running_status(), "progress": reloading}, [job_obj(1)], pods)
    assert plan.status["phase"] == Phase.RUNNING
    # Its first step read starts the clock, even at the step it resumed from; from then on it is judged.
    resumed = with_step_time({"step": 7}, reloading, since, NOW - timedelta(minutes=2))
    assert resumed["lastStepTime"] == rfc3339(NOW - timedelta(minutes=2))
    plan = run(stalls_after_a_minute, {**running_status(), "progress": resumed}, [job_obj(1)], pods)
    assert cond(plan, ConditionType.STALLED)["reason"] == "NoProgress"


def test_the_next_attempt_after_a_stall_is_pending_not_running() -> None:
    # Attempt 1 stalled and was restarted; attempt 2's Job is created and its pods cannot start yet.
    job = make_job(stallTimeoutSeconds=60)
    status = _progress(running_status(), 40, rfc3339(NOW - timedelta(seconds=100)))
    stalled = run(job, status, [job_obj(1)], [pod_obj(1, 0), pod_obj(1, 1)])
    assert stalled.status["phase"] == Phase.RESTARTING
    created = run(job, stalled.status, [], [], NOW + timedelta(seconds=30))
    assert created.create_attempt == 2
    waiting = [pod_obj(2, 0, "Pending", waiting=("ImagePullBackOff", "Back-off pulling image")), pod_obj(2, 1)]
    pending = run(job, created.status, [job_obj(2)], waiting, NOW + timedelta(seconds=60))
    assert cond(pending, ConditionType.RUNNING)["status"] == "False"
    # No pod of attempt 2 runs: kubectl get must not say Running (attempt 1's stall is over).
    assert (created.status["phase"], pending.status["phase"]) == (Phase.PENDING, Phase.PENDING)


# -- pods stuck on lost nodes


def test_pods_stuck_on_a_lost_node_are_force_deleted_after_their_grace_period() -> None:
    ended = rfc3339(NOW - timedelta(seconds=5))
    # Attempt 1 was preempted and its Job deleted; one of its pods is still Terminating on node-2.
    pods = [pod_obj(1, 1, "Failed", 21, PREEMPTED)]
    status = run(make_job(), running_status(), [job_obj(1, conditions=["Failed"])], pods).status
    stuck = pod_obj(1, 1, "Running", node="node-2", deleting_until=ended)
    observed = observe(NAME, UID, status, [], [stuck])
    on_lost_node = next_status(make_job(), replace(observed, unready_nodes=frozenset({"node-2"})), NOW)
    assert on_lost_node.force_delete_pods == [f"{NAME}-a1-1-x"]
    assert [e.reason for e in on_lost_node.notices] == ["PodForceDeleted"]
    assert on_lost_node.create_attempt is None  # the next reconcile, once it is gone
    on_ready_node = next_status(make_job(), observed, NOW)
    assert on_ready_node.force_delete_pods == []
    in_grace = observe(
        NAME, UID, status, [], [pod_obj(1, 1, node="node-2", deleting_until=rfc3339(NOW + timedelta(seconds=20)))]
    )
    waiting = next_status(make_job(), replace(in_grace, unready_nodes=frozenset({"node-2"})), NOW)
    assert waiting.force_delete_pods == []
    assert waiting.requeue_after is not None  # looked at again while its pods are left


# -- children whose names are taken


def test_a_foreign_child_blocks_creation_until_it_is_gone() -> None:
    observed = observe(NAME, UID, None, [], [])
    conflict = Conflict("Service", NAME, False, "no owner")
    blocked = next_status(make_job(), replace(observed, conflicts=(conflict,)), NOW)
    assert blocked.create_attempt is None
    assert cond(blocked, ConditionType.CHILD_CONFLICT)["reason"] == "NameTaken"
    assert f"Service ml/{NAME} (no owner)" in cond(blocked, ConditionType.CHILD_CONFLICT)["message"]
    assert blocked.status["phase"] == Phase.PENDING
    stale = next_status(make_job(), replace(observed, conflicts=(replace(conflict, stale=True),)), NOW)
    assert stale.create_attempt is None
    assert "ChildConflict" not in {c["type"] for c in stale.status["conditions"]}
    free = next_status(make_job(), observe(NAME, UID, blocked.status, [], []), NOW)
    assert free.create_attempt == 1
    assert cond(free, ConditionType.CHILD_CONFLICT)["status"] == "False"


@pytest.mark.parametrize(
    ("refs", "ours", "stale", "who"),
    [
        ([{"kind": "FineTuneJob", "name": NAME, "uid": UID}], True, False, "owned by this FineTuneJob"),
        ([{"kind": "FineTuneJob", "name": NAME, "uid": "old-uid"}], False, True, f"owned by FineTuneJob {NAME}"),
        ([{"kind": "Deployment", "name": "web", "uid": "x"}], False, False, "owned by Deployment web"),
        ([], False, False, "no owner"),
    ],
)
def test_ownership_of_an_existing_child(refs: list[dict[str, str]], ours: bool, stale: bool, who: str) -> None:
    assert ownership({"metadata": {"ownerReferences": refs}}, UID, NAME) == (ours, stale, who)


@pytest.mark.parametrize(
    ("ready", "taints", "expected"),
    [
        ("True", [], True),
        ("Unknown", [], False),
        ("False", [], False),
        ("True", [{"key": "node.kubernetes.io/unreachable", "effect": "NoExecute"}], False),
        ("True", [{"key": "nvidia.com/gpu", "effect": "NoSchedule"}], True),
    ],
)
def test_node_ready(ready: str, taints: list[dict[str, str]], expected: bool) -> None:
    node = {"spec": {"taints": taints}, "status": {"conditions": [{"type": "Ready", "status": ready}]}}
    assert node_ready(node) is expected
