"""The alert rules under promtool: ``check rules`` is clean and ``test rules`` shows every alert firing on
synthetic series that should trigger it and staying silent on series that should not."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from kubetune_operator.monitoring import alerts
from tests.support.prometheus import promtool_binary

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "charts" / "kubetune" / "rules" / "kubetune-alerts.yaml"
PROMTOOL = promtool_binary()
pytestmark = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (make system-deps)")

JOB = 'namespace="ml", job_name="demo", pod="demo-a1-0", job="kubetune-trainer"'
JOB_A2 = 'namespace="ml", job_name="demo", pod="demo-a2-0", job="kubetune-trainer"'
OPERATOR = 'job="kubetune-operator", instance="10.0.0.7:8080"'
JOB_LABELS = {"namespace": "ml", "job_name": "demo"}


@dataclass
class Case:
    """One promtool unit test: input series, when to evaluate, and the alert expected (or none)."""

    alert: str
    title: str
    series: dict[str, str]
    eval_time: str
    labels: dict[str, str] | None = field(default=None)  # None: the alert must not fire
    value: str = ""  # the rendered {{ $value }} (after its template function)


CASES = [
    Case("KubetuneOperatorDown", "fires when every replica is down for 5m", {f"up{{{OPERATOR}}}": "0x10"}, "6m", {}),
    Case("KubetuneOperatorDown", "fires when no operator is scraped at all", {"up{job='other'}": "1x10"}, "6m", {}),
    Case("KubetuneOperatorDown", "silent while a replica is up", {f"up{{{OPERATOR}}}": "1x10"}, "6m"),
    Case("KubetuneOperatorDown", "silent for a short outage", {f"up{{{OPERATOR}}}": "1x5 0x3"}, "8m"),
    Case(
        "ReconcileErrors",
        "fires on errors every minute for 20m",
        {f"kubetune_operator_reconcile_errors_total{{{OPERATOR}}}": "0+1x30"},
        "20m",
        {},
        "16.67m",
    ),
    Case(
        "ReconcileErrors",
        "silent when errors stopped",
        {f"kubetune_operator_reconcile_errors_total{{{OPERATOR}}}": "0+1x5 5x25"},
        "25m",
    ),
    Case(
        "ReconcileErrors",
        "silent with a constant error count",
        {f"kubetune_operator_reconcile_errors_total{{{OPERATOR}}}": "5x30"},
        "20m",
    ),
    Case(
        "FineTuneJobFailed",
        "fires when a job is Failed",
        {f'kubetune_operator_jobs{{phase="Failed", {OPERATOR}}}': "0 1 1"},
        "2m",
        {},
        "1",
    ),
    Case(
        "FineTuneJobFailed",
        "silent with no Failed jobs",
        {
            f'kubetune_operator_jobs{{phase="Failed", {OPERATOR}}}': "0x3",
            f'kubetune_operator_jobs{{phase="Running", {OPERATOR}}}': "3x3",
        },
        "2m",
    ),
    Case(
        "TrainingStalled",
        "fires 20 minutes after the last step",
        {
            f"kubetune_trainer_last_step_timestamp_seconds{{{JOB}}}": "60x30",
            f"kubetune_trainer_step{{{JOB}}}": "10x30",
            f"kubetune_trainer_total_steps{{{JOB}}}": "100x30",
        },
        "21m",
        JOB_LABELS,
        "20m 0s",
    ),
    Case(
        "TrainingStalled",
        "silent while steps advance",
        {
            f"kubetune_trainer_last_step_timestamp_seconds{{{JOB}}}": "0+60x30",
            f"kubetune_trainer_step{{{JOB}}}": "0+1x30",
            f"kubetune_trainer_total_steps{{{JOB}}}": "100x30",
        },
        "21m",
    ),
    Case(
        "TrainingStalled",
        "silent when the job finished its steps",
        {
            f"kubetune_trainer_last_step_timestamp_seconds{{{JOB}}}": "60x30",
            f"kubetune_trainer_step{{{JOB}}}": "100x30",
            f"kubetune_trainer_total_steps{{{JOB}}}": "100x30",
        },
        "21m",
    ),
    Case(
        "TrainingStalled",
        "fires when the next attempt restored its checkpoint but never finished a step",
        {
            # attempt 1 steps until 10m, then its pod is replaced: the series go stale
            f"kubetune_trainer_last_step_timestamp_seconds{{{JOB}}}": "0+60x10 stale",
            f"kubetune_trainer_step{{{JOB}}}": "0+1x10 stale",
            f"kubetune_trainer_total_steps{{{JOB}}}": "100x10 stale",
            # attempt 2 loads from 12m, restores step 10 at 14m and hangs in its first collective
            f"kubetune_trainer_last_step_timestamp_seconds{{{JOB_A2}}}": "_x12 0x40",
            f"kubetune_trainer_step{{{JOB_A2}}}": "_x12 0 0 10x38",
            f"kubetune_trainer_total_steps{{{JOB_A2}}}": "_x12 0 0 100x38",
        },
        "35m",
        JOB_LABELS,
        "21m 0s",
    ),
    Case(
        "TrainingStalled",
        "fires when a fresh job never finishes its first step",
        {
            f"kubetune_trainer_last_step_timestamp_seconds{{{JOB}}}": "0x40",
            f"kubetune_trainer_step{{{JOB}}}": "0x40",
            f"kubetune_trainer_total_steps{{{JOB}}}": "0 0 100x38",
        },
        "20m",
        JOB_LABELS,
        "18m 0s",
    ),
    Case(
        "TrainingStalled",
        "silent while the next attempt is still loading or just restored",
        {
            f"kubetune_trainer_last_step_timestamp_seconds{{{JOB}}}": "0+60x10 stale",
            f"kubetune_trainer_step{{{JOB}}}": "0+1x10 stale",
            f"kubetune_trainer_total_steps{{{JOB}}}": "100x10 stale",
            f"kubetune_trainer_last_step_timestamp_seconds{{{JOB_A2}}}": "_x12 0x40",
            f"kubetune_trainer_step{{{JOB_A2}}}": "_x12 0x8 10x30",
            f"kubetune_trainer_total_steps{{{JOB_A2}}}": "_x12 0x8 100x30",
        },
        "30m",
    ),
    Case(
        "TrainingStalled",
        "silent once the restored attempt steps",
        {
            f"kubetune_trainer_last_step_timestamp_seconds{{{JOB}}}": "0x10 600+60x30",
            f"kubetune_trainer_step{{{JOB}}}": "10x10 11+1x30",
            f"kubetune_trainer_total_steps{{{JOB}}}": "100x40",
        },
        "30m",
    ),
    Case(
        "LossNotFinite",
        "fires on a non-finite step count",
        {
            f"kubetune_trainer_nonfinite_loss_total{{{JOB}}}": "0 0 1 1",
            f'kubetune_trainer_loss{{component="total", {JOB}}}': "0.5x3",
        },
        "3m",
        JOB_LABELS,
    ),
    Case(
        "LossNotFinite",
        "fires on a NaN loss",
        {
            f"kubetune_trainer_nonfinite_loss_total{{{JOB}}}": "0x3",
            f'kubetune_trainer_loss{{component="total", {JOB}}}': "0.5 NaN NaN",
        },
        "2m",
        JOB_LABELS,
    ),
    Case(
        "LossNotFinite",
        "fires on an infinite loss",
        {f'kubetune_trainer_loss{{component="total", {JOB}}}': "0.5 Inf Inf"},
        "2m",
        JOB_LABELS,
    ),
    Case(
        "LossNotFinite",
        "silent on finite losses",
        {
            f"kubetune_trainer_nonfinite_loss_total{{{JOB}}}": "0x3",
            f'kubetune_trainer_loss{{component="total", {JOB}}}': "0.9 0.7 0.6 0.5",
        },
        "3m",
    ),
    Case(
        "CheckpointOverdue",
        "fires when training ran past a checkpoint over an hour old",
        {
            f"kubetune_trainer_checkpoint_timestamp_seconds{{{JOB}}}": "60x80",
            f"kubetune_trainer_checkpoint_step{{{JOB}}}": "100x80",
            f"kubetune_trainer_step{{{JOB}}}": "150x80",
        },
        "70m",
        JOB_LABELS,
        "1h 9m 0s",
    ),
    Case(
        "CheckpointOverdue",
        "silent when no step was taken since the checkpoint",
        {
            f"kubetune_trainer_checkpoint_timestamp_seconds{{{JOB}}}": "60x80",
            f"kubetune_trainer_checkpoint_step{{{JOB}}}": "100x80",
            f"kubetune_trainer_step{{{JOB}}}": "100x80",
        },
        "70m",
    ),
    Case(
        "CheckpointOverdue",
        "silent with recent checkpoints",
        {
            f"kubetune_trainer_checkpoint_timestamp_seconds{{{JOB}}}": "0+600x10 6000x70",
            f"kubetune_trainer_checkpoint_step{{{JOB}}}": "100x80",
            f"kubetune_trainer_step{{{JOB}}}": "150x80",
        },
        "70m",
    ),
    Case(
        "CheckpointOverdue",
        "silent right after resuming from a checkpoint saved hours ago",
        {
            # suspended (or preempted and queued) for hours; attempt 2 restores step 100, saved at 1m, at 11h50m
            f"kubetune_trainer_checkpoint_timestamp_seconds{{{JOB_A2}}}": "_x710 60x20",
            f"kubetune_trainer_checkpoint_step{{{JOB_A2}}}": "_x710 100x20",
            f"kubetune_trainer_step{{{JOB_A2}}}": "_x710 100+1x20",
        },
        "12h",
    ),
    Case(
        "CheckpointOverdue",
        "fires an hour after resuming when no checkpoint was committed since",
        {
            f"kubetune_trainer_checkpoint_timestamp_seconds{{{JOB_A2}}}": "_x710 60x80",
            f"kubetune_trainer_checkpoint_step{{{JOB_A2}}}": "_x710 100x80",
            f"kubetune_trainer_step{{{JOB_A2}}}": "_x710 100+1x80",
        },
        "13h",
        JOB_LABELS,
        "12h 59m 0s",
    ),
    Case(
        "TrainingLossRising",
        "fires when the loss triples and stays up",
        {f'kubetune_trainer_loss{{component="total", {JOB}}}': "1x40 3x60"},
        "75m",
        JOB_LABELS,
    ),
    Case(
        "TrainingLossRising",
        "silent on a falling loss",
        {f'kubetune_trainer_loss{{component="total", {JOB}}}': "3x40 1x60"},
        "75m",
    ),
]


def _expand(template: str, labels: dict[str, str], value: str) -> str:
    """Expand the only template forms the rules use: $labels.X and $value (already formatted)."""
    text = re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels[m.group(1)], template)
    return re.sub(r"\{\{ \$value( \| \w+)? \}\}", value, text)


def _unit_test(case: Case) -> dict[str, object]:
    alert = next(a for a in alerts.ALERTS if a.name == case.alert)
    expected = []
    if case.labels is not None:
        labels = {**case.labels, "severity": alert.severity}
        expected.append(
            {
                "exp_labels": labels,
                "exp_annotations": {
                    "summary": _expand(alert.summary, labels, case.value),
                    "description": _expand(alert.description, labels, case.value),
                    "runbook_url": alert.runbook_url,
                },
            }
        )
    return {
        "name": f"{case.alert}: {case.title}",
        "interval": "1m",
        "input_series": [{"series": s, "values": v} for s, v in case.series.items()],
        "alert_rule_test": [{"eval_time": case.eval_time, "alertname": case.alert, "exp_alerts": expected}],
    }


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120, check=False)


def test_promtool_check_rules() -> None:
    result = _promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alerts.ALERTS)} rules found" in result.stdout


def test_every_alert_has_a_firing_and_a_silent_case() -> None:
    for alert in alerts.ALERTS:
        outcomes = {case.labels is not None for case in CASES if case.alert == alert.name}
        assert outcomes == {True, False}, f"{alert.name} lacks a firing or a silent promtool case"


def test_promtool_test_rules(tmp_path: Path) -> None:
    test_file = tmp_path / "kubetune-alerts-test.yaml"
    document = {"rule_files": [str(RULES)], "evaluation_interval": "1m", "tests": [_unit_test(c) for c in CASES]}
    test_file.write_text(yaml.safe_dump(document, sort_keys=False, width=1000))
    result = _promtool("test", "rules", str(test_file))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_promtool_detects_a_wrong_expectation(tmp_path: Path) -> None:
    """The harness itself: a silent case asserted as firing must fail."""
    wrong = next(c for c in CASES if c.alert == "FineTuneJobFailed" and c.labels is None)
    flipped = Case(wrong.alert, wrong.title, wrong.series, wrong.eval_time, {}, "0")
    test_file = tmp_path / "wrong.yaml"
    test_file.write_text(yaml.safe_dump({"rule_files": [str(RULES)], "tests": [_unit_test(flipped)]}))
    assert _promtool("test", "rules", str(test_file)).returncode != 0
