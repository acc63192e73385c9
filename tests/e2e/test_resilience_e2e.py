"""Preemptions and re-created jobs end to end, with the real trainer: the fake cluster disrupts the pods as
Kubernetes does (the trainer gets SIGTERM, commits a checkpoint, exits 21), and a job re-created with
another model finds the old checkpoint incompatible while the same spec resumes it."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kubetune_operator.main import OperatorHandle
from tests.e2e.conftest import NAMESPACE, TIMEOUT, attempt_jobs, conditions, finetune_job, follow
from tests.support.cluster import FakeCluster
from tests.support.kube import Client, wait_for
from tests.support.runtimes import ProcessRuntime
from tests.support.s3 import S3Endpoint

pytestmark = pytest.mark.e2e

FTJ = ("kubetune.io/v1alpha1", "finetunejobs")
COMMITTED = re.compile(r"SIGTERM: checkpoint step-(\d{8}) saved and committed")
RESUMED = re.compile(r"resumed from \S+/checkpoints/step-(\d{8}) at step (\d+)")


def rank0_log(runtime: ProcessRuntime, job_name: str) -> str:
    """What rank 0 (pod index 0) of Job ``job_name`` printed."""
    return "\n".join(p.read_text(errors="replace") for p in (runtime.root / job_name).glob(f"{job_name}-0-*.log"))


def status(client: Client, name: str) -> dict[str, Any]:
    return (client.ftj(NAMESPACE, name) or {}).get("status") or {}


def stepping(client: Client, name: str, attempt: int, beyond: int) -> bool:
    """Attempt ``attempt`` runs and rank 0 reported a step beyond ``beyond`` in it."""
    st = status(client, name)
    progress = st.get("progress") or {}
    running = conditions(st).get("Running") or {}
    return (
        st.get("attempt") == attempt
        and running.get("status") == "True"
        and (progress.get("lastStepTime") or "") >= running.get("lastTransitionTime", "~")
        and int(progress.get("step") or 0) > beyond
    )


def test_five_preemptions_resume_from_the_last_commit_each_time(
    operator: OperatorHandle, client: Client, kubelet: FakeCluster, runtime: ProcessRuntime, assets: dict[str, Path]
) -> None:
    manifest = finetune_job("spot", max_steps=400)
    # Only the SIGTERM checkpoints: each attempt must resume from exactly the one its predecessor committed.
    manifest["spec"]["checkpoint"] = {"everySteps": 100000, "keepLast": 2}
    manifest["spec"]["runPolicy"] = {"maxRestarts": 0, "backoffSeconds": 3600, "terminationGracePeriodSeconds": 60}
    manifest["spec"]["training"]["evaluation"] = {"everySteps": 100000, "metric": "accuracy"}
    client.create(*FTJ, NAMESPACE, manifest)

    def pod(attempt: int, index: int) -> dict[str, Any]:
        return kubelet.job_pods(NAMESPACE, f"spot-a{attempt}")[index]

    disruptions: list[Callable[[int], object]] = [
        lambda a: kubelet.evict(pod(a, 1)),
        lambda a: kubelet.evict(pod(a, 0), reason="PreemptionByKubeScheduler"),
        lambda a: client.delete("v1", "pods", NAMESPACE, pod(a, 1)["metadata"]["name"]),
        lambda a: kubelet.evict(pod(a, 1), reason="DeletionByTaintManager"),
        lambda a: kubelet.evict(pod(a, 0)),
    ]
    committed = 0
    for attempt, disrupt in enumerate(disruptions, start=1):
        wait_for(lambda a=attempt, c=committed: stepping(client, "spot", a, c + 1), TIMEOUT, what=f"attempt {attempt}")
        disrupt(attempt)
        wait_for(
            lambda a=attempt: status(client, "spot").get("preemptions") == a, TIMEOUT, what=f"preemption {attempt}"
        )
        wait_for(lambda a=attempt: COMMITTED.search(rank0_log(runtime, f"spot-a{a}")), TIMEOUT, what="the commit")
        committed = int(COMMITTED.findall(rank0_log(runtime, f"spot-a{attempt}"))[-1])
    wait_for(lambda: stepping(client, "spot", 6, committed + 1), TIMEOUT, what="attempt 6")
    final = follow(client, "spot", {"Succeeded", "Failed"})[-1]
    assert final["phase"] == "Succeeded", json.dumps(final, indent=1)
    assert (final["restarts"], final["preemptions"], final["attempt"]) == (0, 5, 6)
    for attempt in range(1, 6):
        saved = COMMITTED.findall(rank0_log(runtime, f"spot-a{attempt}"))
        resumed = RESUMED.findall(rank0_log(runtime, f"spot-a{attempt + 1}"))
        assert saved, f"attempt {attempt} committed no checkpoint at SIGTERM"
        assert resumed, f"attempt {attempt + 1} did not resume"
        assert int(resumed[0][0]) == int(saved[-1]), f"attempt {attempt + 1} resumed {resumed[0]}, not {saved[-1]}"


def test_recreated_job_with_another_model_is_incompatible_and_the_same_spec_resumes(
    operator: OperatorHandle, client: Client, runtime: ProcessRuntime, s3: S3Endpoint, assets: dict[str, Path]
) -> None:
    original = finetune_job("reborn", max_steps=6)
    original["spec"]["checkpoint"] = {"everySteps": 3, "keepLast": 2}
    client.create(*FTJ, NAMESPACE, original)
    assert follow(client, "reborn", {"Succeeded", "Failed"})[-1]["phase"] == "Succeeded"
    recreate_after_delete(client)

    # The user changes the model and re-creates the job under the same name: same checkpoint URI.
    changed = json.loads(json.dumps(original))
    changed["spec"]["model"]["source"] = "s3://kubetune-e2e/models/tiny-bert-copy"
    client.create(*FTJ, NAMESPACE, changed)
    final = follow(client, "reborn", {"Succeeded", "Failed"})[-1]
    assert final["phase"] == "Failed", json.dumps(final, indent=1)
    failed = conditions(final)["Failed"]
    assert failed["reason"] == "IncompatibleCheckpoint"
    assert f"checkpoints/{NAMESPACE}/reborn/checkpoints/step-00000006" in failed["message"]
    assert "spec.model.source" in failed["message"]
    assert "tiny-bert-copy" in failed["message"]
    assert (final["restarts"], final["attempt"]) == (0, 1)
    time.sleep(2)
    assert attempt_jobs(client, "reborn") in ([], ["reborn-a1"]), "no attempt 2"
    recreate_after_delete(client)

    # The same spec as before: it resumes the old job's checkpoint.
    client.create(*FTJ, NAMESPACE, original)
    final = follow(client, "reborn", {"Succeeded", "Failed"})[-1]
    assert final["phase"] == "Succeeded", json.dumps(final, indent=1)
    resumed = [int(step) for step, _at in RESUMED.findall(rank0_log(runtime, "reborn-a1"))]
    assert resumed == [6], rank0_log(runtime, "reborn-a1")[-2000:]


def recreate_after_delete(client: Client) -> None:
    """Delete FineTuneJob ``reborn`` and wait until it and its attempt Jobs are gone."""
    client.delete(*FTJ, NAMESPACE, "reborn")
    wait_for(lambda: client.ftj(NAMESPACE, "reborn") is None, TIMEOUT, what="reborn deleted")
    wait_for(lambda: not attempt_jobs(client, "reborn"), TIMEOUT, what="its Jobs collected")
