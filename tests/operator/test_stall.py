"""Stall detection: rank 0's metrics (a real Prometheus endpoint, read by the operator's progress timer)
stop advancing for ``stallTimeoutSeconds`` → ``Stalled``, a Warning Event, and a gang restart counted
as a retryable failure; a rank 0 that keeps stepping is never judged stalled."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.core import Metric

from kubetune_operator.main import OperatorHandle
from tests.operator.conftest import MetricsRoutes, job_manifest
from tests.operator.helpers import condition, create, events, job_names, status
from tests.support.cluster import FakeCluster
from tests.support.kube import Client, wait_for
from tests.support.metrics_endpoint import serving

TIMEOUT = 40.0
STALL_SECONDS = 3


@pytest.fixture
def rank0() -> Iterator[tuple[str, Gauge]]:
    """A trainer's metrics endpoint whose step the test moves (or not)."""
    registry = CollectorRegistry()
    step = Gauge("kubetune_trainer_step", "step", registry=registry)
    Gauge("kubetune_trainer_total_steps", "total", registry=registry).set(1000)
    with serving(registry) as url:
        yield url, step


def test_rank0_stops_stepping_then_stalled_and_restart(
    operator: OperatorHandle,
    client: Client,
    controller: FakeCluster,
    routes: MetricsRoutes,
    rank0: tuple[str, Gauge],
) -> None:
    url, step = rank0
    step.set(10)
    routes.routes["t-hang"] = url
    create(client, job_manifest("t-hang", stallTimeoutSeconds=STALL_SECONDS, maxRestarts=2))
    wait_for(lambda: (status(client, "t-hang").get("progress") or {}).get("step") == 10, TIMEOUT, what="progress")
    # An NCCL hang: every pod keeps running, the step stays at 11.
    step.set(11)
    wait_for(lambda: "t-hang-a2" in job_names(client, "t-hang"), TIMEOUT, what="attempt 2 after the stall")
    st = status(client, "t-hang")
    # The stall ended attempt 1; attempt 2 is not stalled (nor Running before its pods run).
    assert condition(st, "Stalled")["status"] == "False"
    assert st["restarts"] == 1
    assert st["preemptions"] == 0
    stalled = [message for reason, message in events(client, "t-hang") if reason == "NoProgress"]
    assert len(stalled) == 1
    assert f"no new optimizer step for {STALL_SECONDS}s" in stalled[0]
    assert "step 11" in stalled[0]
    assert any(r == "RestartScheduled" and "(Stalled)" in m for r, m in events(client, "t-hang"))
    # Attempt 2 steps again: the Stalled condition clears once it runs.
    step.set(12)
    wait_for(
        lambda: condition(status(client, "t-hang"), "Stalled")["status"] == "False",
        TIMEOUT,
        what="Stalled cleared by attempt 2",
    )


def test_a_stepping_rank0_is_not_stalled(
    operator: OperatorHandle,
    client: Client,
    controller: FakeCluster,
    routes: MetricsRoutes,
    rank0: tuple[str, Gauge],
) -> None:
    url, step = rank0
    routes.routes["t-busy"] = url
    create(client, job_manifest("t-busy", stallTimeoutSeconds=STALL_SECONDS))
    deadline = time.monotonic() + STALL_SECONDS * 3
    value = 0
    while time.monotonic() < deadline:
        value += 1
        step.set(value)
        time.sleep(0.5)
    st = status(client, "t-busy")
    assert st["phase"] == "Running"
    assert job_names(client, "t-busy") == ["t-busy-a1"]
    assert "Stalled" not in {c["type"] for c in st["conditions"]}


class _Scrapes:
    """A collector that counts the operator's reads of the endpoint (and adds no metric)."""

    def __init__(self) -> None:
        self.count = 0

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> list[Metric]:
        self.count += 1
        return []


def test_a_rank0_still_loading_is_not_stalled(
    operator: OperatorHandle,
    client: Client,
    controller: FakeCluster,
    routes: MetricsRoutes,
) -> None:
    # A trainer loading a large backbone or tokenizing: its endpoint is up and reads step 0 of 0 steps
    # (nothing placed yet) for longer than stallTimeoutSeconds. Loading is not a hang of training.
    registry = CollectorRegistry()
    Gauge("kubetune_trainer_step", "step", registry=registry)  # step 0: a fresh trainer's gauge
    total = Gauge("kubetune_trainer_total_steps", "total", registry=registry)
    scrapes = _Scrapes()
    registry.register(scrapes)
    with serving(registry) as url:
        routes.routes["t-load"] = url
        create(client, job_manifest("t-load", stallTimeoutSeconds=STALL_SECONDS))
        wait_for(lambda: scrapes.count >= 1, TIMEOUT, what="the operator's first read of rank 0")
        first = scrapes.count
        time.sleep(STALL_SECONDS * 3)
        assert scrapes.count >= first + STALL_SECONDS  # read all along (every second here)
        st = status(client, "t-load")
        assert st["phase"] == "Running"
        assert job_names(client, "t-load") == ["t-load-a1"]
        assert "Stalled" not in {c["type"] for c in st["conditions"]}
        assert "lastStepTime" not in (st.get("progress") or {})
        # Placed: the clock runs from the first read of a step, and a step that never moves is a stall.
        total.set(1000)
        wait_for(lambda: "t-load-a2" in job_names(client, "t-load"), TIMEOUT, what="attempt 2 after the stall")
        assert any(r == "NoProgress" and "still at step 0" in m for r, m in events(client, "t-load"))
