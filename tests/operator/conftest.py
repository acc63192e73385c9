"""Fixtures: the API emulator over HTTP, a Job controller, and the real operator (kopf) in a thread."""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kopf
import pytest
import yaml

from kubetune_operator.localpods import free_port
from kubetune_operator.main import OperatorHandle, start_in_thread
from kubetune_operator.settings import OperatorSettings
from tests.support.kube import Client, EmulatorServer, JobController

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = yaml.safe_load((ROOT / "examples" / "lora-sequence-classification.yaml").read_text())
NAMESPACE = "ml"
FTJ = ("kubetune.io/v1alpha1", "finetunejobs")


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
    doc["spec"]["runPolicy"] = {"backoffSeconds": 0, "maxRestarts": 2, **run_policy}
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
    return cluster.client()


@pytest.fixture(scope="module")
def controller(client: Client) -> Iterator[JobController]:
    jc = JobController(client).start(interval=0.2)
    yield jc
    jc.stop()


@pytest.fixture(scope="module")
def routes() -> MetricsRoutes:
    return MetricsRoutes()


@pytest.fixture(scope="module")
def operator(cluster: EmulatorServer, controller: JobController, routes: MetricsRoutes) -> Iterator[OperatorHandle]:
    handle = start_in_thread(fast_settings(), connection=kopf.ConnectionInfo(server=cluster.url), metrics_url=routes)
    handle.wait_ready(60)
    yield handle
    handle.stop()
    assert not handle.errors, handle.errors


@pytest.fixture(autouse=True)
def _controller_healthy(request: pytest.FixtureRequest) -> Iterator[None]:
    """Surface errors of the background Job controller in the test that caused them."""
    yield
    if "controller" in request.fixturenames:
        jc: JobController = request.getfixturevalue("controller")
        errors, jc.errors[:] = list(jc.errors), []
        assert not [e for e in errors if "404" not in e], errors
