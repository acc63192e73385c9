"""The full chain: FineTuneJob → operator (kopf) → Jobs → pods as local processes → S3 → status.

The operator runs for real against the kmock Kubernetes emulator over HTTP; the
fake cluster (``tests/support/cluster.py``) schedules every pod of the operator's
Jobs and its kubelet runs each as local processes, exactly as specified
(:class:`~tests.support.runtimes.ProcessRuntime`); checkpoints, data, the backbone
and the published model live in moto's S3 server on loopback.  Nothing of kubetune
is stubbed: the trainer processes are the real ones, started by the real launcher.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kopf
import pytest

from kubetune_operator.localpods import local_base_env
from kubetune_operator.main import OperatorHandle, start_in_thread
from kubetune_operator.settings import OperatorSettings
from tests.support.cluster import FakeCluster, NodeSpec
from tests.support.kube import Client, EmulatorServer
from tests.support.kubelet import secret
from tests.support.runtimes import ProcessRuntime
from tests.support.s3 import FAKE_CREDENTIALS, S3Endpoint, free_port, threaded_moto
from tests.support.tiny_models import sentiment_rows, tiny_bert, write_jsonl

pytestmark = pytest.mark.e2e

NAMESPACE = "e2e"
SECRET = "s3-credentials"
TIMEOUT = 900.0  # two CPU ranks share this machine with the operator and the emulator
LOAD_WITH_PEFT = """
import json, sys
for blocked in ("kubetune_trainer", "kubetune_operator"):
    sys.modules[blocked] = None  # the published adapter must load without kubetune
import torch, transformers
from peft import PeftModel
base, output = sys.argv[1], sys.argv[2]
model = transformers.AutoModelForSequenceClassification.from_pretrained(base, num_labels=2)
model = PeftModel.from_pretrained(model, output).eval()
tokenizer = transformers.AutoTokenizer.from_pretrained(output)
batch = tokenizer(["the film was great", "the plot was awful"], return_tensors="pt", padding=True)
with torch.no_grad():
    print(json.dumps(model(**batch).logits.tolist()))
"""


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Endpoint]:
    with threaded_moto(bucket="kubetune-e2e") as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def assets(s3: S3Endpoint, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny backbone and a sentiment dataset, uploaded to S3 as a user would."""
    root = tmp_path_factory.mktemp("assets")
    model = tiny_bert(root / "tiny-bert")
    for path in sorted(model.rglob("*")):
        if path.is_file():
            s3.write(f"models/tiny-bert/{path.relative_to(model)}", path.read_bytes())
    train = write_jsonl(root / "train.jsonl", sentiment_rows(480, seed=1))
    validation = write_jsonl(root / "validation.jsonl", sentiment_rows(96, seed=2))
    s3.write("data/train.jsonl", train.read_bytes())
    s3.write("data/validation.jsonl", validation.read_bytes())
    return {"model": model}


@pytest.fixture(scope="module")
def cluster() -> Iterator[EmulatorServer]:
    with EmulatorServer(namespaces=(NAMESPACE,)) as server:
        yield server


@pytest.fixture(scope="module")
def client(cluster: EmulatorServer) -> Client:
    client = cluster.client()
    client.create("v1", "secrets", NAMESPACE, secret(NAMESPACE, SECRET, FAKE_CREDENTIALS))
    return client


@pytest.fixture(scope="module")
def runtime(client: Client, tmp_path_factory: pytest.TempPathFactory) -> ProcessRuntime:
    # Pods see only what their spec gives them: no credentials leak in from the test's environment.
    base_env = {k: v for k, v in local_base_env(2).items() if not k.startswith("AWS_")}
    repo = Path(__file__).resolve().parents[2]
    base_env["PYTHONPATH"] = f"{repo / 'operator'}:{repo / 'trainer_image'}"
    base_env["OMP_NUM_THREADS"] = "1"
    return ProcessRuntime(client, tmp_path_factory.mktemp("nodes"), base_env)


@pytest.fixture(scope="module")
def kubelet(client: Client, runtime: ProcessRuntime) -> Iterator[FakeCluster]:
    # Two nodes, one pod each: every process shares this machine, as the ranks of one gang.
    fake = FakeCluster(client, nodes=(NodeSpec("node-1"), NodeSpec("node-2")), runtime=runtime)
    fake.start(interval=0.3)
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def operator(
    cluster: EmulatorServer, client: Client, kubelet: FakeCluster, runtime: ProcessRuntime, s3: S3Endpoint
) -> Iterator[OperatorHandle]:
    settings = OperatorSettings(
        default_image="ghcr.io/kubetune/trainer:e2e",
        default_checkpoint_uri=s3.uri("checkpoints"),
        default_output_uri=s3.uri("models"),
        checkpoint_endpoint=s3.endpoint,
        credentials_secret=SECRET,
        metrics_port=free_port(),
        health_port=free_port(),
        peering_priority=100,
        progress_interval_seconds=1.0,
        resync_interval_seconds=5.0,
    )
    handle = start_in_thread(
        settings, connection=kopf.ConnectionInfo(server=cluster.url), metrics_url=runtime.metrics_url
    )
    handle.wait_ready()
    yield handle
    handle.stop()


def finetune_job(
    name: str, *, train: str = "s3://kubetune-e2e/data/train.jsonl", max_steps: int = 24
) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "model": {
                "source": "s3://kubetune-e2e/models/tiny-bert",
                "task": "sequence-classification",
                "labels": ["negative", "positive"],
            },
            "dataset": {"train": train, "validation": "s3://kubetune-e2e/data/validation.jsonl", "maxLength": 32},
            "strategy": {"type": "lora", "lora": {"r": 4, "alpha": 8, "targetModules": ["query", "value"]}},
            "training": {
                "maxSteps": max_steps,
                "learningRate": 5e-3,
                "microBatchSize": 8,
                "precision": "fp32",
                "logEverySteps": 1,
                "evaluation": {"everySteps": max_steps, "metric": "accuracy"},
            },
            "deepspeed": {"zeroStage": 2},
            "resources": {"nodes": 2, "processesPerNode": 1},
            "checkpoint": {"everySteps": 6, "keepLast": 2},
            "runPolicy": {"maxRestarts": 2, "backoffSeconds": 1, "terminationGracePeriodSeconds": 60},
        },
    }


def follow(client: Client, name: str, until: set[str], timeout: float = TIMEOUT) -> list[dict[str, Any]]:
    """Poll the FineTuneJob's status until its phase is in ``until``; every distinct status seen."""
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.ftj(NAMESPACE, name).get("status") or {}
        if not seen or status != seen[-1]:
            seen.append(status)
        if status.get("phase") in until:
            return seen
        time.sleep(0.5)
    raise AssertionError(f"{name} did not reach {until} in {timeout} s; last status: {json.dumps(seen[-1:])}")


def conditions(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in status.get("conditions", [])}


def attempt_jobs(client: Client, name: str) -> list[str]:
    return sorted(
        j["metadata"]["name"] for j in client.jobs(NAMESPACE) if j["metadata"]["name"].startswith(f"{name}-a")
    )


def test_job_trains_checkpoints_and_publishes(
    operator: OperatorHandle, client: Client, s3: S3Endpoint, assets: dict[str, Path], tmp_path: Path
) -> None:
    client.create("kubetune.io/v1alpha1", "finetunejobs", NAMESPACE, finetune_job("sentiment"))
    seen = follow(client, "sentiment", {"Succeeded", "Failed"})
    final = seen[-1]
    assert final["phase"] == "Succeeded", json.dumps(final, indent=1)
    phases = [s.get("phase") for s in seen if s.get("phase")]
    assert "Running" in phases
    assert phases.index("Running") < phases.index("Succeeded")
    assert conditions(final)["Created"]["status"] == "True"
    assert conditions(final)["Succeeded"]["status"] == "True"
    assert any(s.get("progress", {}).get("step") for s in seen if s.get("phase") == "Running"), (
        "status.progress stayed empty while the job ran"
    )
    assert final["restarts"] == 0
    assert final.get("completionTime")
    assert attempt_jobs(client, "sentiment") == ["sentiment-a1"]

    # The output in S3 loads with plain peft, and its evaluation is the one in the status.
    output_uri = final["output"]["uri"]
    prefix = output_uri.removeprefix(f"s3://{s3.bucket}/").rstrip("/") + "/"
    local = tmp_path / "published"
    for key in s3.keys(prefix):
        target = local / key[len(prefix) :]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(s3.read(key))
    published = json.loads((local / "kubetune-metrics.json").read_text())
    assert published["evaluation"] == final["evaluation"]
    assert final["evaluation"]["accuracy"] >= 0.0
    loaded = subprocess.run(
        [sys.executable, "-I", "-c", LOAD_WITH_PEFT, str(assets["model"]), str(local)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    logits = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert len(logits) == 2
    assert len(logits[0]) == 2
    # The checkpoints are in S3 too, committed with a manifest.
    latest = s3.read(f"checkpoints/{NAMESPACE}/sentiment/checkpoints/LATEST").decode().strip()
    assert f"checkpoints/{NAMESPACE}/sentiment/checkpoints/{latest}/MANIFEST.json" in s3.keys(
        f"checkpoints/{NAMESPACE}/sentiment/checkpoints/{latest}/"
    )
    # status.checkpoint.uri has one meaning while the job runs and after it succeeded: the step folder.
    folders = s3.uri(f"checkpoints/{NAMESPACE}/sentiment/checkpoints")
    assert final["checkpoint"]["uri"] == f"{folders}/{latest}"
    while_running = {s["checkpoint"]["uri"] for s in seen if s.get("phase") == "Running" and s.get("checkpoint")}
    assert all(uri.rsplit("/", 1)[0] == folders for uri in while_running), while_running


def test_killed_pod_restarts_the_gang_and_resumes(
    operator: OperatorHandle, client: Client, runtime: ProcessRuntime, s3: S3Endpoint, assets: dict[str, Path]
) -> None:
    client.create("kubetune.io/v1alpha1", "finetunejobs", NAMESPACE, finetune_job("faulty", max_steps=48))
    checkpoints = f"checkpoints/{NAMESPACE}/faulty/checkpoints/"
    deadline = time.monotonic() + TIMEOUT
    while f"{checkpoints}LATEST" not in s3.keys(checkpoints):
        assert time.monotonic() < deadline, "no checkpoint was committed"
        assert client.ftj(NAMESPACE, "faulty").get("status", {}).get("phase") != "Failed"
        time.sleep(0.5)
    committed = int(s3.read(f"{checkpoints}LATEST").decode().strip().rsplit("-", 1)[-1])
    runtime.pod("faulty-a1", 1).signal(signal.SIGKILL)  # the whole pod dies at once (an OOM kill)

    seen = follow(client, "faulty", {"Succeeded", "Failed"})
    final = seen[-1]
    assert final["phase"] == "Succeeded", json.dumps(final, indent=1)
    assert final["restarts"] == 1
    assert final["attempt"] == 2
    # The Restarting phase lasts only the backoff (1 s), so polling may miss it; the Event
    # and the Restarting condition (now False, with its transition time) stay.
    events = [
        e
        for e in client.list("v1", "events", NAMESPACE)
        if e.get("involvedObject", {}).get("name") == "faulty" and e.get("reason") == "RestartScheduled"
    ]
    assert events, "no RestartScheduled event for the failed attempt"
    assert "attempt 1 failed" in events[0]["message"]
    assert events[0]["type"] == "Warning"
    assert "Restarting" in conditions(final)
    assert attempt_jobs(client, "faulty") == ["faulty-a2"]  # attempt 1 was deleted before attempt 2
    # Attempt 2 resumed from a committed checkpoint at or after the one seen before the kill.
    log = "\n".join(p.read_text(errors="replace") for p in (runtime.root / "faulty-a2").glob("*.log"))
    resumed = [line for line in log.splitlines() if "resum" in line.lower() and "step-" in line]
    assert resumed, f"attempt 2 does not say which checkpoint it resumed from:\n{log[-3000:]}"
    resumed_step = int(resumed[0].split("step-")[1][:8])
    assert resumed_step >= committed
    assert final["checkpoint"]["step"] >= resumed_step


def test_missing_dataset_fails_permanently_with_the_path(
    operator: OperatorHandle, client: Client, assets: dict[str, Path]
) -> None:
    """The backbone is there (``assets``); only the training file is missing."""
    missing = "s3://kubetune-e2e/data/does-not-exist.jsonl"
    client.create("kubetune.io/v1alpha1", "finetunejobs", NAMESPACE, finetune_job("missing-data", train=missing))
    seen = follow(client, "missing-data", {"Succeeded", "Failed"})
    final = seen[-1]
    assert final["phase"] == "Failed", json.dumps(final, indent=1)
    failed = conditions(final)["Failed"]
    assert "does-not-exist.jsonl" in failed["message"]
    assert final["restarts"] == 0
    time.sleep(3)  # no attempt 2 appears later either
    assert attempt_jobs(client, "missing-data") == ["missing-data-a1"]
