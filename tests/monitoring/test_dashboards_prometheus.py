"""Every panel query of both dashboards returns data from a real Prometheus scraping real HTTP endpoints.

Three sources: synthetic series with every catalog name and label value; the real TrainerMetrics and
OperatorMetrics classes driven through a short fake run; and (when KUBETUNE_TEST_TRAINER_METRICS /
KUBETUNE_TEST_OPERATOR_METRICS name them) a real training run and operator.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from kubetune_trainer.spec.catalog import OPERATOR_SCRAPE_JOB, TRAINER_SCRAPE_JOB
from tests.support import synthetic_metrics
from tests.support.prometheus import (
    assert_every_panel_has_data,
    load_dashboards,
    panel_queries,
    prometheus_binary,
    substitute,
    targets_from_env,
)
from tests.support.synthetic_metrics import collector

pytestmark = pytest.mark.skipif(prometheus_binary() is None, reason="prometheus is not installed (make system-deps)")
LABELS = {"namespace": "ml", "job_name": "demo"}


def test_every_panel_has_data_from_synthetic_series() -> None:
    with (
        synthetic_metrics.serve(synthetic_metrics.trainer_registry()) as trainer,
        synthetic_metrics.serve(synthetic_metrics.operator_registry()) as operator,
    ):
        assert_every_panel_has_data(
            {TRAINER_SCRAPE_JOB: [trainer], OPERATOR_SCRAPE_JOB: [operator]}, LABELS, finite=True, timeout=45
        )


def test_empty_panels_are_named_in_the_failure() -> None:
    with (
        synthetic_metrics.serve(synthetic_metrics.operator_registry()) as operator,
        pytest.raises(AssertionError) as failure,
    ):
        assert_every_panel_has_data({OPERATOR_SCRAPE_JOB: [operator]}, LABELS, timeout=6)
    message = str(failure.value)
    assert "kubetune / Training / Loss components" in message
    assert "kubetune / Training / variable $namespace" in message
    assert "kubetune / Overview / FineTuneJobs by phase" not in message


@contextlib.contextmanager
def _served(registry: CollectorRegistry, drive: Any) -> Iterator[str]:
    """Serve a real metrics registry while ``drive()`` keeps updating it, as a live process would."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(0.2):
            drive()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        with synthetic_metrics.serve(registry, tick_seconds=3600) as address:
            yield address
    finally:
        stop.set()
        thread.join(timeout=5)


def test_every_panel_has_data_from_the_real_metric_classes() -> None:
    trainer_module: Any = pytest.importorskip("kubetune_trainer.metrics")
    operator_module: Any = pytest.importorskip("kubetune_operator.metrics")
    trainer = trainer_module.TrainerMetrics()
    operator = operator_module.OperatorMetrics()
    collector(trainer.registry, "kubetune_trainer_total_steps").set(1000)
    collector(trainer.registry, "kubetune_trainer_trainable_parameters").set(1000)
    collector(trainer.registry, "kubetune_trainer_parameters").set(100000)
    trainer.record_eval({"accuracy": 0.8, "f1": 0.7})
    step = [0]

    def train_one_step() -> None:
        step[0] += 1
        trainer.record_step(
            step=step[0], epoch=step[0] / 100, losses={"total": 0.5, "task": 0.45, "auxiliary": 0.03, "l2sp": 0.02},
            learning_rate=1e-4, grad_norm=1.0, samples=8, tokens=512, seconds=0.2, total_steps=1000,
        )  # fmt: skip
        if step[0] % 5 == 0:
            collector(trainer.registry, "kubetune_trainer_checkpoint_seconds").labels(phase="save").observe(0.3)
            collector(trainer.registry, "kubetune_trainer_checkpoint_bytes_total").inc(1000)
            collector(trainer.registry, "kubetune_trainer_checkpoint_step").set(step[0])
            collector(trainer.registry, "kubetune_trainer_checkpoint_timestamp_seconds").set(time.time())

    def reconcile_once() -> None:
        collector(operator.registry, "kubetune_operator_reconcile_seconds").observe(0.01)
        collector(operator.registry, "kubetune_operator_time_to_running_seconds").observe(12)
        collector(operator.registry, "kubetune_operator_job_duration_seconds").observe(600)
        collector(operator.registry, "kubetune_operator_restarts_total").inc()
        collector(operator.registry, "kubetune_operator_reconcile_errors_total").inc()

    with _served(trainer.registry, train_one_step) as t, _served(operator.registry, reconcile_once) as o:
        assert_every_panel_has_data({TRAINER_SCRAPE_JOB: [t], OPERATOR_SCRAPE_JOB: [o]}, LABELS, timeout=45)


@pytest.mark.skipif(not targets_from_env(), reason="set KUBETUNE_TEST_TRAINER_METRICS and/or ..._OPERATOR_METRICS")
def test_every_panel_has_data_from_targets_in_the_environment() -> None:
    """Point the check at a real run: KUBETUNE_TEST_TRAINER_METRICS=host:port (comma list), likewise for the
    operator, and KUBETUNE_TEST_LABELS=namespace=ml,job_name=demo for the labels a PodMonitor would add."""
    labels = dict(item.split("=", 1) for item in os.environ.get("KUBETUNE_TEST_LABELS", "").split(",") if "=" in item)
    assert_every_panel_has_data(targets_from_env(), labels or LABELS, timeout=90)


def test_every_panel_query_substitutes_cleanly() -> None:
    variables = {"namespace": "ml", "job": "demo", "__rate_interval": "1m", "datasource": "p"}
    queries = panel_queries(load_dashboards())
    assert len(queries) >= 30
    for _, _, expr in queries:
        assert "$" not in substitute(expr, variables)
