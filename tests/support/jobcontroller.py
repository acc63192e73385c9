"""The fake cluster's Job controller: Indexed ``batch/v1`` Jobs as kube-controller-manager runs them.

What the operator's attempt Jobs use, with Kubernetes' semantics:

* one pod per completion index (``<job>-<index>-<suffix>``, the template's labels plus the
  completion-index label and annotation, ``hostname`` ``<job>-<index>``); ``status.startTime``
  when the Job starts, cleared while it is suspended;
* ``podReplacementPolicy: Failed`` and ``backoffLimit: 0``: a failed pod is never replaced;
* the ``podFailurePolicy``: a pod that ended ``Failed`` with an exit code the rules name, or with a
  ``DisruptionTarget`` condition, adds ``FailureTarget``, the other pods are deleted (gracefully:
  their kubelet sends SIGTERM), and ``Failed`` follows once no pod is left running;
* ``suspend``: active pods are deleted (SIGTERM) and do not count as failures; resuming creates
  new ones;
* every index succeeded: ``SuccessCriteriaMet`` then ``Complete``.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from typing import Any

from kubetune_operator import names
from tests.support.kube import Client
from tests.support.kubelet import completion_index, condition, stamp, terminal

JOB_NAME_LABEL = "job-name"  # the Job controller's legacy pod label, next to batch.kubernetes.io/job-name
# Keeps a finished pod until the controller has counted it (Job tracking with finalizers).
TRACKING_FINALIZER = "batch.kubernetes.io/job-tracking"


def _true(job: Mapping[str, Any]) -> set[str]:
    return {c["type"] for c in (job.get("status") or {}).get("conditions") or [] if c.get("status") == "True"}


def _forced(pod: Mapping[str, Any]) -> bool:
    return int(pod["metadata"].get("deletionGracePeriodSeconds") or 0) == 0


def _disrupted(pod: Mapping[str, Any]) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "DisruptionTarget" and c.get("status") == "True" for c in conditions)


def _exit_code(pod: Mapping[str, Any]) -> int | None:
    for container in (pod.get("status") or {}).get("containerStatuses") or []:
        terminated = (container.get("state") or {}).get("terminated")
        if terminated:
            return int(terminated.get("exitCode", 0))
    return None


def matching_rule(job: Mapping[str, Any], pod: Mapping[str, Any]) -> str | None:
    """The message of the first FailJob rule of the Job's podFailurePolicy a failed pod matches, worded as
    the Job controller words it in the Job's ``FailureTarget``/``Failed`` condition; None when none does."""
    code = _exit_code(pod)
    meta = pod["metadata"]
    for index, rule in enumerate(((job["spec"].get("podFailurePolicy") or {}).get("rules")) or []):
        if rule.get("action") != "FailJob":
            continue
        on_codes = rule.get("onExitCodes")
        if on_codes and code is not None and code != 0:
            values = set(on_codes.get("values") or [])
            if (on_codes.get("operator") == "NotIn") != (code in values):
                return (
                    f"Container {on_codes.get('containerName', 'trainer')} for pod {meta['namespace']}/{meta['name']} "
                    f"failed with exit code {code} matching FailJob rule at index {index}"
                )
        for wanted in rule.get("onPodConditions") or []:
            if wanted.get("type") == "DisruptionTarget" and _disrupted(pod):
                return (
                    f"Pod {meta['namespace']}/{meta['name']} has condition DisruptionTarget matching FailJob rule "
                    f"at index {index}"
                )
    return None


class JobController:
    """Reconciles Jobs to pods, one pass at a time (driven by the fake cluster's loop)."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.suspension_deletes: set[str] = set()  # pods deleted because their Job was suspended

    def sync(self, job: dict[str, Any], pods: list[dict[str, Any]]) -> None:
        """One pass over ``job`` and its pods, then the finished pods are released (counted)."""
        self._sync(job, pods)
        # Counted once terminal; a force-deleted pod (its kubelet gone) counts as failed and goes too.
        forced = [pod for pod in pods if pod["metadata"].get("deletionTimestamp") and _forced(pod)]
        self.release([pod for pod in pods if terminal(pod)] + forced)

    def release(self, pods: list[dict[str, Any]]) -> None:
        """Remove the tracking finalizer: of counted pods, and of orphans whose Job is gone."""
        for pod in pods:
            meta = pod["metadata"]
            if TRACKING_FINALIZER in (meta.get("finalizers") or []):
                rest = [f for f in meta["finalizers"] if f != TRACKING_FINALIZER]
                body = {"metadata": {"finalizers": rest or None}}
                self.client.patch("v1", "pods", meta["namespace"], meta["name"], body)

    def _sync(self, job: dict[str, Any], pods: list[dict[str, Any]]) -> None:
        done = _true(job)
        if done & {"Complete", "Failed"}:
            self._delete(pods)  # a finished Job leaves nothing running
            return
        if job["spec"].get("suspend"):
            self._suspend(job, pods)
            return
        counted = [p for p in pods if p["metadata"]["uid"] not in self.suspension_deletes]
        failed = [p for p in counted if (p.get("status") or {}).get("phase") == "Failed"]
        if failed or "FailureTarget" in done:
            self._fail(job, counted, failed)
            return
        self._run(job, counted)

    def _status(self, job: Mapping[str, Any], status: dict[str, Any]) -> None:
        current = job.get("status") or {}
        if all(current.get(key) == value for key, value in status.items()):
            return
        meta = job["metadata"]
        self.client.patch("batch/v1", "jobs", meta["namespace"], meta["name"], {"status": status}, "status")

    def _delete(self, pods: list[dict[str, Any]], *, suspension: bool = False) -> None:
        for pod in pods:
            if terminal(pod) or pod["metadata"].get("deletionTimestamp"):
                continue
            if suspension:
                self.suspension_deletes.add(pod["metadata"]["uid"])
            self.client.delete("v1", "pods", pod["metadata"]["namespace"], pod["metadata"]["name"])

    def _suspend(self, job: dict[str, Any], pods: list[dict[str, Any]]) -> None:
        self._delete(pods, suspension=True)
        conditions = [c for c in (job.get("status") or {}).get("conditions") or [] if c["type"] != "Suspended"]
        suspended = [*conditions, condition("Suspended", True, "JobSuspended", "Job suspended")]
        if "Suspended" not in _true(job):
            self._status(job, {"active": 0, "conditions": suspended, "startTime": None})

    def _fail(self, job: dict[str, Any], pods: list[dict[str, Any]], failed: list[dict[str, Any]]) -> None:
        conditions = list((job.get("status") or {}).get("conditions") or [])
        if "FailureTarget" not in _true(job):
            matched = matching_rule(job, failed[0])
            reason = "PodFailurePolicy" if matched else "BackoffLimitExceeded"
            message = matched or "Job has reached the specified backoff limit"
            conditions.append(condition("FailureTarget", True, reason, message))
            self._status(job, {"conditions": conditions, "failed": len(failed)})
        self._delete(pods)
        running = [p for p in pods if not terminal(p)]
        if not running:
            target = next(c for c in conditions if c["type"] == "FailureTarget")
            final = [*conditions, condition("Failed", True, target["reason"], target["message"])]
            self._status(job, {"conditions": final, "active": 0, "failed": len(failed)})

    def _run(self, job: dict[str, Any], pods: list[dict[str, Any]]) -> None:
        completions = int(job["spec"].get("completions") or 1)
        by_index: dict[int, list[dict[str, Any]]] = {}
        for pod in pods:
            by_index.setdefault(completion_index(pod), []).append(pod)
        succeeded = {i for i, group in by_index.items() if any(p["status"].get("phase") == "Succeeded" for p in group)}
        for index in range(completions):
            if index not in by_index:
                self._create(job, index)
        status: dict[str, Any] = {
            "active": sum(1 for p in pods if not terminal(p) and not p["metadata"].get("deletionTimestamp")),
            "succeeded": len(succeeded),
            "startTime": (job.get("status") or {}).get("startTime") or stamp(),
        }
        conditions = list((job.get("status") or {}).get("conditions") or [])
        if "Suspended" in _true(job):  # resumed
            conditions = [c for c in conditions if c["type"] != "Suspended"]
            status["conditions"] = [*conditions, condition("Suspended", False, "JobResumed", "Job resumed")]
            conditions = status["conditions"]
        if len(succeeded) >= completions:
            conditions += [
                condition("SuccessCriteriaMet", True, "CompletionsReached"),
                condition("Complete", True, "CompletionsReached"),
            ]
            status.update(
                {"conditions": conditions, "completionTime": stamp(), "completedIndexes": f"0-{completions - 1}"}
            )
        self._status(job, status)

    def _create(self, job: Mapping[str, Any], index: int) -> None:
        meta = job["metadata"]
        template = job["spec"]["template"]
        labels = {
            **((template.get("metadata") or {}).get("labels") or {}),
            names.COMPLETION_INDEX_KEY: str(index),
            JOB_NAME_LABEL: meta["name"],
        }
        annotations = {
            **((template.get("metadata") or {}).get("annotations") or {}),
            names.COMPLETION_INDEX_KEY: str(index),
        }
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": f"{meta['name']}-{index}-{secrets.token_hex(3)}",
                "namespace": meta["namespace"],
                "labels": labels,
                "annotations": annotations,
                "finalizers": [TRACKING_FINALIZER],
                "ownerReferences": [
                    {
                        "apiVersion": "batch/v1",
                        "kind": "Job",
                        "name": meta["name"],
                        "uid": meta["uid"],
                        "controller": True,
                        "blockOwnerDeletion": True,
                    }
                ],
            },
            "spec": {**template["spec"], "hostname": f"{meta['name']}-{index}"},
            "status": {"phase": "Pending"},
        }
        self.client.create("v1", "pods", meta["namespace"], pod)
