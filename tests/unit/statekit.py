"""Building blocks of the state-machine tests: a resolved job, raw Jobs and pods as the API returns them."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml

from kubetune_operator.conditions import get_condition
from kubetune_operator.observe import observe
from kubetune_operator.reconcile import Plan, next_status
from kubetune_operator.resolve import ResolvedJob, resolve_job
from kubetune_operator.settings import OperatorSettings
from kubetune_trainer.spec import ConditionType, FineTuneJob

ROOT = Path(__file__).resolve().parents[2]
NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
UID = "uid-1"
NAME = "reviews-lora"


EXAMPLE = yaml.safe_load((ROOT / "examples" / "lora-sequence-classification.yaml").read_text())


SETTINGS = OperatorSettings(default_checkpoint_uri="s3://ckpt")


def make_job(**run_policy: Any) -> ResolvedJob:
    """The LoRA example, resolved, with a uid, generation 3 and ``runPolicy`` overrides."""
    doc = copy.deepcopy(EXAMPLE)
    doc["metadata"].update({"uid": UID, "generation": 3})
    doc["spec"]["runPolicy"] = {"maxRestarts": 2, "backoffSeconds": 30, **run_policy}
    return resolve_job(FineTuneJob.model_validate(doc), SETTINGS)


def job_obj(
    attempt: int,
    *,
    suspend: bool = False,
    conditions: list[str] = (),
    owner: str = UID,
    queue: bool = False,
    deleting: bool = False,
    reason: str = "PodFailurePolicy",
    message: str = "",
    start_time: str | None = None,
) -> dict[str, Any]:
    """A raw attempt Job; ``conditions`` are the types that are True (Failed with ``reason``/``message``)."""
    labels = {"kubetune.io/job-name": NAME, "kubetune.io/attempt": str(attempt)}
    if queue:
        labels["kueue.x-k8s.io/queue-name"] = "q"
    meta: dict[str, Any] = {"name": f"{NAME}-a{attempt}", "labels": labels, "ownerReferences": [{"uid": owner}]}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-02T03:00:00Z"
    return {
        "metadata": meta,
        "spec": {"suspend": suspend},
        "status": {
            "conditions": [
                {
                    "type": t,
                    "status": "True",
                    "reason": reason if t in ("Failed", "FailureTarget") else "X",
                    "message": message if t in ("Failed", "FailureTarget") else "",
                }
                for t in conditions
            ],
            "completionTime": "2026-01-02T03:04:00Z" if "Complete" in conditions else None,
            "startTime": start_time,
        },
    }


def pod_obj(
    attempt: int,
    index: int,
    phase: str = "Running",
    exit_code: int | None = None,
    message: dict[str, Any] | str | None = None,
    *,
    node: str | None = None,
    deleting_until: str | None = None,
    conditions: list[dict[str, Any]] | None = None,
    waiting: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """A raw pod of an attempt: its phase, the trainer's exit, its node, a graceful deletion in progress
    (``deletionTimestamp`` = the end of its grace period), its conditions, or why it waits."""
    status: dict[str, Any] = {"phase": phase, "podIP": f"10.0.0.{index}"}
    if exit_code is not None:
        text = json.dumps(message) if isinstance(message, dict) else (message or "")
        status["containerStatuses"] = [
            {"name": "trainer", "state": {"terminated": {"exitCode": exit_code, "reason": "Error", "message": text}}}
        ]
    if waiting is not None:
        status["containerStatuses"] = [
            {"name": "trainer", "state": {"waiting": {"reason": waiting[0], "message": waiting[1]}}}
        ]
    if conditions is not None:
        status["conditions"] = conditions
    metadata: dict[str, Any] = {
        "name": f"{NAME}-a{attempt}-{index}-x",
        "labels": {
            "kubetune.io/job-name": NAME,
            "kubetune.io/attempt": str(attempt),
            "batch.kubernetes.io/job-completion-index": str(index),
        },
    }
    if deleting_until is not None:
        metadata["deletionTimestamp"] = deleting_until
    return {"metadata": metadata, "spec": {"nodeName": node} if node else {}, "status": status}


def run(
    job: ResolvedJob,
    status: dict[str, Any] | None,
    jobs: list[dict[str, Any]] = (),
    pods: list[dict[str, Any]] = (),
    now: datetime = NOW,
) -> Plan:
    """``next_status`` of the job with this status, Jobs and pods."""
    return next_status(job, observe(NAME, UID, status, jobs, pods), now)


def cond(plan: Plan, kind: ConditionType) -> dict[str, Any]:
    """Condition ``kind`` of the plan's status (it must be there)."""
    found = get_condition(plan.status["conditions"], kind)
    assert found is not None, f"{kind} missing in {plan.status['conditions']}"
    return found


def running_status(attempt: int = 1, restarts: int = 0) -> dict[str, Any]:
    """The status of an attempt whose two pods run (since ten minutes before NOW)."""
    plan = run(
        make_job(),
        {"attempt": attempt, "restarts": restarts},
        [job_obj(attempt)],
        [pod_obj(attempt, 0), pod_obj(attempt, 1)],
        NOW - timedelta(minutes=10),
    )
    return plan.status
