"""Fixtures of the end-to-end tests: moto's S3 server with a tiny backbone and data, the emulator, the fake
cluster whose kubelet runs every pod as local processes, and the real operator (kopf) in a thread."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kopf
import pytest

from kubetune_operator import names
from kubetune_operator.localpods import local_base_env
from kubetune_operator.main import OperatorHandle, start_in_thread
from kubetune_operator.settings import OperatorSettings
from tests.support.cluster import FakeCluster, NodeSpec
from tests.support.kube import Client, EmulatorServer
from tests.support.kubelet import secret
from tests.support.runtimes import ProcessRuntime
from tests.support.s3 import FAKE_CREDENTIALS, S3Endpoint, free_port, threaded_moto
from tests.support.tiny_models import sentiment_rows, tiny_bert, write_jsonl

NAMESPACE = "e2e"
SECRET = "s3-credentials"
TIMEOUT = 900.0  # two CPU ranks share this machine with the operator and the emulator


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Endpoint]:
    with threaded_moto(bucket="kubetune-e2e") as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def assets(s3: S3Endpoint, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny backbone (and a copy of it under another name) and a sentiment dataset, uploaded to S3 as a
    user would."""
    root = tmp_path_factory.mktemp("assets")
    model = tiny_bert(root / "tiny-bert")
    for path in sorted(model.rglob("*")):
        if path.is_file():
            for prefix in ("models/tiny-bert", "models/tiny-bert-copy"):
                s3.write(f"{prefix}/{path.relative_to(model)}", path.read_bytes())
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
    """A LoRA sentiment job on the tiny backbone: 2 nodes x 1 process, ZeRO-2, checkpoints every 6 steps."""
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
    """The status' conditions by type."""
    return {c["type"]: c for c in status.get("conditions", [])}


def attempt_jobs(client: Client, name: str) -> list[str]:
    """The attempt Jobs of FineTuneJob ``name`` that exist, sorted."""
    return sorted(
        j["metadata"]["name"] for j in client.jobs(NAMESPACE) if names.attempt_of(j["metadata"]["name"], name)
    )
