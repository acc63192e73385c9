"""The pure builders, settings and progress parser: golden YAML, schema validity, invariants."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.request import urlopen

import kubernetes_validate
import pytest
import yaml
from prometheus_client import CollectorRegistry

from kubetune_operator import names
from kubetune_operator.builders import desired_children
from kubetune_operator.progress import parse_progress
from kubetune_operator.render import render_manifests
from kubetune_operator.resolve import InvalidSpec, load_job, parse_job, resolve_job
from kubetune_operator.settings import OperatorSettings, SettingsError, load_settings
from kubetune_trainer.metrics import TrainerMetrics
from tests.support.metrics_endpoint import serving

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("KUBETUNE_UPDATE_GOLDEN") == "1"
SETTINGS = OperatorSettings(
    default_image="registry.example/kubetune-trainer:1.0",
    default_checkpoint_uri="s3://kubetune-checkpoints",
    checkpoint_endpoint="http://minio.storage:9000",
    credentials_secret="kubetune-s3",
)
UID = "0b5c6a0e-7d3c-4c1e-9b1a-3f7e2d9c1a00"


def _load(name: str) -> dict[str, Any]:
    doc = yaml.safe_load((EXAMPLES / name).read_text())
    doc["metadata"]["uid"] = UID
    return doc


def _pvc_job() -> dict[str, Any]:
    doc = _load("lora-sequence-classification.yaml")
    doc["metadata"]["name"] = "pvc-job"
    spec = doc["spec"]
    spec["model"]["source"] = "pvc://models/minilm"
    spec["dataset"]["train"] = "pvc://datasets/reviews/train.jsonl"
    spec["dataset"]["validation"] = "pvc://datasets/reviews/dev.jsonl"
    spec["checkpoint"] = {"uri": "pvc://scratch/ckpt/pvc-job", "everySteps": 100}
    spec["output"] = {"uri": "pvc://scratch/out/pvc-job"}
    spec["resources"].update(
        {
            "serviceAccountName": "trainer",
            "priorityClassName": "batch-high",
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "shmSize": "16Gi",
        }
    )
    spec["runPolicy"] = {"activeDeadlineSeconds": 7200, "suspend": True, "terminationGracePeriodSeconds": 900}
    return doc


CASES: dict[str, Any] = {
    "lora-sequence-classification": lambda: _load("lora-sequence-classification.yaml"),
    "kueue-queued-lora": lambda: _load("kueue-queued-lora.yaml"),
    "full-sequence-classification-zero3": lambda: _load("full-sequence-classification-zero3.yaml"),
    "pvc-suspended": _pvc_job,
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden_render(case: str) -> None:
    """The rendered objects match the reviewed golden file (KUBETUNE_UPDATE_GOLDEN=1 regenerates)."""
    text = render_manifests([CASES[case]()], SETTINGS)
    golden = GOLDEN / f"{case}.yaml"
    if UPDATE or not golden.exists():
        golden.write_text(text)
        if not UPDATE:
            pytest.fail(f"golden file {golden.name} was missing and has been written; review and commit it")
    assert text == golden.read_text(), f"render differs from {golden}; rerun with KUBETUNE_UPDATE_GOLDEN=1"


@pytest.mark.parametrize(
    ("resources", "processes"),
    [
        ({"nodes": 2, "requests": {"nvidia.com/gpu": 4}}, 4),  # one process per requested GPU
        ({"nodes": 2, "limits": {"nvidia.com/gpu": "2"}}, 2),  # GPU limits alone count too
        ({"nodes": 1, "requests": {"cpu": "8"}}, 1),  # CPU-only pods: one process
        ({"nodes": 1, "processesPerNode": 3}, 3),  # an explicit count on CPUs is kept
    ],
)
def test_processes_per_node_defaults_to_the_gpu_request(resources: dict[str, Any], processes: int) -> None:
    doc = _load("lora-sequence-classification.yaml")
    doc["spec"]["resources"] = resources
    children = desired_children(load_job(doc, SETTINGS), attempt=1)
    job = next(o for o in children if o["kind"] == "Job")
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    assert f"--nproc-per-node={processes}" in args
    config = json.loads(next(o for o in children if o["kind"] == "ConfigMap")["data"]["job.json"])
    assert config["spec"]["resources"]["processesPerNode"] == processes  # the trainer sees the same count


@pytest.mark.parametrize("case", sorted(CASES))
def test_children_validate_against_kubernetes_schema(case: str) -> None:
    for obj in desired_children(load_job(CASES[case](), SETTINGS), attempt=2):
        kubernetes_validate.validate(obj, "1.33.0", strict=True)


def test_attempt_job_gang_semantics() -> None:
    job = load_job(_load("lora-sequence-classification.yaml"), SETTINGS)
    config_map, service, attempt_job = desired_children(job, attempt=3)
    spec = attempt_job["spec"]
    assert attempt_job["metadata"]["name"] == "reviews-lora-a3" == names.job_name_for("reviews-lora", 3)
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == job.spec.resources.nodes == 2
    assert spec["backoffLimit"] == 0
    assert spec["podReplacementPolicy"] == "Failed"
    rules = spec["podFailurePolicy"]["rules"]
    assert all(rule["action"] == "FailJob" for rule in rules), "no rule may Ignore/Count a lost rank"
    # A disruption is matched first, so the Job's failure message names it even when the evicted pod is gone.
    assert rules[0]["onPodConditions"] == [{"type": "DisruptionTarget", "status": "True"}]
    assert rules[1]["onExitCodes"] == {"containerName": "trainer", "operator": "NotIn", "values": [0]}
    assert spec["suspend"] is False
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == service["metadata"]["name"] == names.service_name("reviews-lora")
    assert service["spec"]["clusterIP"] == "None"
    assert pod["automountServiceAccountToken"] is False
    assert pod["restartPolicy"] == "Never"
    container = pod["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["KUBETUNE_MASTER_ADDR"]["value"] == "reviews-lora-a3-0.reviews-lora"
    assert env["KUBETUNE_MASTER_ADDR"]["value"] == names.master_address("reviews-lora", 3)
    assert env["KUBETUNE_ATTEMPT"]["value"] == "3"
    assert env["KUBETUNE_TERMINATION_LOG"]["value"] == "/dev/termination-log"
    assert env["JOB_COMPLETION_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    )
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "s3-credentials",
        "key": "AWS_SECRET_ACCESS_KEY",
    }
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["optional"] is True
    assert container["command"] == ["python", "-m", "kubetune_trainer.launch"]
    assert container["args"][:2] == ["--nnodes=2", "--nproc-per-node=8"]
    assert container["args"][-4:] == ["-m", "kubetune_trainer", "--config", "/etc/kubetune/job.json"]
    assert {"name": "metrics", "containerPort": 9400, "protocol": "TCP"} in container["ports"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"]
    assert not security["allowPrivilegeEscalation"]
    assert security["capabilities"] == {"drop": ["ALL"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}
    assert volumes[mounts["/etc/kubetune"]]["configMap"]["name"] == config_map["metadata"]["name"]
    for obj in (config_map, service, attempt_job):
        labels = obj["metadata"]["labels"]
        assert labels["kubetune.io/job-name"] == "reviews-lora"
        assert labels["app.kubernetes.io/managed-by"] == "kubetune-operator"
        assert obj["metadata"]["ownerReferences"][0]["uid"] == UID


def test_config_map_carries_the_resolved_job() -> None:
    doc = _load("kueue-queued-lora.yaml")
    del doc["spec"]["checkpoint"]["uri"]
    config_map, _service, attempt_job = desired_children(load_job(doc, SETTINGS), attempt=1)
    config = json.loads(config_map["data"]["job.json"])
    assert config["spec"]["checkpoint"]["uri"] == "s3://kubetune-checkpoints/team-a/tickets-queued"
    assert config["spec"]["checkpoint"]["endpoint"] == "http://minio.storage:9000"
    assert config["spec"]["output"]["uri"] == "s3://kubetune-checkpoints/team-a/tickets-queued/output"
    assert config["spec"]["resources"]["image"] == SETTINGS.default_image
    assert "status" not in config
    assert "uid" not in config["metadata"]
    assert attempt_job["spec"]["suspend"] is True  # Kueue admits it
    assert attempt_job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a-gpus"
    again = resolve_job(resolve_job(parse_job(doc), SETTINGS).job, SETTINGS)
    assert again == resolve_job(parse_job(doc), SETTINGS)


def test_spec_values_never_reach_a_shell() -> None:
    doc = _load("lora-sequence-classification.yaml")
    _cm, _svc, attempt_job = desired_children(load_job(doc, SETTINGS), attempt=1)
    container = attempt_job["spec"]["template"]["spec"]["containers"][0]
    words = [*container["command"], *container["args"]]
    assert not any(word in ("sh", "bash", "-c", "/bin/sh") for word in words)
    assert not any("s3://" in word or "hf://" in word for word in words), "URIs travel in the config file only"


def test_pvc_sources_are_mounted() -> None:
    _cm, _svc, attempt_job = desired_children(load_job(_pvc_job(), SETTINGS), attempt=1)
    pod = attempt_job["spec"]["template"]["spec"]
    claims = {
        v["persistentVolumeClaim"]["claimName"]: v["persistentVolumeClaim"]["readOnly"]
        for v in pod["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert claims == {"models": True, "datasets": True, "scratch": False}
    mounts = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert {"/mnt/pvc/models", "/mnt/pvc/datasets", "/mnt/pvc/scratch"} <= mounts
    assert attempt_job["spec"]["suspend"] is True
    assert attempt_job["spec"]["activeDeadlineSeconds"] == 7200
    assert pod["terminationGracePeriodSeconds"] == 900
    assert pod["priorityClassName"] == "batch-high"


def test_missing_checkpoint_uri_without_default_names_the_field() -> None:
    doc = _load("kueue-queued-lora.yaml")
    del doc["spec"]["checkpoint"]["uri"]
    with pytest.raises(InvalidSpec) as caught:
        desired_children(load_job(doc, OperatorSettings()), attempt=1)
    assert caught.value.field == "spec.checkpoint.uri"
    assert "KUBETUNE_DEFAULT_CHECKPOINT_URI" in str(caught.value)


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda s: s["resources"].__setitem__("nodes", "two"), "spec.resources.nodes"),
        (lambda s: s["strategy"].__setitem__("type", "magic"), "spec.strategy"),
        (lambda s: s.__setitem__("bogus", 1), "spec.bogus"),
        (lambda s: s["dataset"].__setitem__("validationSplit", 0.1), "spec.dataset.validationSplit"),
    ],
)
def test_parse_job_names_the_bad_field(mutate: Any, field: str) -> None:
    doc = _load("lora-sequence-classification.yaml")
    mutate(doc["spec"])
    with pytest.raises(InvalidSpec) as caught:
        parse_job(doc)
    assert caught.value.field.startswith(field)


def test_render_outputs_exactly_the_children() -> None:
    docs = [_load("lora-sequence-classification.yaml"), _load("kueue-queued-lora.yaml")]
    rendered = list(yaml.safe_load_all(render_manifests(copy.deepcopy(docs), SETTINGS)))
    expected = [obj for doc in docs for obj in desired_children(load_job(doc, SETTINGS), attempt=1)]
    assert rendered == expected


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBETUNE_WATCH_NAMESPACES", "ml, team-a")
    monkeypatch.setenv("KUBETUNE_DEFAULT_CHECKPOINT_URI", "s3://ckpt")
    monkeypatch.setenv("KUBETUNE_STANDALONE", "true")
    settings = load_settings()
    assert settings.watch_namespaces == ["ml", "team-a"]
    assert settings.default_checkpoint_uri == "s3://ckpt"
    assert settings.metrics_port == 8080
    assert settings.standalone
    monkeypatch.setenv("KUBETUNE_WATCH_NAMESPACES", "all")
    assert load_settings().all_namespaces


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("KUBETUNE_METRICS_PORT", "eighty"),
        ("KUBETUNE_DEFAULT_CHECKPOINT_URI", "http://not-storage"),
        ("KUBETUNE_DEFAULT_IMAGE", "bad image"),
        ("KUBETUNE_WATCH_NAMESPACES", "Bad_NS"),
        ("KUBETUNE_PROGRESS_INTERVAL_SECONDS", "0"),
    ],
)
def test_bad_settings_name_the_variable(monkeypatch: pytest.MonkeyPatch, variable: str, value: str) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError, match=variable):
        load_settings()


@pytest.fixture
def trainer_endpoint() -> Iterator[tuple[str, CollectorRegistry]]:
    """A real prometheus-client HTTP endpoint serving the trainer's metric names."""
    registry = CollectorRegistry()
    with serving(registry) as url:
        yield url, registry


def publish_trainer_metrics(registry: CollectorRegistry, *, step: int, checkpoint_step: int) -> TrainerMetrics:
    """The trainer's own metrics after ``step`` of 3,000 steps, its last checkpoint at ``checkpoint_step``."""
    metrics = TrainerMetrics(registry)
    metrics.record_start(step=checkpoint_step, epoch=1.0, total_steps=3000)
    metrics.record_step(
        step=step,
        epoch=1.2,
        losses={"total": 0.31, "task": 0.29, "auxiliary": 0.0, "l2sp": 0.02},
        learning_rate=1e-4,
        grad_norm=1.5,
        samples=21,
        tokens=2700,
        seconds=0.5,
        total_steps=3000,
    )
    metrics.model_flops_utilization.set(0.4123456)
    metrics.checkpoint_step.set(checkpoint_step)
    metrics.checkpoint_timestamp_seconds.set(datetime(2026, 1, 2, 3, 0, 0, tzinfo=UTC).timestamp())
    return metrics


def _read(url: str) -> str:
    with urlopen(url) as response:  # noqa: S310 (loopback)
        return str(response.read().decode())


def test_progress_from_a_real_prometheus_endpoint(trainer_endpoint: tuple[str, CollectorRegistry]) -> None:
    url, registry = trainer_endpoint
    publish_trainer_metrics(registry, step=1200, checkpoint_step=1000)
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    parsed = parse_progress(_read(url), now)
    assert parsed is not None
    progress, checkpoint = parsed
    assert progress == {
        "step": 1200,
        "totalSteps": 3000,
        "epoch": 1.2,
        "loss": 0.31,
        "samplesPerSecond": 42.0,
        "tokensPerSecond": 5400.0,
        "modelFlopsUtilization": 0.4123,
        "eta": "2026-01-02T03:19:05Z",  # 1,800 steps left at 0.5 s each
        "updated": "2026-01-02T03:04:05Z",
    }
    assert checkpoint == {"step": 1000, "time": "2026-01-02T03:00:00Z"}


def test_a_restarted_trainer_states_its_step_once_restored_and_its_loss_after_a_step(
    trainer_endpoint: tuple[str, CollectorRegistry],
) -> None:
    # A restarted pod serves its metrics from the start, while it still loads the model and the checkpoint:
    # its gauges read 0 then, and must not take the job's progress back to step 0 with a loss of 0.
    url, registry = trainer_endpoint
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    metrics = TrainerMetrics(registry)
    assert parse_progress(_read(url), now) == ({"updated": "2026-01-02T03:04:05Z"}, {})
    metrics.record_start(step=1000, epoch=1.0, total_steps=3000)  # the checkpoint of step 1000 is restored
    parsed = parse_progress(_read(url), now)
    assert parsed is not None
    assert parsed[0] == {"step": 1000, "totalSteps": 3000, "epoch": 1.0, "updated": "2026-01-02T03:04:05Z"}
    metrics.record_step(
        step=1001,
        epoch=1.0012,
        losses={"total": 0.4, "task": 0.4, "auxiliary": 0.0, "l2sp": 0.0},
        learning_rate=1e-4,
        grad_norm=None,
        samples=8,
        tokens=800,
        seconds=2.0,
        total_steps=3000,
    )
    parsed = parse_progress(_read(url), now)
    assert parsed is not None
    assert parsed[0]["step"] == 1001
    assert parsed[0]["loss"] == 0.4
    assert parsed[0]["samplesPerSecond"] == 4.0
    assert parsed[0]["eta"] == "2026-01-02T04:10:43Z"  # 1,999 steps left at 2 s each


def test_progress_before_training_or_garbage() -> None:
    now = datetime(2026, 1, 2, tzinfo=UTC)
    assert parse_progress("", now) is None
    assert parse_progress("python_gc_objects_collected_total 1\n", now) is None
    assert parse_progress("<html>not metrics", now) is None
    parsed = parse_progress("kubetune_trainer_step 0\nkubetune_trainer_checkpoint_step 0\n", now)
    assert parsed is not None
    assert parsed == ({"updated": "2026-01-02T00:00:00Z"}, {})


@pytest.mark.parametrize(
    ("train", "validation"),
    [
        ("pvc://data.v1/train.jsonl", "pvc://data.v1/dev.jsonl"),  # a claim name with a dot (a valid PVC name)
        ("pvc://" + "a" * 60 + "-one/train.jsonl", "pvc://" + "a" * 60 + "-two/dev.jsonl"),  # long, same 59 chars
    ],
)
def test_pvc_volume_names_are_unique_dns_labels(train: str, validation: str) -> None:
    """The API server rejects a pod whose volume name is not a DNS-1123 label or is not unique."""
    import re

    doc = _load("lora-sequence-classification.yaml")
    doc["spec"]["dataset"].update({"train": train, "validation": validation})
    _cm, _svc, attempt_job = desired_children(load_job(doc, SETTINGS), attempt=1)
    pod = attempt_job["spec"]["template"]["spec"]
    volumes = [v["name"] for v in pod["volumes"]]
    label = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
    assert [n for n in volumes if not label.match(n)] == [], volumes
    assert len(set(volumes)) == len(volumes), volumes
    mounted = {m["name"] for m in pod["containers"][0]["volumeMounts"]}
    assert mounted <= set(volumes)
