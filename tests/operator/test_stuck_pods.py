"""A pod stuck Terminating on a NotReady node no longer blocks the gang: the operator force-deletes it
once its grace period is over (Warning Event, metric), and the next attempt starts."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from kubetune_operator.main import OperatorHandle
from tests.operator.conftest import NAMESPACE, job_manifest
from tests.operator.helpers import create, events, job_names, status
from tests.support.cluster import FakeCluster
from tests.support.kube import Client, wait_for

TIMEOUT = 40.0
GRACE = 5  # kubectl drain --grace-period=5


def test_pod_stuck_terminating_on_a_not_ready_node_is_force_deleted(
    operator: OperatorHandle, client: Client, controller: FakeCluster
) -> None:
    create(client, job_manifest("t-lost", maxRestarts=0))
    wait_for(lambda: status(client, "t-lost").get("phase") == "Running", TIMEOUT, what="running")
    pods = controller.job_pods(NAMESPACE, "t-lost-a1")
    node = pods[1]["spec"]["nodeName"]
    forced_before = operator.metrics.registry.get_sample_value("kubetune_operator_pods_force_deleted_total") or 0.0
    # The node is drained, and its kubelet dies before the evicted pod's container could stop.
    controller.set_node_ready(node, False)
    controller.drain(node, grace=GRACE)
    stuck = client.get("v1", "pods", NAMESPACE, pods[1]["metadata"]["name"])
    deadline = datetime.fromisoformat(stuck["metadata"]["deletionTimestamp"].replace("Z", "+00:00"))
    wait_for(lambda: job_names(client, "t-lost") == [], TIMEOUT, what="attempt 1 deleted")
    time.sleep(1.0)
    assert client.get("v1", "pods", NAMESPACE, pods[1]["metadata"]["name"]) is not None, "stuck Terminating"
    assert job_names(client, "t-lost") == [], "attempt 2 waits for the pods of attempt 1"
    wait_for(lambda: "t-lost-a2" in job_names(client, "t-lost"), GRACE + 60, what="attempt 2")
    assert (datetime.now(UTC) - deadline).total_seconds() <= 60, "attempt 2 within 60 s of the grace period's end"
    assert client.get("v1", "pods", NAMESPACE, pods[1]["metadata"]["name"]) is None
    forced = [m for r, m in events(client, "t-lost") if r == "PodForceDeleted"]
    mine = [m for m in forced if pods[1]["metadata"]["name"] in m]
    assert len(mine) == 1
    assert node in mine[0]
    assert "NotReady" in mine[0]
    forced_after = operator.metrics.registry.get_sample_value("kubetune_operator_pods_force_deleted_total") or 0.0
    assert forced_after == forced_before + len(forced)
    st = status(client, "t-lost")
    # A drained node is a preemption: it never counts against maxRestarts (0 here).
    assert (st["restarts"], st["preemptions"], st["attempt"]) == (0, 1, 2)
    controller.set_node_ready(node, True)
    controller.uncordon(node)


def test_a_terminating_pod_on_a_ready_node_is_left_to_its_kubelet(
    operator: OperatorHandle, client: Client, controller: FakeCluster
) -> None:
    create(client, job_manifest("t-slowstop", maxRestarts=0))
    wait_for(lambda: status(client, "t-slowstop").get("phase") == "Running", TIMEOUT, what="running")
    pod = controller.job_pods(NAMESPACE, "t-slowstop-a1")[0]
    controller.evict(pod)
    wait_for(lambda: "t-slowstop-a2" in job_names(client, "t-slowstop"), TIMEOUT, what="attempt 2")
    assert not [m for r, m in events(client, "t-slowstop") if r == "PodForceDeleted"]
