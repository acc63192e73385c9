"""Pods that cannot start are reported, within one resync, as ``PodsReady=False`` with Kubernetes' own
reason and message, and an Event; ``startupTimeoutSeconds`` restarts an attempt whose pods never start."""

from __future__ import annotations

import time
from typing import Any

from kubetune_operator.main import OperatorHandle
from tests.operator.conftest import NAMESPACE, job_manifest
from tests.operator.helpers import condition, create, events, job_names, status, wait_phase
from tests.support.cluster import FakeCluster
from tests.support.kube import Client, wait_for
from tests.support.kubelet import secret

TIMEOUT = 40.0


def _pod_reason(client: Client, job_name: str) -> tuple[float, dict[str, Any]]:
    """When the first pod of ``job_name`` said why it cannot start, and what it said."""

    def said() -> dict[str, Any] | None:
        for pod in client.pods(NAMESPACE):
            if pod["metadata"]["name"].startswith(job_name + "-"):
                status_ = pod.get("status") or {}
                for cond in status_.get("conditions") or []:
                    if cond["type"] == "PodScheduled" and cond["status"] == "False":
                        return cond
                for container in status_.get("containerStatuses") or []:
                    waiting = (container.get("state") or {}).get("waiting")
                    if waiting:
                        return waiting
        return None

    found = wait_for(said, TIMEOUT, what=f"a pod of {job_name} that cannot start")
    return time.monotonic(), found


def _pods_ready_false(client: Client, name: str, reason: str) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        for cond in status(client, name).get("conditions") or []:
            if cond["type"] == "PodsReady" and cond["status"] == "False" and cond["reason"] == reason:
                return cond
        return None

    found: dict[str, Any] = wait_for(check, TIMEOUT, what=f"{name} PodsReady=False {reason}")
    return found


def test_unschedulable_shows_in_pods_ready_within_one_resync(
    operator: OperatorHandle, client: Client, controller: FakeCluster
) -> None:
    manifest = job_manifest("t-nofit")
    manifest["spec"]["resources"]["nodeSelector"] = {"gpu.example/model": "h200"}  # no such node
    create(client, manifest)
    seen, said = _pod_reason(client, "t-nofit-a1")
    cond = _pods_ready_false(client, "t-nofit", "Unschedulable")
    assert time.monotonic() - seen <= operator.context.settings.resync_interval_seconds + 1
    assert said["message"] in cond["message"]
    assert "0/3 nodes are available: 3 node(s) didn't match Pod's node affinity/selector." in cond["message"]
    st = status(client, "t-nofit")
    assert st["phase"] == "Pending"
    assert ("Unschedulable", cond["message"]) in events(client, "t-nofit")
    warnings = [e for e in client.list("v1", "events", NAMESPACE) if e["reason"] == "Unschedulable"]
    assert {e["type"] for e in warnings} == {"Warning"}


def test_missing_secret_shows_in_pods_ready_and_the_job_starts_once_it_exists(
    operator: OperatorHandle, client: Client, controller: FakeCluster
) -> None:
    manifest = job_manifest("t-nosecret")
    manifest["spec"]["checkpoint"]["credentialsSecret"] = "t-nosecret-s3"  # not created yet
    create(client, manifest)
    seen, said = _pod_reason(client, "t-nosecret-a1")
    cond = _pods_ready_false(client, "t-nosecret", "CreateContainerConfigError")
    assert time.monotonic() - seen <= operator.context.settings.resync_interval_seconds + 1
    assert said["message"] == 'secret "t-nosecret-s3" not found'
    assert said["message"] in cond["message"]
    assert ("CreateContainerConfigError", cond["message"]) in events(client, "t-nosecret")
    # The user adds the Secret: the pods start, nothing was counted against the job.
    values = {"AWS_ACCESS_KEY_ID": "not-a-key", "AWS_SECRET_ACCESS_KEY": "not-a-secret"}
    client.create("v1", "secrets", NAMESPACE, secret(NAMESPACE, "t-nosecret-s3", values))
    st = wait_phase(client, "t-nosecret", "Running", TIMEOUT)
    assert condition(st, "PodsReady")["status"] == "True"
    assert (st["restarts"], st["attempt"]) == (0, 1)


def test_missing_secret_key_is_named(operator: OperatorHandle, client: Client, controller: FakeCluster) -> None:
    manifest = job_manifest("t-nokey")
    manifest["spec"]["checkpoint"]["credentialsSecret"] = "half-secret"
    client.create("v1", "secrets", NAMESPACE, secret(NAMESPACE, "half-secret", {"AWS_ACCESS_KEY_ID": "x"}))
    create(client, manifest)
    cond = _pods_ready_false(client, "t-nokey", "CreateContainerConfigError")
    assert f"couldn't find key AWS_SECRET_ACCESS_KEY in Secret {NAMESPACE}/half-secret" in cond["message"]


def test_image_pull_errors_show_in_pods_ready(
    operator: OperatorHandle, client: Client, controller: FakeCluster
) -> None:
    manifest = job_manifest("t-noimage")
    manifest["spec"]["resources"]["image"] = "registry.example/does-not-exist:1.0"
    create(client, manifest)
    cond = _pods_ready_false(client, "t-noimage", "ImagePullBackOff")
    assert 'Back-off pulling image "registry.example/does-not-exist:1.0"' in cond["message"]


def test_startup_timeout_restarts_the_attempt(
    operator: OperatorHandle, client: Client, controller: FakeCluster
) -> None:
    manifest = job_manifest("t-startup", startupTimeoutSeconds=2, maxRestarts=1)
    manifest["spec"]["resources"]["nodeSelector"] = {"gpu.example/model": "h200"}
    create(client, manifest)
    _pods_ready_false(client, "t-startup", "Unschedulable")
    wait_for(lambda: "t-startup-a2" in job_names(client, "t-startup"), TIMEOUT, what="attempt 2 after the timeout")
    restarting = [m for r, m in events(client, "t-startup") if r == "RestartScheduled"]
    assert restarting, events(client, "t-startup")
    assert "StartupTimeout" in restarting[0]
    assert "startupTimeoutSeconds=2" in restarting[0]
    assert "Unschedulable" in restarting[0] or "didn't match" in restarting[0]
    # Attempt 2 cannot start either: once maxRestarts is used the job fails, saying why.
    st = wait_phase(client, "t-startup", "Failed", TIMEOUT)
    assert condition(st, "Failed")["reason"] == "BackoffLimitExceeded"
    assert "StartupTimeout" in condition(st, "Failed")["message"]
    assert (st["restarts"], st["preemptions"]) == (1, 0)
