"""Table tests of the pure state machine: every transition of ``next_status``."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from kubetune_operator.conditions import derive_phase, get_condition, set_condition
from kubetune_operator.failures import classify_failure
from kubetune_operator.observe import observe
from kubetune_operator.reconcile import Plan, invalid_spec_plan
from kubetune_trainer.spec import ConditionType, Phase
from tests.unit.statekit import NAME, NOW, UID, cond, job_obj, make_job, pod_obj, run, running_status


def test_new_job_creates_attempt_one() -> None:
    plan = run(make_job(), None)
    assert plan.create_attempt == 1
    assert plan.status["phase"] == Phase.PENDING
    assert plan.status["attempt"] == 1
    assert plan.status["restarts"] == 0
    assert plan.status["observedGeneration"] == 3
    assert cond(plan, ConditionType.CREATED)["reason"] == "AttemptCreated"
    assert [e.reason for e in plan.events] == ["AttemptCreated"]


def test_second_reconcile_creates_nothing() -> None:
    first = run(make_job(), None)
    again = run(make_job(), first.status, [job_obj(1)])
    assert again.create_attempt is None
    assert again.status == first.status
    assert again.events == []


def test_pods_running_makes_it_running_with_start_time() -> None:
    pending = run(make_job(), None).status
    plan = run(make_job(), pending, [job_obj(1)], [pod_obj(1, 0), pod_obj(1, 1, phase="Pending")])
    assert plan.status["phase"] == Phase.PENDING
    assert "1/2 pods running" in cond(plan, ConditionType.RUNNING)["message"]
    plan = run(make_job(), pending, [job_obj(1)], [pod_obj(1, 0), pod_obj(1, 1)])
    assert plan.status["phase"] == Phase.RUNNING
    assert plan.status["startTime"] == "2026-01-02T03:04:05Z"
    assert [e.reason for e in plan.events] == ["PodsRunning"]


def test_last_transition_time_moves_only_on_flip() -> None:
    status = running_status()
    before = cond(Plan(status=status), ConditionType.RUNNING)["lastTransitionTime"]
    later = run(make_job(), status, [job_obj(1)], [pod_obj(1, 0), pod_obj(1, 1)], NOW + timedelta(hours=1))
    assert cond(later, ConditionType.RUNNING)["lastTransitionTime"] == before
    conditions = set_condition([], ConditionType.RUNNING, True, "A", "m", NOW)
    flipped = set_condition(conditions, ConditionType.RUNNING, False, "B", "m", NOW + timedelta(seconds=5))
    assert flipped[0]["lastTransitionTime"] == "2026-01-02T03:04:10Z"


def test_success_reads_rank0_termination_message() -> None:
    message = {
        "reason": "Succeeded",
        "message": "done",
        "exitCode": 0,
        "step": 300,
        "evaluation": {"accuracy": 0.87, "f1": 0.86},
        "output": {"uri": "s3://models/x"},
        "checkpoint": {"uri": "s3://ckpt/x/checkpoints/step-00000300", "step": 300},
    }
    plan = run(
        make_job(),
        running_status(),
        [job_obj(1, conditions=["Complete"])],
        [pod_obj(1, 0, "Succeeded", 0, message), pod_obj(1, 1, "Succeeded", 0, {"reason": "Succeeded"})],
    )
    assert plan.status["phase"] == Phase.SUCCEEDED
    assert plan.status["completionTime"] == "2026-01-02T03:04:00Z"
    assert plan.status["evaluation"] == {"accuracy": 0.87, "f1": 0.86}
    assert plan.status["output"] == {"uri": "s3://models/x"}
    assert plan.status["checkpoint"]["step"] == 300
    assert "accuracy=0.87" in cond(plan, ConditionType.SUCCEEDED)["message"]
    assert cond(plan, ConditionType.RUNNING)["status"] == "False"


def test_status_checkpoint_uri_is_the_step_folder_after_success_too() -> None:
    # The trainer's message names the checkpoint root (spec.checkpoint.uri) and the step; while the job ran,
    # status.checkpoint.uri was the step folder (refresh_progress), and it stays one after success.
    message = {
        "reason": "Succeeded",
        "message": "done",
        "exitCode": 0,
        "step": 300,
        "checkpoint": {"uri": "s3://ckpt/ml/reviews-lora", "step": 300},
    }
    running = {**running_status(), "checkpoint": {"uri": "s3://ckpt/ml/reviews-lora/checkpoints/step-00000250"}}
    plan = run(
        make_job(),
        running,
        [job_obj(1, conditions=["Complete"])],
        [pod_obj(1, 0, "Succeeded", 0, message), pod_obj(1, 1, "Succeeded", 0, {"reason": "Succeeded"})],
    )
    assert plan.status["checkpoint"] == {"uri": "s3://ckpt/ml/reviews-lora/checkpoints/step-00000300", "step": 300}
    assert plan.status["output"] == {"uri": "s3://models/ml/reviews-lora"}  # the resolved spec's, none in the message


@pytest.mark.parametrize(
    ("exit_code", "message", "permanent", "reason"),
    [
        (
            11,
            {"reason": "InvalidData", "message": "train.jsonl line 3: no field 'label'", "exitCode": 11},
            True,
            "InvalidData",
        ),
        (13, {"reason": "NonFiniteLoss", "message": "loss is nan at step 12", "exitCode": 13}, True, "NonFiniteLoss"),
        (10, "", True, "Error"),
        (
            20,
            {"reason": "StorageUnavailable", "message": "s3 unreachable", "exitCode": 20},
            False,
            "StorageUnavailable",
        ),
        (
            21,
            {"reason": "Preempted", "message": "SIGTERM at step 5: checkpoint step-00000005 committed"},
            False,
            "Preempted",
        ),
        (137, "OOMKilled", False, "Error"),
    ],
)
def test_failure_classification(exit_code: int, message: Any, permanent: bool, reason: str) -> None:
    observed = observe(
        NAME,
        UID,
        {},
        [job_obj(1, conditions=["Failed"])],
        [pod_obj(1, 0, "Failed", exit_code, message), pod_obj(1, 1, "Failed", 143, None)],
    )
    failure = classify_failure(observed.attempts[1])
    assert failure.permanent is permanent
    assert failure.reason == reason
    assert failure.exit_code == exit_code


def test_permanent_failure_fails_at_once_with_trainer_message() -> None:
    message = {"reason": "InvalidData", "message": "train.jsonl: field 'label' missing", "exitCode": 11}
    plan = run(
        make_job(),
        running_status(),
        [job_obj(1, conditions=["Failed"])],
        [pod_obj(1, 0, "Failed", 143), pod_obj(1, 1, "Failed", 11, message)],
    )
    failed = cond(plan, ConditionType.FAILED)
    assert plan.status["phase"] == Phase.FAILED
    assert failed["reason"] == "InvalidData"
    assert "field 'label' missing" in failed["message"]
    assert plan.create_attempt is None
    assert plan.status["restarts"] == 0
    assert plan.status["completionTime"] == "2026-01-02T03:04:05Z"
    assert [e.type for e in plan.events] == ["Warning"]


def test_retryable_failure_schedules_restart_and_deletes_old_job() -> None:
    message = {"reason": "StorageUnavailable", "message": "s3 down", "exitCode": 20}
    plan = run(
        make_job(),
        running_status(),
        [job_obj(1, conditions=["Failed"])],
        [pod_obj(1, 0, "Failed", 20, message), pod_obj(1, 1, "Failed", 143)],
    )
    assert plan.status["phase"] == Phase.RESTARTING
    assert plan.status["attempt"] == 2
    assert plan.status["restarts"] == 1
    assert plan.delete_jobs == [f"{NAME}-a1"]
    assert plan.create_attempt is None
    assert "s3 down" in cond(plan, ConditionType.RESTARTING)["message"]


def test_restart_waits_for_old_pods_then_backoff_then_creates() -> None:
    message = {"reason": "StorageUnavailable", "message": "s3 down", "exitCode": 20}
    restarting = run(
        make_job(), running_status(), [job_obj(1, conditions=["Failed"])], [pod_obj(1, 0, "Failed", 20, message)]
    ).status
    # The old Job is being deleted and its pods are still there: wait.
    waiting = run(
        make_job(), restarting, [job_obj(1, conditions=["Failed"], deleting=True)], [pod_obj(1, 0, "Failed", 20)]
    )
    assert waiting.create_attempt is None
    assert waiting.delete_jobs == []
    assert waiting.requeue_after is not None
    # Gone, but the backoff is not over.
    early = run(make_job(), restarting, [], [], NOW + timedelta(seconds=10))
    assert early.create_attempt is None
    assert early.requeue_after == pytest.approx(20.0)
    late = run(make_job(), restarting, [], [], NOW + timedelta(seconds=30))
    assert late.create_attempt == 2
    assert late.status["phase"] == Phase.PENDING
    assert cond(late, ConditionType.RESTARTING)["status"] == "False"


def test_backoff_counts_from_the_failure_and_never_starts_before_the_old_pods_are_gone() -> None:
    # Rank 1 takes 45 s to checkpoint after SIGTERM, longer than backoffSeconds (30): attempt 2 starts as
    # soon as it is gone, as the Restarting message says.
    message = {"reason": "StorageUnavailable", "message": "s3 down", "exitCode": 20}
    failed = run(
        make_job(), running_status(), [job_obj(1, conditions=["Failed"])], [pod_obj(1, 0, "Failed", 20, message)]
    )
    said = cond(failed, ConditionType.RESTARTING)["message"]
    assert "attempt 2 starts once its pods are gone, 30s after this failure at the earliest" in said
    stopping = [pod_obj(1, 1, deleting_until="2026-01-02T03:14:05Z")]
    waiting = run(make_job(), failed.status, [], stopping, NOW + timedelta(seconds=40))
    assert waiting.create_attempt is None  # 40 s after the failure, but rank 1 still checkpoints
    gone = run(make_job(), waiting.status, [], [], NOW + timedelta(seconds=45))
    assert gone.create_attempt == 2


def test_max_restarts_exhausted_fails_with_backoff_limit_exceeded() -> None:
    status = running_status(attempt=3, restarts=2)
    plan = run(make_job(), status, [job_obj(3, conditions=["Failed"])], [pod_obj(3, 0, "Failed", 20)])
    failed = cond(plan, ConditionType.FAILED)
    assert failed["reason"] == "BackoffLimitExceeded"
    assert plan.status["restarts"] == 2
    assert plan.create_attempt is None


def test_deadline_exceeded_fails_and_stops_the_attempt() -> None:
    status = running_status()
    status["startTime"] = "2026-01-02T01:00:00Z"
    plan = run(make_job(activeDeadlineSeconds=3600), status, [job_obj(1)], [pod_obj(1, 0), pod_obj(1, 1)])
    assert cond(plan, ConditionType.FAILED)["reason"] == "DeadlineExceeded"
    assert plan.delete_jobs == [f"{NAME}-a1"]
    by_job = run(make_job(), running_status(), [job_obj(1, conditions=["Failed"], reason="DeadlineExceeded")], [])
    assert cond(by_job, ConditionType.FAILED)["reason"] == "DeadlineExceeded"


def test_time_suspended_is_not_counted_in_active_deadline_seconds() -> None:
    # runPolicy.activeDeadlineSeconds counts from the start or the last resume, as a batch/v1 Job's.  The
    # job ran 10 minutes of its hour, then was suspended for two days.
    status = running_status()
    status["startTime"] = "2026-01-02T02:54:05Z"  # NOW - 10 min
    pods = [pod_obj(1, 0), pod_obj(1, 1)]
    suspending = run(make_job(activeDeadlineSeconds=3600, suspend=True), status, [job_obj(1)], pods)
    assert suspending.status["phase"] == Phase.SUSPENDED
    later = NOW + timedelta(days=2)
    suspended = run(make_job(activeDeadlineSeconds=3600, suspend=True), suspending.status, [job_obj(1, suspend=True)])
    still = run(
        make_job(activeDeadlineSeconds=3600, suspend=True), suspended.status, [job_obj(1, suspend=True)], now=later
    )
    assert still.status["phase"] == Phase.SUSPENDED, cond(still, ConditionType.FAILED)["message"]
    # Resumed two days later: it runs again from its checkpoint instead of failing at once.
    resumed = run(make_job(activeDeadlineSeconds=3600), suspended.status, [job_obj(1, suspend=True)], now=later)
    assert get_condition(resumed.status["conditions"], ConditionType.FAILED) is None
    created = run(make_job(activeDeadlineSeconds=3600), resumed.status, [], now=later + timedelta(seconds=1))
    assert created.create_attempt == 2
    running = run(
        make_job(activeDeadlineSeconds=3600),
        created.status,
        [job_obj(2)],
        [pod_obj(2, 0), pod_obj(2, 1)],
        later + timedelta(minutes=5),
    )
    assert running.status["phase"] == Phase.RUNNING


def test_suspend_running_attempt_then_resume_as_new_attempt() -> None:
    status = running_status()
    suspend = run(make_job(suspend=True), status, [job_obj(1)], [pod_obj(1, 0), pod_obj(1, 1)])
    assert suspend.suspend_job == f"{NAME}-a1"
    assert suspend.status["phase"] == Phase.SUSPENDED
    suspended = run(make_job(suspend=True), suspend.status, [job_obj(1, suspend=True)], [])
    assert suspended.suspend_job is None
    assert suspended.status == suspend.status
    resume = run(make_job(), suspended.status, [job_obj(1, suspend=True)], [])
    assert resume.delete_jobs == [f"{NAME}-a1"]
    assert resume.status["attempt"] == 2
    assert resume.status["restarts"] == 0, "a resume is not a failure"
    assert cond(resume, ConditionType.SUSPENDED)["reason"] == "Resumed"
    create = run(make_job(), resume.status, [], [])
    assert create.create_attempt == 2


def test_suspended_before_start_is_not_created_until_resumed() -> None:
    plan = run(make_job(suspend=True), None)
    assert plan.create_attempt is None
    assert plan.status["phase"] == Phase.SUSPENDED
    resumed = run(make_job(), plan.status)
    assert resumed.create_attempt == 1


def test_kueue_holds_the_job_and_is_followed() -> None:
    created = run(make_job(), None).status
    queued = run(make_job(), created, [job_obj(1, suspend=True, queue=True)], [])
    assert queued.status["phase"] == Phase.PENDING
    assert cond(queued, ConditionType.CREATED)["reason"] == "Queued"
    assert queued.unsuspend_job is None, "never fight Kueue"
    admitted = run(make_job(), queued.status, [job_obj(1, queue=True)], [pod_obj(1, 0), pod_obj(1, 1)])
    assert admitted.status["phase"] == Phase.RUNNING


def test_ttl_deletes_after_finish() -> None:
    message = {"reason": "Succeeded", "exitCode": 0}
    job = make_job(ttlSecondsAfterFinished=60)
    done = run(job, running_status(), [job_obj(1, conditions=["Complete"])], [pod_obj(1, 0, "Succeeded", 0, message)])
    assert done.delete_self is False
    assert done.requeue_after is not None
    later = run(job, done.status, [job_obj(1, conditions=["Complete"])], [], NOW + timedelta(minutes=2))
    assert later.delete_self is True


def test_job_deleted_while_running_is_a_retryable_failure() -> None:
    plan = run(make_job(), running_status(), [], [])
    assert plan.status["phase"] == Phase.RESTARTING
    assert plan.status["restarts"] == 1


def test_foreign_job_with_our_name_is_not_adopted() -> None:
    # A conflict blocks the job (ChildConflict, re-checked later) instead of failing it: once the user
    # removes the foreign Job, the attempt starts.
    plan = run(make_job(), None, [job_obj(1, owner="someone-else")])
    conflict = cond(plan, ConditionType.CHILD_CONFLICT)
    assert (conflict["status"], conflict["reason"]) == ("True", "NameTaken")
    assert "reviews-lora-a1" in conflict["message"]
    assert plan.status["phase"] == Phase.PENDING
    assert plan.create_attempt is None
    assert plan.delete_jobs == []
    assert plan.requeue_after is not None
    assert [e.type for e in plan.events] == ["Warning"]


def test_job_of_a_deleted_namesake_is_waited_for() -> None:
    stale = job_obj(1, owner="old-uid")
    stale["metadata"]["ownerReferences"][0].update({"kind": "FineTuneJob", "name": NAME})
    plan = run(make_job(), None, [stale])
    assert plan.create_attempt is None
    assert plan.requeue_after is not None
    assert get_condition(plan.status["conditions"], ConditionType.FAILED) is None


def test_older_attempts_are_deleted() -> None:
    status = running_status(attempt=2, restarts=1)
    plan = run(make_job(), status, [job_obj(1), job_obj(2)], [pod_obj(2, 0), pod_obj(2, 1)])
    assert plan.delete_jobs == [f"{NAME}-a1"]


def test_invalid_spec_names_the_field() -> None:
    plan = invalid_spec_plan({}, "spec.resources.nodes", "Input should be a valid integer", NOW, 2)
    failed = cond(plan, ConditionType.FAILED)
    assert failed["reason"] == "InvalidSpec"
    assert "spec.resources.nodes" in failed["message"]
    assert plan.status["phase"] == Phase.FAILED
    assert plan.events[0].reason == "InvalidSpec"


def test_invalid_spec_is_deleted_after_its_ttl() -> None:
    failed = invalid_spec_plan({}, "spec.model", "Field required", NOW, 2, ttl_seconds=60)
    assert failed.delete_self is False
    assert failed.requeue_after == pytest.approx(60.0)
    later = invalid_spec_plan(failed.status, "spec.model", "Field required", NOW + timedelta(seconds=61), 2, 60)
    assert later.delete_self is True


def test_phase_is_derived_from_conditions_only() -> None:
    conditions = set_condition([], ConditionType.RUNNING, True, "A", "", NOW)
    assert derive_phase(conditions) == Phase.RUNNING
    conditions = set_condition(conditions, ConditionType.FAILED, True, "B", "", NOW)
    assert derive_phase(conditions) == Phase.FAILED
    assert derive_phase([]) == Phase.PENDING
