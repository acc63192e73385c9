"""Restart safety: the operator process is SIGKILLed at random points while it reconciles 50
jobs through a failure and a restart; after each restart it must converge with at most one
Job ever created per attempt name and never two attempts of one job running at once."""

from __future__ import annotations

import random
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.operator.conftest import FTJ, NAMESPACE, create_credentials, job_manifest, start_operator
from tests.support.cluster import FakeCluster
from tests.support.kube import EmulatorServer, wait_for

ROOT = Path(__file__).resolve().parents[2]
JOBS = 50
KILLS = 3


class ScriptedCluster(FakeCluster):
    """Attempt 1 of every job fails with a retryable code once running; attempt 2 succeeds."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.overlaps: list[str] = []
        self.told: set[str] = set()  # Jobs whose pods were scripted already

    def step(self) -> None:
        super().step()
        all_pods, all_jobs = self.client.pods(NAMESPACE), self.client.jobs(NAMESPACE)
        pods_by_job: dict[str, list[dict[str, Any]]] = {}
        running_attempts: dict[str, set[str]] = {}
        for pod in all_pods:
            labels = pod["metadata"]["labels"]
            owner = (pod["metadata"].get("ownerReferences") or [{}])[0].get("name", "")
            pods_by_job.setdefault(owner, []).append(pod)
            if (pod.get("status") or {}).get("phase") == "Running" and not pod["metadata"].get("deletionTimestamp"):
                running_attempts.setdefault(labels["kubetune.io/job-name"], set()).add(labels["kubetune.io/attempt"])
        self.overlaps.extend(f"{name}: {sorted(a)}" for name, a in running_attempts.items() if len(a) > 1)
        for job in all_jobs:
            conditions = {c["type"] for c in (job.get("status") or {}).get("conditions") or []}
            name, uid = job["metadata"]["name"], job["metadata"]["uid"]
            if conditions & {"Complete", "Failed"} or job["spec"].get("suspend") or uid in self.told:
                continue
            pods = pods_by_job.get(name, [])
            if len(pods) < job["spec"]["completions"]:
                continue
            if any((p.get("status") or {}).get("phase") != "Running" for p in pods):
                continue
            self.told.add(uid)
            if job["metadata"]["labels"]["kubetune.io/attempt"] == "1":
                message = {"reason": "StorageUnavailable", "message": "s3 timeout", "exitCode": 20}
                self.fail(NAMESPACE, name, exit_code=20, message=message)
            else:
                self.succeed(NAMESPACE, name, {"reason": "Succeeded", "exitCode": 0})


def phases(client: Any) -> Counter[str]:
    return Counter(((o.get("status") or {}).get("phase") or "None") for o in client.list(*FTJ, NAMESPACE))


@pytest.mark.parametrize(
    ("seed", "jobs", "kills"),
    [
        # About 20 s each on 2 quiet cores, so the full scenario (50 jobs, 3 seeds) runs in CI.
        pytest.param(1, JOBS, KILLS, id="seed1-50jobs"),
        pytest.param(2, JOBS, KILLS, id="seed2-50jobs"),
        pytest.param(3, JOBS, KILLS, id="seed3-50jobs"),
    ],
)
def test_operator_killed_at_random_points_converges(seed: int, jobs: int, kills: int, tmp_path: Path) -> None:
    rng = random.Random(seed)  # noqa: S311 (reproducible kill points, not security)
    with EmulatorServer([NAMESPACE]) as cluster:
        client = cluster.client()
        create_credentials(client)
        kubeconfig = cluster.write_kubeconfig(tmp_path / "kubeconfig")
        scripted = ScriptedCluster(client).start(interval=0.15)
        log = tmp_path / "operator.log"
        process = start_operator(cluster, kubeconfig, priority=1, log=log)
        try:
            wait_for(lambda: "Initial authentication has finished" in log.read_text(errors="replace"), 60)
            for i in range(jobs):
                client.create(*FTJ, NAMESPACE, job_manifest(f"r{seed}-{i:02d}"))
            for kill in range(kills):
                time.sleep(rng.uniform(0.5, 4.0))  # somewhere in the middle of creating/restarting attempts
                process.send_signal(signal.SIGKILL)
                process.wait(10)
                process = start_operator(cluster, kubeconfig, priority=kill + 2, log=log)
            deadline = time.monotonic() + 420
            while time.monotonic() < deadline and phases(client).get("Succeeded", 0) < jobs:
                time.sleep(0.5)
            final = phases(client)
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
            scripted.stop()
        tail = log.read_text(errors="replace")[-3000:]
        assert final == {"Succeeded": jobs}, f"{final}\n{scripted.errors[-5:]}\n{tail}"
        jobs_created = Counter(name for (gk, _ns, name) in cluster.emulator.created if gk == ("batch", "jobs"))
        assert max(jobs_created.values()) == 1, [n for n, k in jobs_created.items() if k > 1]
        assert set(jobs_created) == {f"r{seed}-{i:02d}-a{a}" for i in range(jobs) for a in (1, 2)}
        for obj in client.list(*FTJ, NAMESPACE):
            assert obj["status"]["restarts"] == 1
            assert obj["status"]["attempt"] == 2
        leftover = [j["metadata"]["name"] for j in client.jobs(NAMESPACE) if j["metadata"]["name"].endswith("-a1")]
        assert leftover == [], "no orphaned attempt is left"
        assert scripted.overlaps == [], "two attempts of one job never ran at once"
