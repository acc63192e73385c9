"""Preemption-aware restart accounting on the fake cluster, with the real operator.

Every disruption Kubernetes performs — an API eviction, a scheduler preemption, a node drain, a
spot reclaim (graceful node shutdown), a plain ``kubectl delete pod``, a Kueue eviction — ends with
the trainer's container getting SIGTERM, committing a checkpoint and exiting 21, and the pod
ending ``Failed``: the job is re-queued and the attempt counts in ``status.preemptions``, never in
``restarts``; a suspension is not even a preemption.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kubetune_operator.main import OperatorHandle
from tests.operator.conftest import FTJ, NAMESPACE, job_manifest
from tests.operator.helpers import condition, create, events, job_names, status, wait_phase
from tests.support.cluster import FakeCluster
from tests.support.kube import Client, wait_for

TIMEOUT = 40.0


def running_attempt(client: Client, name: str, attempt: int) -> dict[str, Any]:
    """Wait until ``attempt`` of ``name`` runs with all its pods; its status."""
    wait_for(
        lambda: status(client, name).get("attempt") == attempt and status(client, name).get("phase") == "Running",
        TIMEOUT,
        what=f"{name} attempt {attempt} running",
    )
    return status(client, name)


def test_five_preemptions_in_a_row_then_success(
    operator: OperatorHandle, client: Client, controller: FakeCluster
) -> None:
    # A backoff of an hour: a preemption must not wait for it (only failures back off).
    create(client, job_manifest("t-spot", maxRestarts=1, backoffSeconds=3600))
    namespace = NAMESPACE

    def pod(attempt: int, index: int) -> dict[str, Any]:
        return controller.job_pods(namespace, f"t-spot-a{attempt}")[index]

    disruptions: list[tuple[str, Callable[[int], object]]] = [
        ("EvictionByEvictionAPI", lambda a: controller.evict(pod(a, 1))),
        ("PreemptionByKubeScheduler", lambda a: controller.evict(pod(a, 0), reason="PreemptionByKubeScheduler")),
        ("EvictionByEvictionAPI", lambda a: controller.drain(pod(a, 1)["spec"]["nodeName"])),
        ("TerminationByKubelet", lambda a: controller.reclaim_node(pod(a, 0)["spec"]["nodeName"])),
        ("Preempted", lambda a: client.delete("v1", "pods", namespace, pod(a, 1)["metadata"]["name"])),
    ]
    drained: list[str] = []
    for attempt, (reason, disrupt) in enumerate(disruptions, start=1):
        running_attempt(client, "t-spot", attempt)
        node = pod(attempt, 1)["spec"]["nodeName"]
        disrupt(attempt)
        if reason == "EvictionByEvictionAPI" and attempt == 3:
            drained.append(node)
        st = wait_for(
            lambda a=attempt: status(client, "t-spot").get("preemptions") == a and status(client, "t-spot"),
            TIMEOUT,
            what=f"preemption {attempt}",
        )
        assert st["restarts"] == 0
        restarting = condition(st, "Restarting")
        assert restarting["reason"] == "Preempted"
        assert reason in restarting["message"], restarting["message"]
    for node in drained:
        controller.uncordon(node)
    running_attempt(client, "t-spot", 6)
    controller.succeed(namespace, "t-spot-a6", {"reason": "Succeeded", "exitCode": 0, "step": 600})
    st = wait_phase(client, "t-spot", "Succeeded", TIMEOUT)
    assert (st["restarts"], st["preemptions"], st["attempt"]) == (0, 5, 6)
    assert job_names(client, "t-spot") == ["t-spot-a6"]
    preempted = [message for reason, message in events(client, "t-spot") if reason == "Preempted"]
    assert len(preempted) == 5
    # Every new attempt resumes from the latest checkpoint: that is what its Job was created to do.
    created = [message for reason, message in events(client, "t-spot") if reason == "AttemptCreated"]
    assert all("resumes from the latest checkpoint" in m for m in created[1:]), created
    assert operator.metrics.registry.get_sample_value("kubetune_operator_preemptions_total") >= 5


def test_preemptions_are_limited_by_max_preemptions(
    operator: OperatorHandle, client: Client, controller: FakeCluster
) -> None:
    create(client, job_manifest("t-spot-limit", maxPreemptions=1))
    running_attempt(client, "t-spot-limit", 1)
    controller.evict(controller.job_pods(NAMESPACE, "t-spot-limit-a1")[0])
    running_attempt(client, "t-spot-limit", 2)
    controller.evict(controller.job_pods(NAMESPACE, "t-spot-limit-a2")[0])
    st = wait_phase(client, "t-spot-limit", "Failed", TIMEOUT)
    failed = condition(st, "Failed")
    assert failed["reason"] == "PreemptionLimitExceeded"
    assert "all 1 preemptions are used" in failed["message"]
    assert (st["restarts"], st["preemptions"]) == (0, 1)


def test_suspend_and_resume_with_real_kubelet_exits_is_not_a_failure(
    operator: OperatorHandle, client: Client, controller: FakeCluster
) -> None:
    create(client, job_manifest("t-pause", maxRestarts=0))
    running_attempt(client, "t-pause", 1)
    client.patch(*FTJ, NAMESPACE, "t-pause", {"spec": {"runPolicy": {"suspend": True}}})
    st = wait_phase(client, "t-pause", "Suspended", TIMEOUT)
    # The Job controller deleted the pods; each got SIGTERM, checkpointed and ended Failed with exit 21.
    wait_for(lambda: not controller.job_pods(NAMESPACE, "t-pause-a1"), TIMEOUT, what="pods stopped")
    st = status(client, "t-pause")
    assert st["phase"] == "Suspended"
    assert (st["restarts"], st["preemptions"]) == (0, 0)
    client.patch(*FTJ, NAMESPACE, "t-pause", {"spec": {"runPolicy": {"suspend": False}}})
    st = running_attempt(client, "t-pause", 2)
    assert (st["restarts"], st["preemptions"]) == (0, 0)
    assert condition(st, "Suspended")["status"] == "False"
    assert "Failed" not in {c["type"] for c in st["conditions"] if c["status"] == "True"}


def test_kueue_eviction_is_a_preemption_and_readmission_resumes(
    operator: OperatorHandle, client: Client, controller: FakeCluster
) -> None:
    manifest = job_manifest("t-queue", maxRestarts=0)
    manifest["spec"]["queueName"] = "team-a"
    create(client, manifest)
    wait_for(lambda: job_names(client, "t-queue"), TIMEOUT, what="queued Job")
    controller.kueue_admit(NAMESPACE, "t-queue-a1")
    running_attempt(client, "t-queue", 1)
    controller.kueue_evict(NAMESPACE, "t-queue-a1")  # a higher-priority workload takes the quota
    st = wait_for(lambda: status(client, "t-queue").get("preemptions") == 1 and status(client, "t-queue"), TIMEOUT)
    assert st["restarts"] == 0
    assert condition(st, "Running")["reason"] == "Evicted"
    wait_for(lambda: not controller.job_pods(NAMESPACE, "t-queue-a1"), TIMEOUT, what="pods stopped")
    assert ("Evicted", condition(st, "Running")["message"]) in events(client, "t-queue")
    controller.kueue_admit(NAMESPACE, "t-queue-a1")  # admitted again: the same Job starts new pods
    st = running_attempt(client, "t-queue", 1)
    assert (st["restarts"], st["preemptions"]) == (0, 1)
