"""Ten thousand unrelated pods in the API server change nothing for the operator: every pod and Job list
and watch it sends carries a label selector (the emulator records them), and its memory stays within
10 % of a run without them."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import psutil

from tests.operator.conftest import FTJ, NAMESPACE, create_credentials, job_manifest, start_operator
from tests.support.cluster import FakeCluster
from tests.support.kube import EmulatorServer, RecordedCall, wait_for

UNRELATED = 10_000
JOBS = 4
SELECTED = ("pods", "jobs")


def unrelated_pod(index: int) -> dict[str, Any]:
    """A pod of someone else's web application (about 2 KB, as real pods are)."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"web-{index:05d}",
            "namespace": "shop" if index % 2 else NAMESPACE,
            "labels": {"app": "web", "pod-template-hash": f"{index:08x}", "tier": "frontend"},
            "annotations": {"checksum/config": "0" * 64},
        },
        "spec": {
            "nodeName": f"other-{index % 50}",
            "containers": [
                {
                    "name": "web",
                    "image": "registry.example/shop/web:2.41.0",
                    "env": [{"name": f"SETTING_{n}", "value": "x" * 40} for n in range(12)],
                    "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}},
                }
            ],
        },
        "status": {"phase": "Running", "podIP": f"10.9.{index // 250}.{index % 250}"},
    }


def run(unrelated: int, tmp_path: Path) -> tuple[int, list[RecordedCall]]:
    """The operator in its own process through a short lifecycle; its RSS at the end and its calls."""
    with EmulatorServer([NAMESPACE, "shop"]) as cluster:
        client = cluster.client()
        create_credentials(client)
        if unrelated:
            client.create("v1", "pods", "shop", unrelated_pod(0))  # the emulator learns the resource
            cluster.emulator.preload("", "pods", (unrelated_pod(i) for i in range(1, unrelated)))
        fake = FakeCluster(client, pod_selector="app.kubernetes.io/managed-by=kubetune-operator").start(0.1)
        log = tmp_path / f"operator-{unrelated}.log"
        process = start_operator(cluster, cluster.write_kubeconfig(tmp_path / "kubeconfig"), 1, log)
        try:
            wait_for(lambda: "Initial authentication has finished" in log.read_text(errors="replace"), 60)
            names = [f"scale-{i}" for i in range(JOBS)]
            for name in names:
                client.create(*FTJ, NAMESPACE, job_manifest(name))

            def running() -> bool:
                phases = [((client.ftj(NAMESPACE, n) or {}).get("status") or {}).get("phase") for n in names]
                return phases == ["Running"] * JOBS

            wait_for(running, 120, what="every job running")
            fake.fail(NAMESPACE, "scale-0-a1", exit_code=20, message={"reason": "Error", "exitCode": 20})
            wait_for(lambda: client.get("batch/v1", "jobs", NAMESPACE, "scale-0-a2"), 60, what="a restart")
            time.sleep(3.0)  # a few resyncs in steady state
            rss = psutil.Process(process.pid).memory_info().rss
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
            fake.stop()
        calls = [c for c in cluster.emulator.calls if not c.agent.startswith("kubetune-tests")]
        return rss, calls


def test_unrelated_pods_are_never_streamed_to_the_operator(tmp_path: Path) -> None:
    baseline, _ = run(0, tmp_path)
    crowded, calls = run(UNRELATED, tmp_path)
    reads = [c for c in calls if c.resource in SELECTED and c.verb in ("list", "watch")]
    assert {c.resource for c in reads} == set(SELECTED)
    assert {c.verb for c in reads} == {"list", "watch"}, "kopf watches, the reconcile lists"
    unselected = [c for c in reads if not c.selector]
    assert unselected == [], f"every pod and Job list and watch carries a label selector: {unselected[:5]}"
    assert crowded <= baseline * 1.10, f"RSS {crowded / 2**20:.0f} MiB with {UNRELATED} pods vs {baseline / 2**20:.0f}"
