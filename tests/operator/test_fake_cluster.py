"""The fake cluster behaves like a real one where the operator depends on it (stepped by hand, no operator):
a SIGTERM'd container ends its pod ``Failed`` with its exit code, an eviction adds ``DisruptionTarget``,
a NotReady node leaves its pods Terminating, the scheduler reports ``Unschedulable``, a missing Secret
gives ``CreateContainerConfigError``, and the Job controller follows the podFailurePolicy and ``suspend``."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest

from kubetune_operator.builders import desired_children
from kubetune_operator.resolve import load_job
from tests.operator.conftest import EXAMPLE, NAMESPACE, create_credentials, fast_settings
from tests.support.cluster import FakeCluster
from tests.support.kube import Client, EmulatorServer
from tests.support.runtimes import PREEMPTED_MESSAGE, Exit


@pytest.fixture
def cluster() -> Iterator[tuple[Client, FakeCluster]]:
    with EmulatorServer([NAMESPACE]) as server:
        client = server.client()
        create_credentials(client)
        fake = FakeCluster(client)
        yield client, fake
        fake.stop()


def submit(client: Client, name: str, **resources: Any) -> str:
    """What the operator would create for attempt 1 of a job: its ConfigMap, Service and Job."""
    doc = copy.deepcopy(EXAMPLE)
    doc["metadata"] = {"name": name, "namespace": NAMESPACE, "uid": f"uid-{name}"}
    doc["spec"]["runPolicy"] = {"terminationGracePeriodSeconds": 30}
    doc["spec"]["resources"].update(resources)
    for child in desired_children(load_job(doc, fast_settings()), attempt=1):
        plural = {"ConfigMap": ("v1", "configmaps"), "Service": ("v1", "services"), "Job": ("batch/v1", "jobs")}
        client.create(*plural[child["kind"]], NAMESPACE, child)
    return f"{name}-a1"


def steps(fake: FakeCluster, count: int = 4) -> None:
    for _ in range(count):
        fake.step()


def pod(client: Client, fake: FakeCluster, job: str, index: int) -> dict[str, Any]:
    return fake.job_pods(NAMESPACE, job)[index]


def job_conditions(client: Client, job: str) -> dict[str, dict[str, Any]]:
    found = client.get("batch/v1", "jobs", NAMESPACE, job) or {}
    return {c["type"]: c for c in (found.get("status") or {}).get("conditions") or [] if c["status"] == "True"}


def test_pods_are_scheduled_spread_and_run(cluster: tuple[Client, FakeCluster]) -> None:
    client, fake = cluster
    job = submit(client, "spread")
    steps(fake)
    pods = fake.job_pods(NAMESPACE, job)
    assert [p["status"]["phase"] for p in pods] == ["Running", "Running"]
    assert len({p["spec"]["nodeName"] for p in pods}) == 2, "the emptiest node wins: the gang spreads"
    assert client.get("batch/v1", "jobs", NAMESPACE, job)["status"]["startTime"]


def test_eviction_adds_disruption_target_and_the_sigterm_exit_ends_the_pod_failed(
    cluster: tuple[Client, FakeCluster],
) -> None:
    client, fake = cluster
    job = submit(client, "evict")
    steps(fake)
    victim = pod(client, fake, job, 1)
    fake.evict(victim)
    evicted = client.get("v1", "pods", NAMESPACE, victim["metadata"]["name"])
    assert evicted["metadata"]["deletionTimestamp"]
    disruption = next(c for c in evicted["status"]["conditions"] if c["type"] == "DisruptionTarget")
    assert (disruption["status"], disruption["reason"]) == ("True", "EvictionByEvictionAPI")
    fake.kubelets.sync([evicted], {evicted["spec"]["nodeName"]})  # the kubelet: SIGTERM, the exit, Failed
    ended = client.get("v1", "pods", NAMESPACE, victim["metadata"]["name"])
    assert ended is not None, "the Job controller's tracking finalizer keeps it until counted"
    assert ended["status"]["phase"] == "Failed"
    terminated = ended["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 21
    assert terminated["message"] == Exit.of(21, PREEMPTED_MESSAGE).message
    steps(fake, 4)
    failure = job_conditions(client, job)["Failed"]
    assert failure["reason"] == "PodFailurePolicy"
    assert "has condition DisruptionTarget matching FailJob rule at index 0" in failure["message"]
    assert client.get("v1", "pods", NAMESPACE, victim["metadata"]["name"]) is None, "counted, then gone"


def test_a_not_ready_node_leaves_its_pods_terminating(cluster: tuple[Client, FakeCluster]) -> None:
    client, fake = cluster
    job = submit(client, "lost")
    steps(fake)
    victim = pod(client, fake, job, 0)
    fake.set_node_ready(victim["spec"]["nodeName"], False)
    client.delete("v1", "pods", NAMESPACE, victim["metadata"]["name"])
    steps(fake, 6)
    stuck = client.get("v1", "pods", NAMESPACE, victim["metadata"]["name"])
    assert stuck["metadata"]["deletionTimestamp"]
    assert stuck["status"]["phase"] == "Running", "no kubelet reports for it"
    client.delete("v1", "pods", NAMESPACE, victim["metadata"]["name"], grace_period_seconds=0)
    steps(fake, 2)
    assert client.get("v1", "pods", NAMESPACE, victim["metadata"]["name"]) is None, "a forced deletion ends it"


def test_the_scheduler_reports_unschedulable(cluster: tuple[Client, FakeCluster]) -> None:
    client, fake = cluster
    job = submit(client, "nofit", nodeSelector={"gpu.example/model": "h200"})
    steps(fake)
    scheduled = next(c for c in pod(client, fake, job, 0)["status"]["conditions"] if c["type"] == "PodScheduled")
    assert (scheduled["status"], scheduled["reason"]) == ("False", "Unschedulable")
    assert scheduled["message"] == "0/3 nodes are available: 3 node(s) didn't match Pod's node affinity/selector."


def test_a_missing_secret_gives_create_container_config_error(cluster: tuple[Client, FakeCluster]) -> None:
    client, fake = cluster
    doc_secret = "absent-secret"
    job = submit(client, "nosecret")
    client.patch("batch/v1", "jobs", NAMESPACE, job, {"spec": {"suspend": True}})  # swap the Secret's name first
    template = client.get("batch/v1", "jobs", NAMESPACE, job)["spec"]["template"]
    for entry in template["spec"]["containers"][0]["env"]:
        ref = (entry.get("valueFrom") or {}).get("secretKeyRef")
        if ref and not ref.get("optional"):
            ref["name"] = doc_secret
    client.patch("batch/v1", "jobs", NAMESPACE, job, {"spec": {"template": template, "suspend": False}})
    steps(fake, 5)
    waiting = pod(client, fake, job, 0)["status"]["containerStatuses"][0]["state"]["waiting"]
    assert waiting == {"reason": "CreateContainerConfigError", "message": f'secret "{doc_secret}" not found'}


def test_suspending_a_job_stops_its_pods_without_counting_them_as_failures(
    cluster: tuple[Client, FakeCluster],
) -> None:
    client, fake = cluster
    job = submit(client, "pause")
    steps(fake)
    client.patch("batch/v1", "jobs", NAMESPACE, job, {"spec": {"suspend": True}})
    steps(fake, 6)
    assert fake.job_pods(NAMESPACE, job) == []
    conditions = job_conditions(client, job)
    assert "Suspended" in conditions
    assert "Failed" not in conditions
    assert "startTime" not in client.get("batch/v1", "jobs", NAMESPACE, job)["status"]
    client.patch("batch/v1", "jobs", NAMESPACE, job, {"spec": {"suspend": False}})
    steps(fake)
    assert [p["status"]["phase"] for p in fake.job_pods(NAMESPACE, job)] == ["Running", "Running"]
