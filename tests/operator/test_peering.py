"""Two operator replicas with kopf peering against one API: only the leader acts."""

from __future__ import annotations

from collections import Counter

import kopf

from kubetune_operator.main import OperatorHandle, start_in_thread
from tests.operator.conftest import FTJ, NAMESPACE, fast_settings, job_manifest
from tests.support.cluster import FakeCluster
from tests.support.kube import EmulatorServer, wait_for

TIMEOUT = 40.0


def reconciles(handle: OperatorHandle) -> float:
    return handle.metrics.registry.get_sample_value("kubetune_operator_reconcile_seconds_count") or 0.0


def test_two_replicas_only_the_leader_acts_and_the_other_takes_over(
    cluster: EmulatorServer, controller: FakeCluster
) -> None:
    client = cluster.client()
    connection = kopf.ConnectionInfo(server=cluster.url)

    def peers() -> set[str]:
        peering = client.get("kopf.dev/v1", "clusterkopfpeerings", None, "kubetune") or {}
        return set(peering.get("status") or {})

    # A rolling start, as a Deployment does it: the standby comes up while the leader is
    # already registered, so its mandatory peering keeps it paused from its first moment.
    # (Two replicas started in the same instant may both act until each has seen the other's
    # keep-alive; kopf's peering gives no stronger guarantee.)
    leader = start_in_thread(fast_settings(peering_priority=200), connection=connection, identity="replica-a")
    standby = None
    try:
        leader.wait_ready(60)
        wait_for(lambda: "replica-a" in peers(), TIMEOUT, what="the leader's peering record")
        standby = start_in_thread(fast_settings(peering_priority=100), connection=connection, identity="replica-b")
        standby.wait_ready(60)
        wait_for(lambda: "replica-b" in peers(), TIMEOUT, what="the standby's peering record")
        names = [f"peer-{i}" for i in range(5)]
        for name in names:
            client.create(*FTJ, NAMESPACE, job_manifest(name))

        def running(name: str) -> bool:
            return ((client.ftj(NAMESPACE, name) or {}).get("status") or {}).get("phase") == "Running"

        wait_for(lambda: all(running(n) for n in names), TIMEOUT, what="all running")
        creates = Counter(
            gk[1] for gk, _ns, _name in cluster.emulator.created if gk[1] in ("jobs", "configmaps", "services")
        )
        assert creates == {"jobs": 5, "configmaps": 5, "services": 5}, "no duplicate creates"
        attempts = Counter(
            c.resource for c in cluster.emulator.calls if c.verb == "create" and c.agent == "kubetune-operator"
        )
        assert attempts["jobs"] <= 6, attempts  # at most one idempotent retry (409) under load
        assert reconciles(leader) > 0
        assert reconciles(standby) == 0, "the standby replica never acted"
        assert {"replica-a", "replica-b"} <= peers()

        leader.stop()  # graceful exit removes it from the peering object
        client.create(*FTJ, NAMESPACE, job_manifest("peer-late"))
        wait_for(lambda: running("peer-late"), TIMEOUT, what="standby took over")
        assert reconciles(standby) > 0
    finally:
        leader.stop()
        if standby is not None:
            standby.stop()
