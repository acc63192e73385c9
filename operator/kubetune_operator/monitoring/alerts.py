"""Prometheus alert rules for kubetune, written as a plain rules file the chart also ships as a PrometheusRule.

Run ``python -m kubetune_operator.monitoring.alerts [--check] [FILE]`` (default FILE:
``charts/kubetune/rules/kubetune-alerts.yaml``).  The same ``groups`` list is the ``spec`` of the chart's
PrometheusRule, so Prometheus servers with and without the Prometheus Operator evaluate identical rules.
``tests/monitoring`` runs ``promtool check rules`` and ``promtool test rules`` (each alert firing and not
firing) against the file.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kubetune_operator.monitoring._generated import write_or_check
from kubetune_trainer.spec import catalog as m
from kubetune_trainer.spec.catalog import JOB_NAME_LABEL, OPERATOR_SCRAPE_JOB

DEFAULT_FILE = Path("charts/kubetune/rules/kubetune-alerts.yaml")
RUNBOOK_BASE_URL = "https://github.com/kubetune/kubetune/blob/main/docs/runbooks.md"

#: Thresholds, in seconds.  Static on purpose: the rules file is plain YAML shared by both install paths.
STALL_SECONDS = 15 * 60
CHECKPOINT_OVERDUE_SECONDS = 60 * 60
#: How far back TrainingStalled looks for a pod's restore (a longer hang reports at least this long).
RESTORE_LOOKBACK = "6h"

_BY_JOB = f"namespace, {JOB_NAME_LABEL}"
_ON_JOB = f"on ({_BY_JOB})"
_TOTAL_LOSS = m.LOSS.select(component="total")
#: Per trainer pod: seconds since it restored its checkpoint, while it has finished no optimizer step yet
#: (its last-step time reads 0 until then); over STALL_SECONDS only.
_RESTORED_WITHOUT_STEP = (
    f"(time() - min_over_time(timestamp({m.TOTAL_STEPS.name} > 0)[{RESTORE_LOOKBACK}:1m]) > {STALL_SECONDS})"
    f" and {m.LAST_STEP_TIMESTAMP.name} == 0 and {m.STEP.name} < {m.TOTAL_STEPS.name}"
)


@dataclass(frozen=True)
class Alert:
    """One alerting rule with its runbook anchor (the lower-cased alert name)."""

    name: str
    expr: str
    duration: str
    severity: str
    summary: str
    description: str
    brief: str  # one plain line for the README and docs (no template placeholders)

    @property
    def runbook_url(self) -> str:
        """Link to this alert's section of docs/runbooks.md."""
        return f"{RUNBOOK_BASE_URL}#{self.name.lower()}"


def _max_by_job(expr: str) -> str:
    return f"max by ({_BY_JOB}) ({expr})"


OPERATOR_ALERTS: tuple[Alert, ...] = (
    Alert(
        name="KubetuneOperatorDown",
        expr=f'absent(up{{job="{OPERATOR_SCRAPE_JOB}"}} == 1)',
        duration="5m",
        severity="critical",
        summary="The kubetune operator is down.",
        description=(
            "No kubetune operator replica has been scraped successfully for 5 minutes: FineTuneJobs are not "
            "reconciled, failed attempts are not restarted and status is not updated."
        ),
        brief="No operator replica has been scraped successfully for 5 minutes.",
    ),
    Alert(
        name="ReconcileErrors",
        expr=f"sum(rate({m.RECONCILE_ERRORS_TOTAL.name}[5m])) > 0",
        duration="15m",
        severity="warning",
        summary="The kubetune operator keeps failing to reconcile FineTuneJobs.",
        description=(
            "Reconciles have raised errors continuously for 15 minutes "
            "({{ $value | humanize }} errors/s). Check the operator logs and its RBAC."
        ),
        brief="Reconciles have raised errors continuously for 15 minutes.",
    ),
    Alert(
        name="FineTuneJobFailed",
        expr=f"max({m.OPERATOR_JOBS.select(phase='Failed')}) > 0",
        duration="0m",
        severity="warning",
        summary="A FineTuneJob failed.",
        description=(
            "{{ $value }} FineTuneJob(s) are in phase Failed. "
            "`kubectl get finetunejobs -A` lists them; the Failed condition carries the reason and message."
        ),
        brief="At least one FineTuneJob is in phase Failed.",
    ),
)

TRAINER_ALERTS: tuple[Alert, ...] = (
    Alert(
        name="TrainingStalled",
        # The second branch: an attempt that restored its checkpoint (total steps > 0) but has finished no step
        # yet exports a last-step time of 0 (the previous attempt's pods are gone), so the time since its
        # restore counts instead: a job hung in its first collective stalls too.
        expr=(
            f"(time() - {_max_by_job(f'{m.LAST_STEP_TIMESTAMP.name} > 0')} > {STALL_SECONDS})\n"
            f"and {_ON_JOB}\n"
            f"({_max_by_job(m.STEP.name)} < {_max_by_job(m.TOTAL_STEPS.name)})\n"
            f"or {_max_by_job(_RESTORED_WITHOUT_STEP)}"
        ),
        duration="0m",
        severity="warning",
        summary="FineTuneJob {{ $labels.namespace }}/{{ $labels.job_name }} makes no progress.",
        description=(
            "No optimizer step finished for {{ $value | humanizeDuration }} while the job is running "
            "(15 minutes is the threshold): a hung collective, a stuck data loader or a dead rank."
        ),
        brief="A running job finished no optimizer step for 15 minutes.",
    ),
    Alert(
        name="LossNotFinite",
        expr=(
            f"{_max_by_job(m.NONFINITE_LOSS_TOTAL.name)} > 0\n"
            f"or count by ({_BY_JOB}) "
            f"({_TOTAL_LOSS} != {_TOTAL_LOSS})\n"
            f"or count by ({_BY_JOB}) "
            f"(abs({_TOTAL_LOSS}) == +Inf)"
        ),
        duration="0m",
        severity="critical",
        summary="FineTuneJob {{ $labels.namespace }}/{{ $labels.job_name }} produced a NaN or infinite loss.",
        description=(
            "The training loss became NaN or infinite. The trainer stops with reason NonFiniteLoss unless "
            "mixed-precision loss scaling skipped the step; lower the learning rate or use bf16."
        ),
        brief="A job's loss became NaN or infinite (or non-finite steps were skipped).",
    ),
    Alert(
        name="CheckpointOverdue",
        expr=(
            f"(time() - {_max_by_job(f'{m.CHECKPOINT_TIMESTAMP.name} > 0')} "
            f"> {CHECKPOINT_OVERDUE_SECONDS})\n"
            f"and {_ON_JOB}\n"
            # The step of an hour ago: a resumed attempt's checkpoint time is when it was saved, hours before a
            # suspension ended; only an hour of training past the checkpoint is work a restart would lose.
            f"({_max_by_job(f'{m.STEP.name} offset {CHECKPOINT_OVERDUE_SECONDS // 60}m')} "
            f"> {_max_by_job(m.CHECKPOINT_STEP.name)})"
        ),
        duration="0m",
        severity="warning",
        summary="FineTuneJob {{ $labels.namespace }}/{{ $labels.job_name }} has not checkpointed for an hour.",
        description=(
            "The last committed checkpoint is {{ $value | humanizeDuration }} old although training advanced "
            "past it: a restart now loses that work. Check object-storage reachability and upload durations."
        ),
        brief="A job advanced past its last checkpoint, committed over an hour ago.",
    ),
    Alert(
        name="TrainingLossRising",
        expr=(
            f"{_max_by_job(f'avg_over_time({_TOTAL_LOSS}[30m])')}\n"
            f"> 1.5 * {_max_by_job(f'avg_over_time({_TOTAL_LOSS}[30m] offset 30m)')}"
        ),
        duration="15m",
        severity="info",
        summary="The training loss of {{ $labels.namespace }}/{{ $labels.job_name }} is rising.",
        description=(
            "The mean total loss of the last 30 minutes is more than 1.5 times that of the 30 minutes before: "
            "the learning rate may be too high or the data may have changed."
        ),
        brief="A job's mean loss over 30 minutes is 1.5× that of the 30 minutes before.",
    ),
)

ALERTS: tuple[Alert, ...] = OPERATOR_ALERTS + TRAINER_ALERTS


def _rule(alert: Alert) -> dict[str, Any]:
    rule: dict[str, Any] = {"alert": alert.name, "expr": alert.expr}
    if alert.duration != "0m":
        rule["for"] = alert.duration
    rule["labels"] = {"severity": alert.severity}
    rule["annotations"] = {
        "summary": alert.summary,
        "description": alert.description,
        "runbook_url": alert.runbook_url,
    }
    return rule


def rule_groups() -> dict[str, Any]:
    """The Prometheus rules-file document (also the ``spec`` of the chart's PrometheusRule)."""
    return {
        "groups": [
            {"name": "kubetune-operator", "rules": [_rule(a) for a in OPERATOR_ALERTS]},
            {"name": "kubetune-training", "rules": [_rule(a) for a in TRAINER_ALERTS]},
        ]
    }


class _LiteralDumper(yaml.SafeDumper):
    """Multi-line strings as ``|`` blocks so the committed PromQL stays readable."""


def _str_presenter(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_LiteralDumper.add_representer(str, _str_presenter)


def render() -> str:
    """The rules file text."""
    header = "# Generated by `python -m kubetune_operator.monitoring.alerts`; do not edit.\n"
    body = yaml.dump(rule_groups(), Dumper=_LiteralDumper, sort_keys=False, width=1000, allow_unicode=True)
    return header + body


def main(argv: list[str] | None = None) -> int:
    """Write the rules file, or with ``--check`` fail when the committed file is stale."""
    parser = argparse.ArgumentParser(prog="python -m kubetune_operator.monitoring.alerts")
    parser.add_argument("file", nargs="?", type=Path, default=DEFAULT_FILE)
    parser.add_argument("--check", action="store_true", help="fail when the committed rules file differs")
    args = parser.parse_args(argv)
    problems = write_or_check({args.file: render()}, check=args.check)
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
