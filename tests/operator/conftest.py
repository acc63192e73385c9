"""Fixtures: the API emulator over HTTP, the fake cluster (nodes, scheduler, Job controller, kubelets with
scripted containers), and the real operator (kopf) in a thread."""

from __future__ import annotations

import copy
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kopf
import pytest
import yaml

from kubetune_operator.localpods import free_port
from kubetune_operator.main import OperatorHandle, start_in_thread
from kubetune_operator.settings import OperatorSettings
from tests.support.cluster import FakeCluster
from tests.support.kube import Client, EmulatorServer
from tests.support.kubelet import secret

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = yaml.safe_load((ROOT / "examples" / "lora-sequence-classification.yaml").read_text())
NAMESPACE = "ml"
FTJ = ("kubetune.io/v1alpha1", "finetunejobs")
CREDENTIALS = "s3-credentials"  # the Secret the example names (pods cannot start without it)


def create_credentials(client: Client, namespace: str = NAMESPACE) -> None:
    """The S3 credentials Secret the example's pods reference (fake values)."""
    values = {"AWS_ACCESS_KEY_ID": "not-a-key", "AWS_SECRET_ACCESS_KEY": "not-a-secret"}
    client.create("v1", "secrets", namespace, secret(namespace, CREDENTIALS, values))


def start_operator(
    cluster: EmulatorServer, kubeconfig: str, priority: int, log: Path, **env: str
) -> subprocess.Popen[bytes]:
    """The operator as its own process (``python -m kubetune_operator.main``), logging to ``log``."""
    variables = {
        **os.environ,
        "KUBECONFIG": kubeconfig,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "operator"), str(ROOT / "trainer_image")]),
        "KUBETUNE_DEFAULT_CHECKPOINT_URI": "s3://ckpt",
        "KUBETUNE_METRICS_PORT": str(free_port()),
        "KUBETUNE_HEALTH_PORT": str(free_port()),
        "KUBETUNE_PEERING_PRIORITY": str(priority),  # a killed replica stays listed for a while
        "KUBETUNE_RESYNC_INTERVAL_SECONDS": "2",
        "KUBETUNE_PROGRESS_INTERVAL_SECONDS": "30",
        **env,
    }
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "kubetune_operator.main"], env=variables, stdout=out, stderr=subprocess.STDOUT
        )


def fast_settings(**overrides: Any) -> OperatorSettings:
    """Operator settings for tests: short resync and progress intervals, free ports."""
    values: dict[str, Any] = {
        "default_checkpoint_uri": "s3://kubetune-ckpt",
        "metrics_port": free_port(),
        "health_port": free_port(),
        "peering_priority": 100,
        "resync_interval_seconds": 5.0,
        "progress_interval_seconds": 1.0,
    }
    values.update(overrides)
    return OperatorSettings(**values)


def job_manifest(name: str, namespace: str = NAMESPACE, **run_policy: Any) -> dict[str, Any]:
    """The LoRA example under another name, with fast run-policy values for tests."""
    doc = copy.deepcopy(EXAMPLE)
    doc["metadata"] = {"name": name, "namespace": namespace}
    doc["spec"]["runPolicy"] = {
        "backoffSeconds": 0,
        "maxRestarts": 2,
        "terminationGracePeriodSeconds": 30,
        **run_policy,
    }
    return doc


class MetricsRoutes:
    """The progress hook: which URL serves a job's rank-0 metrics (tests map it to loopback)."""

    def __init__(self) -> None:
        self.routes: dict[str, str] = {}

    def __call__(self, pod: Any) -> str | None:
        return self.routes.get(pod["metadata"]["labels"].get("kubetune.io/job-name", ""))


@pytest.fixture(scope="module")
def cluster() -> Iterator[EmulatorServer]:
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    with EmulatorServer([NAMESPACE, "other"]) as server:
        yield server


@pytest.fixture(scope="module")
def client(cluster: EmulatorServer) -> Client:
    client = cluster.client()
    for namespace in (NAMESPACE, "other"):
        create_credentials(client, namespace)
    return client


@pytest.fixture(scope="module")
def controller(client: Client) -> Iterator[FakeCluster]:
    fake = FakeCluster(client).start(interval=0.1)
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def routes() -> MetricsRoutes:
    return MetricsRoutes()


@pytest.fixture(scope="module")
def operator(cluster: EmulatorServer, controller: FakeCluster, routes: MetricsRoutes) -> Iterator[OperatorHandle]:
    handle = start_in_thread(fast_settings(), connection=kopf.ConnectionInfo(server=cluster.url), metrics_url=routes)
    handle.wait_ready(60)
    yield handle
    handle.stop()
    assert not handle.errors, handle.errors


@pytest.fixture(autouse=True)
def _controller_healthy(request: pytest.FixtureRequest) -> Iterator[None]:
    """Surface errors of the background fake cluster in the test that caused them."""
    yield
    if "controller" in request.fixturenames:
        jc: FakeCluster = request.getfixturevalue("controller")
        errors, jc.errors[:] = list(jc.errors), []
        assert not [e for e in errors if "404" not in e], errors
