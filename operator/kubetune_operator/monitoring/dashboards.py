"""Grafana dashboards as code: "kubetune / Overview" and "kubetune / Training", written as plain JSON.

Run ``python -m kubetune_operator.monitoring.dashboards [--check] [DIR]`` (default DIR:
``charts/kubetune/dashboards``).  The chart ships the JSON files as ConfigMaps with the Grafana sidecar
label; ``tests/monitoring`` runs every panel query against a real Prometheus.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from kubetune_operator.monitoring._generated import write_or_check
from kubetune_operator.monitoring.grafana import (
    JOB_SELECTOR,
    OPERATOR,
    RATE,
    Dashboard,
    Panel,
    Query,
    Row,
    quantiles,
    query_variable,
    to_json,
    trainer,
)
from kubetune_trainer.spec import catalog as m
from kubetune_trainer.spec.catalog import JOB_NAME_LABEL, TRAINER_SCRAPE_JOB

DEFAULT_DIR = Path("charts/kubetune/dashboards")


def overview() -> Dashboard:
    """The cluster view: FineTuneJobs by phase, restarts, time to Running, reconcile health, operator health."""
    return Dashboard(
        uid="kubetune-overview",
        title="kubetune / Overview",
        description="FineTuneJobs across the cluster and the health of the kubetune operator.",
        rows=(
            Row(
                "Operator health",
                (
                    Panel(
                        "Operator replicas up",
                        "Operator pods Prometheus scrapes successfully (the KubetuneOperatorDown alert fires at 0).",
                        (Query(f"sum(up{{{OPERATOR}}})", "up"),),
                        kind="stat",
                        width=6,
                    ),
                    Panel(
                        "Operator replicas",
                        "Scrape health of each operator replica over time (1 up, 0 down).",
                        (Query(f"max by (instance) (up{{{OPERATOR}}})", "{{instance}}"),),
                        width=12,
                    ),
                    Panel(
                        "Active training jobs",
                        "FineTuneJobs whose trainer pods Prometheus currently scrapes.",
                        (
                            Query(
                                f"count(count by (namespace, {JOB_NAME_LABEL}) "
                                f"({m.STEP.select(job=TRAINER_SCRAPE_JOB)}))",
                                "jobs",
                            ),
                        ),
                        kind="stat",
                        width=6,
                    ),
                ),
            ),
            Row(
                "FineTuneJobs",
                (
                    Panel(
                        "FineTuneJobs by phase",
                        "Number of FineTuneJobs in each phase (max over operator replicas).",
                        (Query(f"max by (phase) ({m.OPERATOR_JOBS.name})", "{{phase}}"),),
                        width=12,
                    ),
                    Panel(
                        "Gang restarts and preemptions",
                        "New attempts after retryable failures (they use runPolicy.maxRestarts), after disruptions "
                        "(evictions, drains, lost nodes, Kueue preemption: they do not), and pods stuck Terminating "
                        "on lost nodes that the operator force-deleted.",
                        (
                            Query(f"sum(increase({m.OPERATOR_RESTARTS_TOTAL.name}[{RATE}]))", "restarts"),
                            Query(f"sum(increase({m.OPERATOR_PREEMPTIONS_TOTAL.name}[{RATE}]))", "preemptions"),
                            Query(f"sum(increase({m.PODS_FORCE_DELETED_TOTAL.name}[{RATE}]))", "pods force-deleted"),
                        ),
                        width=12,
                    ),
                    Panel(
                        "Time to Running",
                        "Seconds from FineTuneJob creation to phase Running (scheduling, image pull, rendezvous).",
                        quantiles(m.TIME_TO_RUNNING_SECONDS.name, ""),
                        unit="s",
                        width=8,
                    ),
                    Panel(
                        "Job duration",
                        "Seconds from creation to Succeeded or Failed.",
                        quantiles(m.JOB_DURATION_SECONDS.name, ""),
                        unit="s",
                        width=8,
                    ),
                    Panel(
                        "Training jobs",
                        "Step, total steps and loss of every job Prometheus scrapes.",
                        (
                            Query(f"max by (namespace, {JOB_NAME_LABEL}) ({m.STEP.name})", "step"),
                            Query(f"max by (namespace, {JOB_NAME_LABEL}) ({m.TOTAL_STEPS.name})", "total"),
                            Query(
                                f"max by (namespace, {JOB_NAME_LABEL}) ({m.LOSS.select(component='total')})",
                                "loss",
                            ),
                        ),
                        kind="table",
                        width=8,
                    ),
                ),
            ),
            Row(
                "Reconciliation",
                (
                    Panel(
                        "Reconcile latency",
                        "Duration of one reconcile of a FineTuneJob.",
                        quantiles(m.RECONCILE_SECONDS.name, "", qs=(0.5, 0.95, 0.99)),
                        unit="s",
                        width=8,
                    ),
                    Panel(
                        "Reconciles per second",
                        "Reconciles the operator runs (create/update/resume and child events).",
                        (Query(f"sum(rate({m.RECONCILE_SECONDS.count}[{RATE}]))", "reconciles"),),
                        unit="ops",
                        width=8,
                    ),
                    Panel(
                        "Reconcile errors per second",
                        "Reconciles that raised; the ReconcileErrors alert fires when this stays above zero.",
                        (Query(f"sum(rate({m.RECONCILE_ERRORS_TOTAL.name}[{RATE}]))", "errors"),),
                        unit="ops",
                        width=8,
                    ),
                ),
            ),
        ),
    )


def training() -> Dashboard:
    """One job's training: progress, loss components, evaluation, optimizer, throughput, checkpoints, memory."""
    namespace_query = f"label_values({m.STEP.name}, namespace)"
    job_query = f"label_values({m.STEP.select(namespace='$namespace')}, {JOB_NAME_LABEL})"
    return Dashboard(
        uid="kubetune-training",
        title="kubetune / Training",
        description="One FineTuneJob's training run, chosen by the namespace and job variables.",
        variables=(
            query_variable("namespace", "Namespace", namespace_query),
            query_variable("job", "Job", job_query),
        ),
        rows=(
            Row(
                "Progress",
                (
                    Panel(
                        "Step",
                        "Optimizer steps completed.",
                        (Query(f"max({trainer(m.STEP.name)})"),),
                        kind="stat",
                        width=4,
                    ),
                    Panel(
                        "Progress",
                        "Steps completed out of the total.",
                        (Query(f"max({trainer(m.STEP.name)}) / max({trainer(m.TOTAL_STEPS.name)})"),),
                        kind="stat",
                        unit="percentunit",
                        width=4,
                    ),
                    Panel(
                        "Epoch",
                        "Current epoch.",
                        (Query(f"max({trainer(m.EPOCH.name)})"),),
                        kind="stat",
                        width=4,
                    ),
                    Panel(
                        "ETA",
                        "Estimated time to the last step.",
                        (Query(f"max({trainer(m.ETA_SECONDS.name)})"),),
                        kind="stat",
                        unit="s",
                        width=4,
                    ),
                    Panel(
                        "Time since last step",
                        "Seconds since a step finished; TrainingStalled fires above 15 minutes. "
                        "No data while a new attempt has not finished its first step.",
                        # A pod's gauge reads 0 until its first step: time() - 0 would read ~55 years.
                        (Query(f"time() - max({trainer(m.LAST_STEP_TIMESTAMP.name)} > 0)"),),
                        kind="stat",
                        unit="s",
                        width=4,
                    ),
                    Panel(
                        "Parameters",
                        "Trainable parameters (what the strategy updates) and all parameters of the model.",
                        (
                            Query(f"max({trainer(m.TRAINABLE_PARAMETERS.name)})", "trainable"),
                            Query(f"max({trainer(m.PARAMETERS.name)})", "total"),
                        ),
                        kind="stat",
                        width=4,
                    ),
                ),
            ),
            Row(
                "Objective",
                (
                    Panel(
                        "Loss components",
                        "Loss of the last step: total = task + auxiliary + l2sp.",
                        (Query(f"max by (component) ({trainer(m.LOSS.name)})", "{{component}}"),),
                        width=8,
                    ),
                    Panel(
                        "Evaluation",
                        "Last evaluation result by metric.",
                        (Query(f"max by (metric) ({trainer(m.EVAL.name)})", "{{metric}}"),),
                        width=8,
                    ),
                    Panel(
                        "Non-finite losses",
                        "Steps whose loss was NaN or infinite (LossNotFinite fires on any).",
                        (Query(f"max({trainer(m.NONFINITE_LOSS_TOTAL.name)})", "non-finite steps"),),
                        width=8,
                    ),
                    Panel(
                        "Learning rate",
                        "Learning rate of the last step (after warmup and schedule).",
                        (Query(f"max({trainer(m.LEARNING_RATE.name)})", "lr"),),
                        width=8,
                    ),
                    Panel(
                        "Gradient norm",
                        "Global gradient norm before clipping.",
                        (Query(f"max({trainer(m.GRAD_NORM.name)})", "grad norm"),),
                        width=8,
                    ),
                    Panel(
                        "Dropped examples",
                        "Examples dropped at tokenization because truncation left no trainable token, by reason "
                        "(the job fails above dataset.maxDroppedFraction).",
                        (Query(f"max by (reason) ({trainer(m.EXAMPLES_DROPPED_TOTAL.name)})", "{{reason}}"),),
                        width=8,
                    ),
                ),
            ),
            Row(
                "Throughput",
                (
                    Panel(
                        "Samples per second",
                        "Training samples per second for the whole job.",
                        (Query(f"max({trainer(m.SAMPLES_PER_SECOND.name)})", "samples/s"),),
                        width=6,
                    ),
                    Panel(
                        "Tokens per second",
                        "Training tokens per second for the whole job.",
                        (Query(f"max({trainer(m.TOKENS_PER_SECOND.name)})", "tokens/s"),),
                        width=6,
                    ),
                    Panel(
                        "Samples and tokens processed",
                        "Samples and tokens processed by the current attempt (counters restart with each attempt).",
                        (
                            Query(f"max({trainer(m.SAMPLES_TOTAL.name)})", "samples"),
                            Query(f"max({trainer(m.TOKENS_TOTAL.name)})", "tokens"),
                        ),
                        width=6,
                    ),
                    Panel(
                        "Step time",
                        "Wall time of one optimizer step, p50 and p95.",
                        quantiles(m.STEP_SECONDS.name, JOB_SELECTOR),
                        unit="s",
                        width=6,
                    ),
                    Panel(
                        "Model FLOPs utilization",
                        "Achieved model FLOP/s per accelerator over its dense bf16 peak (MFU); "
                        "0 on CPUs or unknown accelerators without resources.acceleratorPeakTflops.",
                        (Query(f"max({trainer(m.MODEL_FLOPS_UTILIZATION.name)})", "MFU"),),
                        unit="percentunit",
                        width=6,
                    ),
                ),
            ),
            Row(
                "Checkpoints",
                (
                    Panel(
                        "Checkpoint durations",
                        "p50 and p95 of each checkpoint phase: save, upload, commit, restore.",
                        quantiles(m.CHECKPOINT_SECONDS.name, JOB_SELECTOR, by="phase"),
                        unit="s",
                        width=8,
                    ),
                    Panel(
                        "Checkpoint upload rate",
                        "Checkpoint bytes uploaded per second.",
                        (Query(f"sum(rate({trainer(m.CHECKPOINT_BYTES_TOTAL.name)}[{RATE}]))", "bytes/s"),),
                        unit="Bps",
                        width=8,
                    ),
                    Panel(
                        "Last checkpoint",
                        "Step of the last committed checkpoint, its age, and restores that fell back past a bad one.",
                        (
                            Query(f"max({trainer(m.CHECKPOINT_STEP.name)})", "step"),
                            Query(
                                f"time() - max({trainer(m.CHECKPOINT_TIMESTAMP.name)} > 0)",
                                "age (s)",
                            ),
                            Query(f"max({trainer(m.CHECKPOINT_FALLBACKS_TOTAL.name)})", "fallbacks"),
                        ),
                        kind="stat",
                        width=8,
                    ),
                ),
            ),
            Row(
                "Resources",
                (
                    Panel(
                        "Accelerator memory",
                        "Allocated and reserved accelerator memory and host RSS of each pod's local rank 0.",
                        (
                            Query(
                                f"max by (pod, kind) ({trainer(m.ACCELERATOR_MEMORY_BYTES.name)})",
                                "{{pod}} {{kind}}",
                            ),
                        ),
                        unit="bytes",
                        width=24,
                    ),
                ),
            ),
        ),
    )


def dashboards() -> tuple[Dashboard, ...]:
    """Every dashboard the chart ships."""
    return (overview(), training())


def file_name(dashboard: Dashboard) -> str:
    """The committed file name of ``dashboard`` (also its ConfigMap data key)."""
    return f"{dashboard.uid}.json"


def render_files(directory: Path) -> dict[Path, str]:
    """Path → JSON text of every dashboard (stable key order, trailing newline)."""
    return {directory / file_name(d): json.dumps(to_json(d), indent=2) + "\n" for d in dashboards()}


def panel_queries(dashboard_json: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, expr) for every target of every non-row panel of a dashboard's JSON model."""
    found: list[tuple[str, str]] = []
    for panel in dashboard_json["panels"]:
        for target in panel.get("targets", []):
            found.append((panel["title"], target["expr"]))
    return found


def main(argv: list[str] | None = None) -> int:
    """Write the dashboards, or with ``--check`` fail when the committed JSON is stale."""
    parser = argparse.ArgumentParser(prog="python -m kubetune_operator.monitoring.dashboards")
    parser.add_argument("directory", nargs="?", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--check", action="store_true", help="fail when a committed dashboard differs")
    args = parser.parse_args(argv)
    problems = write_or_check(render_files(args.directory), check=args.check)
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
