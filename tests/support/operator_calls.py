"""Which API calls the operator really makes, for the chart's RBAC audit.

:func:`record_operator_calls` runs the real operator (kopf, peering, timers,
Events) through a representative lifecycle against the API emulator and returns
every ``(apiGroup, resource, verb)`` it used — subresources as ``jobs/status``.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Any

import kopf

from kubetune_operator.main import start_in_thread
from kubetune_operator.settings import OperatorSettings
from tests.support.cluster import FakeCluster
from tests.support.kube import EmulatorServer, wait_for
from tests.support.kubelet import secret

FTJ = ("kubetune.io/v1alpha1", "finetunejobs")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _manifest(name: str, namespace: str, **run_policy: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "model": {"source": "hf://org/model", "task": "sequence-classification", "labels": ["a", "b"]},
            "dataset": {"train": "s3://data/train.jsonl"},
            "strategy": {"type": "lora"},
            "training": {"maxSteps": 10},
            "resources": {"nodes": 2},
            "checkpoint": {"uri": f"s3://ckpt/{name}", "credentialsSecret": "s3-credentials"},
            "runPolicy": {"backoffSeconds": 0, "maxRestarts": 2, "terminationGracePeriodSeconds": 30, **run_policy},
        },
    }


def record_operator_calls(
    namespace: str = "ml", watch_namespaces: list[str] | None = None, timeout: float = 90.0
) -> set[tuple[str, str, str]]:
    """Run a lifecycle (create, run, progress timer, success, retryable failure and restart,
    suspend/resume, a pod stuck on a lost node, deletion, TTL, events, peering, status patches)
    and return the ``(apiGroup, resource, verb)`` set of every call the operator made."""
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    with EmulatorServer([namespace]) as server:
        client = server.client()
        values = {"AWS_ACCESS_KEY_ID": "not-a-key", "AWS_SECRET_ACCESS_KEY": "not-a-secret"}
        client.create("v1", "secrets", namespace, secret(namespace, "s3-credentials", values))
        controller = FakeCluster(client).start(interval=0.1)
        settings = OperatorSettings(
            default_checkpoint_uri="s3://ckpt",
            metrics_port=_free_port(),
            health_port=_free_port(),
            peering_priority=10,
            resync_interval_seconds=1.0,
            progress_interval_seconds=0.3,
            watch_namespaces=watch_namespaces or [],
        )
        operator = start_in_thread(settings, connection=kopf.ConnectionInfo(server=server.url))
        try:
            operator.wait_ready(60)

            def phase(name: str) -> str | None:
                obj = client.ftj(namespace, name)
                return ((obj or {}).get("status") or {}).get("phase")

            client.create(*FTJ, namespace, _manifest("calls-a", namespace, ttlSecondsAfterFinished=0))
            client.create(*FTJ, namespace, _manifest("calls-b", namespace))
            wait_for(lambda: phase("calls-a") == "Running" and phase("calls-b") == "Running", timeout)
            time.sleep(0.8)  # a progress timer tick
            controller.fail(namespace, "calls-b-a1", exit_code=20, message={"reason": "Error", "exitCode": 20})
            wait_for(lambda: client.get("batch/v1", "jobs", namespace, "calls-b-a2"), timeout)
            wait_for(lambda: phase("calls-b") == "Running", timeout)
            client.patch(*FTJ, namespace, "calls-b", {"spec": {"runPolicy": {"suspend": True}}})
            wait_for(lambda: phase("calls-b") == "Suspended", timeout)
            client.patch(*FTJ, namespace, "calls-b", {"spec": {"runPolicy": {"suspend": False}}})
            wait_for(lambda: client.get("batch/v1", "jobs", namespace, "calls-b-a3"), timeout)
            _lost_node(client, controller, namespace, timeout)
            controller.succeed(namespace, "calls-a-a1", {"reason": "Succeeded", "exitCode": 0})
            wait_for(lambda: client.ftj(namespace, "calls-a") is None, timeout)  # TTL
            client.delete(*FTJ, namespace, "calls-b")
            wait_for(lambda: client.ftj(namespace, "calls-b") is None, timeout)
            time.sleep(0.5)
        finally:
            operator.stop()
            controller.stop()
        return {(group, resource, verb) for group, resource, verb, _ns in server.emulator.operator_calls()}


def _lost_node(client: Any, cluster: FakeCluster, namespace: str, timeout: float) -> None:
    """A pod evicted from a node that then goes NotReady stays Terminating: the operator reads the node
    and force-deletes the pod after its grace period, so that the next attempt starts."""
    client.create(*FTJ, namespace, _manifest("calls-c", namespace))
    wait_for(lambda: ((client.ftj(namespace, "calls-c") or {}).get("status") or {}).get("phase") == "Running", timeout)
    pod = cluster.job_pods(namespace, "calls-c-a1")[1]
    cluster.set_node_ready(pod["spec"]["nodeName"], False)
    cluster.evict(pod, grace=1)
    wait_for(lambda: client.get("batch/v1", "jobs", namespace, "calls-c-a2"), timeout)
    cluster.set_node_ready(pod["spec"]["nodeName"], True)
    client.delete(*FTJ, namespace, "calls-c")


if __name__ == "__main__":
    for call in sorted(record_operator_calls()):
        print(*call)
