"""The operator end to end against the API emulator: real kopf, real HTTP, a scripted Job controller."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from kubetune_operator.builders import desired_children
from kubetune_operator.main import OperatorHandle
from kubetune_operator.resolve import load_job
from kubetune_trainer.metrics import TrainerMetrics
from tests.operator.conftest import FTJ, NAMESPACE, MetricsRoutes, job_manifest
from tests.operator.helpers import TIMEOUT, condition, create, events, job_names, status, wait_phase
from tests.support.cluster import FakeCluster
from tests.support.kube import Client, EmulatorServer, wait_for
from tests.support.metrics_endpoint import serving


def strip_server_fields(obj: dict[str, Any]) -> dict[str, Any]:
    obj = json.loads(json.dumps(obj))
    for key in ("uid", "resourceVersion", "creationTimestamp", "generation"):
        obj["metadata"].pop(key, None)
    obj.pop("status", None)
    return obj


def test_create_makes_children_then_running(operator: OperatorHandle, client: Client, cluster: EmulatorServer) -> None:
    created = create(client, job_manifest("t-create"))
    wait_for(lambda: job_names(client, "t-create"), TIMEOUT, what="attempt Job")
    config_map = client.get("v1", "configmaps", NAMESPACE, "t-create-config")
    service = client.get("v1", "services", NAMESPACE, "t-create")
    attempt_job = client.get("batch/v1", "jobs", NAMESPACE, "t-create-a1")
    expected = desired_children(load_job(created, operator.context.settings), attempt=1)
    # Exactly what the pure builders say, owned by the FineTuneJob.
    assert [strip_server_fields(o) for o in (config_map, service, attempt_job)] == expected
    assert attempt_job["metadata"]["ownerReferences"][0]["uid"] == created["metadata"]["uid"]
    st = wait_phase(client, "t-create", "Running")
    assert st["attempt"] == 1
    assert st["startTime"]
    assert st["observedGeneration"] == 1
    assert condition(st, "Created")["status"] == "True"
    reasons = [reason for reason, _ in events(client, "t-create")]
    assert reasons[:2] == ["AttemptCreated", "PodsRunning"]
    # kopf keeps its state in annotations, never in status.
    assert set(st) <= {
        "phase",
        "conditions",
        "attempt",
        "restarts",
        "preemptions",
        "startTime",
        "observedGeneration",
        "progress",
    }
    assert any(k.startswith("kubetune.io/") for k in client.ftj(NAMESPACE, "t-create")["metadata"]["annotations"])


def test_success_records_completion_and_results(
    operator: OperatorHandle, client: Client, controller: FakeCluster
) -> None:
    create(client, job_manifest("t-success"))
    wait_phase(client, "t-success", "Running")
    message = {
        "reason": "Succeeded",
        "message": "published",
        "exitCode": 0,
        "step": 120,
        "evaluation": {"accuracy": 0.91, "f1": 0.9},
        "output": {"uri": "s3://models/ml/t-success"},
        "checkpoint": {"uri": "s3://kubetune-ckpt/ml/t-success/checkpoints/step-00000120", "step": 120},
    }
    controller.succeed(NAMESPACE, "t-success-a1", message)
    st = wait_phase(client, "t-success", "Succeeded")
    assert st["completionTime"]
    assert st["evaluation"] == {"accuracy": 0.91, "f1": 0.9}
    assert st["output"] == {"uri": "s3://models/ml/t-success"}
    assert st["checkpoint"]["step"] == 120
    assert condition(st, "Running")["status"] == "False"
    assert ("Succeeded", "attempt 1 succeeded: accuracy=0.91, f1=0.9") in events(client, "t-success")


def test_retryable_failure_restarts_after_backoff(
    operator: OperatorHandle, client: Client, controller: FakeCluster, cluster: EmulatorServer
) -> None:
    create(client, job_manifest("t-retry", backoffSeconds=2))
    wait_phase(client, "t-retry", "Running")
    failure = {"reason": "StorageUnavailable", "message": "s3://ckpt unreachable", "exitCode": 20}
    controller.fail(NAMESPACE, "t-retry-a1", index=1, exit_code=20, message=failure)
    st = wait_phase(client, "t-retry", "Restarting", 10)
    assert st["restarts"] == 1
    assert st["attempt"] == 2
    assert "s3://ckpt unreachable" in condition(st, "Restarting")["message"]
    wait_for(lambda: "t-retry-a2" in job_names(client, "t-retry"), TIMEOUT, what="attempt 2")
    assert job_names(client, "t-retry") == ["t-retry-a2"], "the old attempt is gone before the new one exists"
    calls = [(c.verb, c.resource) for c in cluster.emulator.calls]
    paths = [c for c in cluster.emulator.calls if c.resource == "jobs" and c.verb in ("create", "delete")]
    assert [c.verb for c in paths if c.namespace == NAMESPACE][-2:] == ["delete", "create"]
    assert calls
    attempt2 = client.get("batch/v1", "jobs", NAMESPACE, "t-retry-a2")
    restarting_since = datetime.fromisoformat(condition(st, "Restarting")["lastTransitionTime"].replace("Z", "+00:00"))
    created_at = datetime.fromisoformat(attempt2["metadata"]["creationTimestamp"].replace("Z", "+00:00"))
    assert (created_at - restarting_since).total_seconds() >= 1, "backoffSeconds is honoured"
    env = {e["name"]: e.get("value") for e in attempt2["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["KUBETUNE_ATTEMPT"] == "2"
    assert env["KUBETUNE_MASTER_ADDR"] == "t-retry-a2-0.t-retry"
    st = wait_phase(client, "t-retry", "Running")
    assert condition(st, "Restarting")["status"] == "False"


def test_permanent_failure_fails_at_once(operator: OperatorHandle, client: Client, controller: FakeCluster) -> None:
    create(client, job_manifest("t-permanent"))
    wait_phase(client, "t-permanent", "Running")
    failure = {"reason": "InvalidData", "message": "train.jsonl line 7: label 'maybe' is not in labels", "exitCode": 11}
    controller.fail(NAMESPACE, "t-permanent-a1", index=0, exit_code=11, message=failure)
    st = wait_phase(client, "t-permanent", "Failed", 10)
    failed = condition(st, "Failed")
    assert failed["reason"] == "InvalidData"
    assert "label 'maybe' is not in labels" in failed["message"]
    assert st["restarts"] == 0
    time.sleep(1.5)
    assert job_names(client, "t-permanent") == ["t-permanent-a1"], "no second attempt"


def test_max_restarts_exhausted(operator: OperatorHandle, client: Client, controller: FakeCluster) -> None:
    create(client, job_manifest("t-exhaust", maxRestarts=1))
    wait_phase(client, "t-exhaust", "Running")
    controller.fail(NAMESPACE, "t-exhaust-a1", exit_code=137, message="OOMKilled")
    wait_for(lambda: job_names(client, "t-exhaust") == ["t-exhaust-a2"], TIMEOUT, what="attempt 2")
    wait_for(
        lambda: (
            status(client, "t-exhaust").get("startTime")
            and status(client, "t-exhaust")["attempt"] == 2
            and status(client, "t-exhaust").get("phase") == "Running"
        ),
        TIMEOUT,
        what="attempt 2 running",
    )
    # A pod failing by itself (not a preemption: those never count against maxRestarts).
    failure = {"reason": "StorageUnavailable", "message": "s3 timeout", "exitCode": 20}
    controller.fail(NAMESPACE, "t-exhaust-a2", exit_code=20, message=failure)
    st = wait_phase(client, "t-exhaust", "Failed", 10)
    assert condition(st, "Failed")["reason"] == "BackoffLimitExceeded"
    assert st["restarts"] == 1
    time.sleep(1.0)
    assert "t-exhaust-a3" not in job_names(client, "t-exhaust")


def test_suspend_then_resume_from_checkpoint(operator: OperatorHandle, client: Client) -> None:
    create(client, job_manifest("t-suspend"))
    wait_phase(client, "t-suspend", "Running")
    client.patch(*FTJ, NAMESPACE, "t-suspend", {"spec": {"runPolicy": {"suspend": True}}})
    st = wait_phase(client, "t-suspend", "Suspended")
    assert condition(st, "Suspended")["reason"] == "SuspendedByUser"
    wait_for(lambda: client.get("batch/v1", "jobs", NAMESPACE, "t-suspend-a1")["spec"]["suspend"] is True, TIMEOUT)
    wait_for(
        lambda: not [p for p in client.pods(NAMESPACE) if p["metadata"]["name"].startswith("t-suspend")],
        TIMEOUT,
        what="pods stopped",
    )
    client.patch(*FTJ, NAMESPACE, "t-suspend", {"spec": {"runPolicy": {"suspend": False}}})
    wait_for(lambda: job_names(client, "t-suspend") == ["t-suspend-a2"], TIMEOUT, what="resumed as attempt 2")
    st = wait_phase(client, "t-suspend", "Running")
    assert st["restarts"] == 0
    assert condition(st, "Suspended")["status"] == "False"


def test_kueue_queued_job_is_followed(operator: OperatorHandle, client: Client) -> None:
    manifest = job_manifest("t-kueue")
    manifest["spec"]["queueName"] = "team-a"
    create(client, manifest)
    wait_for(lambda: job_names(client, "t-kueue"), TIMEOUT)
    job = client.get("batch/v1", "jobs", NAMESPACE, "t-kueue-a1")
    assert job["spec"]["suspend"] is True
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    wait_for(lambda: condition(status(client, "t-kueue"), "Created")["reason"] == "Queued", TIMEOUT)
    time.sleep(1.0)
    assert client.get("batch/v1", "jobs", NAMESPACE, "t-kueue-a1")["spec"]["suspend"] is True, "not fought"
    client.patch("batch/v1", "jobs", NAMESPACE, "t-kueue-a1", {"spec": {"suspend": False}})  # Kueue admits
    wait_phase(client, "t-kueue", "Running")


def test_deletion_cascades_and_nothing_is_recreated(
    operator: OperatorHandle, client: Client, cluster: EmulatorServer
) -> None:
    create(client, job_manifest("t-delete"))
    wait_phase(client, "t-delete", "Running")
    client.delete(*FTJ, NAMESPACE, "t-delete")
    wait_for(lambda: client.ftj(NAMESPACE, "t-delete") is None, TIMEOUT, what="FineTuneJob gone")
    wait_for(lambda: not job_names(client, "t-delete"), TIMEOUT, what="children collected")
    time.sleep(1.0)
    assert not job_names(client, "t-delete")
    assert client.get("v1", "configmaps", NAMESPACE, "t-delete-config") is None


def test_ttl_deletes_finished_job(operator: OperatorHandle, client: Client, controller: FakeCluster) -> None:
    ttl = 3
    create(client, job_manifest("t-ttl", ttlSecondsAfterFinished=ttl))
    wait_phase(client, "t-ttl", "Running")
    finished = time.monotonic()
    controller.succeed(NAMESPACE, "t-ttl-a1", {"reason": "Succeeded", "exitCode": 0})
    # Not polled for the Succeeded phase: on a loaded machine the operator may see the attempt's end after
    # most of the TTL, so the phase can be gone between two polls. The Event and the timing say it all.
    wait_for(lambda: client.ftj(NAMESPACE, "t-ttl") is None, TIMEOUT, what="TTL deletion")
    # completionTime has whole seconds, so the deletion may come up to one second before finished + ttl.
    assert time.monotonic() - finished >= ttl - 1
    assert "Succeeded" in [reason for reason, _ in events(client, "t-ttl")]
    wait_for(lambda: not job_names(client, "t-ttl"), TIMEOUT, what="children collected")


def test_ttl_deletes_a_job_failed_for_an_invalid_spec(operator: OperatorHandle, client: Client) -> None:
    # runPolicy.ttlSecondsAfterFinished deletes a finished job; runbooks.md (FineTuneJobFailed): "delete them
    # or let runPolicy.ttlSecondsAfterFinished remove them". A spec the operator cannot run is Failed too.
    bad = job_manifest("t-invalid-ttl", ttlSecondsAfterFinished=1)
    del bad["spec"]["model"]  # the CRD schema would reject this; assume it was not installed
    create(client, bad)
    assert condition(wait_phase(client, "t-invalid-ttl", "Failed"), "Failed")["reason"] == "InvalidSpec"
    wait_for(lambda: client.ftj(NAMESPACE, "t-invalid-ttl") is None, TIMEOUT, what="TTL deletion")


def test_invalid_spec_fails_while_others_keep_reconciling(operator: OperatorHandle, client: Client) -> None:
    bad = job_manifest("t-invalid")
    bad["spec"]["resources"]["nodes"] = "two"  # the CRD schema would reject this; assume it was not installed
    bad_missing = job_manifest("t-invalid2")
    del bad_missing["spec"]["model"]
    create(client, bad)
    create(client, bad_missing)
    create(client, job_manifest("t-valid"))
    st = wait_phase(client, "t-invalid", "Failed")
    failed = condition(st, "Failed")
    assert failed["reason"] == "InvalidSpec"
    assert "spec.resources.nodes" in failed["message"]
    assert "spec.model" in condition(wait_phase(client, "t-invalid2", "Failed"), "Failed")["message"]
    assert ("InvalidSpec", failed["message"]) in events(client, "t-invalid")
    wait_phase(client, "t-valid", "Running")
    assert not job_names(client, "t-invalid")


def test_api_errors_are_retried(operator: OperatorHandle, client: Client, cluster: EmulatorServer) -> None:
    errors_before = operator.metrics.reconcile_errors._value.get()
    cluster.emulator.fail_next.append(
        (
            lambda call: call.resource == "jobs" and call.verb == "create" and not call.agent.startswith("kubetune-t"),
            500,
        )
    )
    create(client, job_manifest("t-apierror"))
    wait_phase(client, "t-apierror", "Running")
    assert operator.metrics.reconcile_errors._value.get() > errors_before
    assert job_names(client, "t-apierror") == ["t-apierror-a1"]


@pytest.fixture
def trainer_metrics() -> Iterator[tuple[str, CollectorRegistry]]:
    registry = CollectorRegistry()
    with serving(registry) as url:
        yield url, registry


def _trained(metrics: TrainerMetrics, step: int, loss: float) -> None:
    """The trainer's own record of optimizer step ``step`` of a 400-step job (2 s each, 1,234.5 tokens/s)."""
    metrics.record_step(
        step=step,
        epoch=step / 100,
        losses={"total": loss, "task": loss, "auxiliary": 0.0, "l2sp": 0.0},
        learning_rate=1e-4,
        grad_norm=None,
        samples=16,
        tokens=2469,
        seconds=2.0,
        total_steps=400,
    )


def _trainer_at(registry: CollectorRegistry, step: int, loss: float) -> TrainerMetrics:
    """A trainer's metrics in ``registry`` after ``step`` steps from a fresh start."""
    metrics = TrainerMetrics(registry)
    metrics.record_start(step=0, epoch=0.0, total_steps=400)
    _trained(metrics, step, loss)
    return metrics


def _running_job_reads(client: Client, routes: MetricsRoutes, name: str, url: str, step: int) -> None:
    """Create FineTuneJob ``name`` with rank 0's metrics at ``url``; wait until its status shows ``step``."""
    routes.routes[name] = url
    create(client, job_manifest(name))
    wait_phase(client, name, "Running")
    wait_for(lambda: (status(client, name).get("progress") or {}).get("step") == step, TIMEOUT, what="progress")


def test_progress_from_a_real_metrics_endpoint(
    operator: OperatorHandle,
    client: Client,
    routes: MetricsRoutes,
    trainer_metrics: tuple[str, CollectorRegistry],
) -> None:
    url, registry = trainer_metrics
    metrics = _trainer_at(registry, 40, 0.52)
    metrics.checkpoint_step.set(25)
    metrics.checkpoint_timestamp_seconds.set(time.time())
    _running_job_reads(client, routes, "t-progress", url, 40)
    st = status(client, "t-progress")
    assert st["progress"]["totalSteps"] == 400
    assert st["progress"]["loss"] == 0.52
    assert st["progress"]["tokensPerSecond"] == 1234.5
    eta = datetime.fromisoformat(st["progress"]["eta"].replace("Z", "+00:00"))
    assert 620 < (eta - datetime.now(UTC)).total_seconds() < 820  # 360 steps left at 2 s each
    assert st["checkpoint"]["step"] == 25
    assert st["checkpoint"]["uri"] == "s3://ckpt/ml/reviews-lora/checkpoints/step-00000025"
    _trained(metrics, 41, 0.5)
    wait_for(lambda: status(client, "t-progress")["progress"]["step"] == 41, TIMEOUT, what="progress moves")
    routes.routes["t-progress"] = "http://127.0.0.1:9/metrics"  # unreachable: the phase must not change
    time.sleep(1.5)
    assert status(client, "t-progress")["phase"] == "Running"
    assert status(client, "t-progress")["progress"]["step"] == 41


def test_a_restarted_trainer_loading_leaves_the_progress_it_has_not_restated(
    operator: OperatorHandle,
    client: Client,
    routes: MetricsRoutes,
    trainer_metrics: tuple[str, CollectorRegistry],
) -> None:
    url, registry = trainer_metrics
    _trainer_at(registry, 41, 0.5)
    _running_job_reads(client, routes, "t-restart", url, 41)

    # Rank 0's new process serves its metrics from its start, all 0 while it loads the model and checkpoint.
    fresh = CollectorRegistry()
    restarted = TrainerMetrics(fresh)
    with serving(fresh) as restarted_url:
        routes.routes["t-restart"] = restarted_url
        time.sleep(3.5)  # three reads of the loading trainer
        loading = status(client, "t-restart")["progress"]
        assert (loading["step"], loading["loss"], loading["tokensPerSecond"]) == (41, 0.5, 1234.5), loading
        restarted.record_start(step=25, epoch=0.25, total_steps=400)  # restored the checkpoint of step 25
        wait_for(lambda: status(client, "t-restart")["progress"]["step"] == 25, TIMEOUT, what="the resumed step")
        resumed = status(client, "t-restart")["progress"]
        assert (resumed["epoch"], resumed["loss"]) == (0.25, 0.5), resumed  # the last loss known until a step
        _trained(restarted, 26, 0.61)
        wait_for(lambda: status(client, "t-restart")["progress"].get("loss") == 0.61, TIMEOUT, what="the new loss")
        assert status(client, "t-restart")["progress"]["step"] == 26


def test_operator_metrics_and_health(operator: OperatorHandle, client: Client) -> None:
    create(client, job_manifest("t-metrics"))  # its own job: the test passes alone and in any order
    wait_phase(client, "t-metrics", "Running")
    port = operator.context.settings.metrics_port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    assert 'kubetune_operator_jobs{phase="Running"}' in text
    assert "kubetune_operator_reconcile_seconds_bucket" in text
    assert "kubetune_operator_restarts_total" in text
    assert "kubetune_operator_time_to_running_seconds_count" in text
    running = next(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith('kubetune_operator_jobs{phase="Running"}')
    )
    assert running >= 1
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
        assert response.status == 200
    health = operator.context.settings.health_port
    with urllib.request.urlopen(f"http://127.0.0.1:{health}/healthz", timeout=5) as response:
        assert response.status == 200
