"""/metrics expositions: ``promtool check metrics`` reports no problems, every catalog name is exported by
the real trainer and operator metric classes, and label sets are bounded (no step, loss or path in a label)."""

from __future__ import annotations

import importlib
import subprocess
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kubetune_trainer.spec.catalog import OPERATOR_METRICS, TRAINER_METRICS, series_names
from tests.support import synthetic_metrics
from tests.support.metrics_labels import assert_bounded_labels, label_problems, series_count
from tests.support.prometheus import promtool_binary
from tests.support.synthetic_metrics import collector

PROMTOOL = promtool_binary()
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (make system-deps)")


def promtool_check_metrics(text: str) -> str:
    """promtool's findings for an exposition (empty when clean)."""
    assert PROMTOOL is not None
    result = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60, check=False
    )
    findings = (result.stdout + result.stderr).strip()
    assert result.returncode == 0 or findings, "promtool failed without saying why"
    return findings


def _trainer_exposition(steps: int) -> str:
    module: Any = pytest.importorskip(
        "kubetune_trainer.metrics", reason="the trainer's metrics module is not there yet"
    )
    metrics = module.TrainerMetrics()
    collector(metrics.registry, "kubetune_trainer_total_steps").set(steps)
    collector(metrics.registry, "kubetune_trainer_trainable_parameters").set(295_682)
    collector(metrics.registry, "kubetune_trainer_parameters").set(22_713_216)
    for step in range(1, steps + 1):
        # record_step also samples memory (it imports torch lazily; the trainer extra is installed here).
        metrics.record_step(
            step=step,
            epoch=step / steps,
            losses={"total": 1.0 / step, "task": 0.9 / step, "auxiliary": 0.05, "l2sp": 0.05},
            learning_rate=2e-5,
            grad_norm=1.5,
            samples=32,
            tokens=4096,
            seconds=0.25,
            total_steps=steps,
        )
        if step % 5 == 0:
            for phase in ("save", "upload", "commit", "retention"):
                collector(metrics.registry, "kubetune_trainer_checkpoint_seconds").labels(phase=phase).observe(0.5)
            collector(metrics.registry, "kubetune_trainer_checkpoint_bytes_total").inc(1_000_000)
            collector(metrics.registry, "kubetune_trainer_checkpoint_step").set(step)
            collector(metrics.registry, "kubetune_trainer_checkpoint_timestamp_seconds").set(1.7e9 + step)
    collector(metrics.registry, "kubetune_trainer_checkpoint_seconds").labels(phase="restore").observe(2.0)
    metrics.record_eval({"accuracy": 0.8, "f1": 0.75, "loss": 0.4})
    return generate_latest(metrics.registry).decode()


def _operator_exposition() -> str:
    module: Any = pytest.importorskip(
        "kubetune_operator.metrics", reason="the operator's metrics module is not there yet"
    )
    metrics = module.OperatorMetrics()
    collector(metrics.registry, "kubetune_operator_reconcile_seconds").observe(0.02)
    collector(metrics.registry, "kubetune_operator_reconcile_errors_total").inc()
    collector(metrics.registry, "kubetune_operator_restarts_total").inc()
    collector(metrics.registry, "kubetune_operator_time_to_running_seconds").observe(30)
    collector(metrics.registry, "kubetune_operator_job_duration_seconds").observe(1800)
    return generate_latest(metrics.registry).decode()


def _family_names(text: str) -> set[str]:
    names = set()
    for family in text_string_to_metric_families(text):
        names.update(sample.name for sample in family.samples)
    return names


@needs_promtool
@pytest.mark.parametrize("which", ["trainer", "operator"])
def test_promtool_accepts_the_synthetic_expositions(which: str) -> None:
    registry = synthetic_metrics.trainer_registry() if which == "trainer" else synthetic_metrics.operator_registry()
    assert promtool_check_metrics(synthetic_metrics.exposition(registry)) == ""


@needs_promtool
def test_promtool_accepts_the_real_trainer_metrics() -> None:
    assert promtool_check_metrics(_trainer_exposition(10)) == ""


@needs_promtool
def test_promtool_accepts_the_real_operator_metrics() -> None:
    assert promtool_check_metrics(_operator_exposition()) == ""


@needs_promtool
def test_promtool_flags_a_badly_named_metric() -> None:
    bad = (
        "# HELP kubetune_trainer_steps_count x\n"
        "# TYPE kubetune_trainer_steps_count counter\n"
        "kubetune_trainer_steps_count 3\n"
    )
    assert promtool_check_metrics(bad) != ""


def test_real_trainer_exports_every_catalog_name() -> None:
    exported = _family_names(_trainer_exposition(10))
    missing = [name for spec in TRAINER_METRICS for name in series_names(spec) if name not in exported]
    assert missing == [], f"the trainer does not export {missing}"


def test_real_operator_exports_every_catalog_name() -> None:
    exported = _family_names(_operator_exposition())
    missing = [name for spec in OPERATOR_METRICS for name in series_names(spec) if name not in exported]
    assert missing == [], f"the operator does not export {missing}"


def test_real_expositions_have_bounded_labels() -> None:
    assert_bounded_labels(_trainer_exposition(10))
    assert_bounded_labels(_operator_exposition())
    assert_bounded_labels(synthetic_metrics.exposition(synthetic_metrics.trainer_registry()))


def test_series_count_does_not_grow_with_steps() -> None:
    assert series_count(_trainer_exposition(5)) == series_count(_trainer_exposition(40))


@pytest.mark.parametrize(
    ("line", "complaint"),
    [
        ('kubetune_trainer_loss{component="0.4312"} 1', "number"),
        ('kubetune_trainer_step{step="120"} 120', "not declared"),
        ('kubetune_trainer_eval{metric="s3://bucket/run"} 1', "path"),
        ('kubetune_trainer_loss{component="bogus"} 1', "not in"),
        ("kubetune_trainer_made_up 1", "catalog"),
        ('other_metric{file="/data/train.jsonl"} 1', "path"),
    ],
)
def test_label_checker_catches_unbounded_labels(line: str, complaint: str) -> None:
    problems = label_problems(line + "\n")
    assert any(complaint in p for p in problems), problems


def test_catalog_matches_the_team_contract() -> None:
    contract = importlib.import_module("kubetune_trainer.spec.catalog")
    names = {spec.name for spec in contract.ALL_METRICS}
    assert len(names) == len(contract.ALL_METRICS) == 33
    for spec in contract.ALL_METRICS:
        if spec.type == "counter":
            assert spec.name.endswith("_total"), spec.name
        else:
            assert not spec.name.endswith("_total"), spec.name
