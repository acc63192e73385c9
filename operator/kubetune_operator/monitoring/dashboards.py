"""Grafana dashboards as code: "kubetune / Overview" and "kubetune / Training", written as plain JSON.

Run ``python -m kubetune_operator.monitoring.dashboards [--check] [DIR]`` (default DIR:
``charts/kubetune/dashboards``).  The chart ships the JSON files as ConfigMaps with the Grafana sidecar
label; ``tests/monitoring`` runs every panel query against a real Prometheus.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from kubetune_operator.monitoring._generated import write_or_check
from kubetune_trainer.spec import catalog as m
from kubetune_trainer.spec.catalog import JOB_NAME_LABEL, OPERATOR_SCRAPE_JOB, TRAINER_SCRAPE_JOB

DEFAULT_DIR = Path("charts/kubetune/dashboards")
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
#: Grafana's own interval variable; tests substitute it with a duration.
RATE = "$__rate_interval"
#: The label selector every Training panel uses (template variables namespace and job).
JOB_SELECTOR = f'namespace="$namespace", {JOB_NAME_LABEL}="$job"'

PanelKind = Literal["timeseries", "stat", "table"]


@dataclass(frozen=True)
class Query:
    """One PromQL target of a panel."""

    expr: str
    legend: str = ""


@dataclass(frozen=True)
class Panel:
    """A panel: its queries, display kind, unit and width in grid columns (24 per row)."""

    title: str
    description: str
    queries: tuple[Query, ...]
    kind: PanelKind = "timeseries"
    unit: str = "short"
    width: int = 12
    height: int = 8


@dataclass(frozen=True)
class Row:
    """A titled group of panels laid out left to right."""

    title: str
    panels: tuple[Panel, ...]


@dataclass(frozen=True)
class Dashboard:
    """A whole dashboard: identity, template variables and rows."""

    uid: str
    title: str
    description: str
    rows: tuple[Row, ...]
    variables: tuple[dict[str, Any], ...] = field(default_factory=tuple)


def _quantiles(metric: str, selector: str, by: str = "", qs: tuple[float, ...] = (0.5, 0.95)) -> tuple[Query, ...]:
    """histogram_quantile targets for one histogram, one query per quantile."""
    group = f"le, {by}" if by else "le"
    suffix = f"{{{{{by}}}}} " if by else ""
    return tuple(
        Query(
            f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{{{selector}}}[{RATE}])))",
            f"{suffix}p{round(q * 100)}",
        )
        for q in qs
    )


def _trainer(metric: str) -> str:
    return f"{metric}{{{JOB_SELECTOR}}}"


OPERATOR = f'job="{OPERATOR_SCRAPE_JOB}"'


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
                        "Gang restarts",
                        "New attempts the operator created after retryable failures.",
                        (Query(f"sum(increase({m.OPERATOR_RESTARTS_TOTAL.name}[{RATE}]))", "restarts"),),
                        width=12,
                    ),
                    Panel(
                        "Time to Running",
                        "Seconds from FineTuneJob creation to phase Running (scheduling, image pull, rendezvous).",
                        _quantiles(m.TIME_TO_RUNNING_SECONDS.name, ""),
                        unit="s",
                        width=8,
                    ),
                    Panel(
                        "Job duration",
                        "Seconds from creation to Succeeded or Failed.",
                        _quantiles(m.JOB_DURATION_SECONDS.name, ""),
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
                        _quantiles(m.RECONCILE_SECONDS.name, "", qs=(0.5, 0.95, 0.99)),
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
            _query_variable("namespace", "Namespace", namespace_query),
            _query_variable("job", "Job", job_query),
        ),
        rows=(
            Row(
                "Progress",
                (
                    Panel(
                        "Step",
                        "Optimizer steps completed.",
                        (Query(f"max({_trainer(m.STEP.name)})"),),
                        kind="stat",
                        width=4,
                    ),
                    Panel(
                        "Progress",
                        "Steps completed out of the total.",
                        (Query(f"max({_trainer(m.STEP.name)}) / max({_trainer(m.TOTAL_STEPS.name)})"),),
                        kind="stat",
                        unit="percentunit",
                        width=4,
                    ),
                    Panel(
                        "Epoch",
                        "Current epoch.",
                        (Query(f"max({_trainer(m.EPOCH.name)})"),),
                        kind="stat",
                        width=4,
                    ),
                    Panel(
                        "ETA",
                        "Estimated time to the last step.",
                        (Query(f"max({_trainer(m.ETA_SECONDS.name)})"),),
                        kind="stat",
                        unit="s",
                        width=4,
                    ),
                    Panel(
                        "Time since last step",
                        "Seconds since a step finished; TrainingStalled fires above 15 minutes.",
                        (Query(f"time() - max({_trainer(m.LAST_STEP_TIMESTAMP.name)})"),),
                        kind="stat",
                        unit="s",
                        width=4,
                    ),
                    Panel(
                        "Parameters",
                        "Trainable parameters (what the strategy updates) and all parameters of the model.",
                        (
                            Query(f"max({_trainer(m.TRAINABLE_PARAMETERS.name)})", "trainable"),
                            Query(f"max({_trainer(m.PARAMETERS.name)})", "total"),
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
                        (Query(f"max by (component) ({_trainer(m.LOSS.name)})", "{{component}}"),),
                        width=8,
                    ),
                    Panel(
                        "Evaluation",
                        "Last evaluation result by metric.",
                        (Query(f"max by (metric) ({_trainer(m.EVAL.name)})", "{{metric}}"),),
                        width=8,
                    ),
                    Panel(
                        "Non-finite losses",
                        "Steps whose loss was NaN or infinite (LossNotFinite fires on any).",
                        (Query(f"max({_trainer(m.NONFINITE_LOSS_TOTAL.name)})", "non-finite steps"),),
                        width=8,
                    ),
                    Panel(
                        "Learning rate",
                        "Learning rate of the last step (after warmup and schedule).",
                        (Query(f"max({_trainer(m.LEARNING_RATE.name)})", "lr"),),
                        width=12,
                    ),
                    Panel(
                        "Gradient norm",
                        "Global gradient norm before clipping.",
                        (Query(f"max({_trainer(m.GRAD_NORM.name)})", "grad norm"),),
                        width=12,
                    ),
                ),
            ),
            Row(
                "Throughput",
                (
                    Panel(
                        "Samples per second",
                        "Training samples per second for the whole job.",
                        (Query(f"max({_trainer(m.SAMPLES_PER_SECOND.name)})", "samples/s"),),
                        width=6,
                    ),
                    Panel(
                        "Tokens per second",
                        "Training tokens per second for the whole job.",
                        (Query(f"max({_trainer(m.TOKENS_PER_SECOND.name)})", "tokens/s"),),
                        width=6,
                    ),
                    Panel(
                        "Samples and tokens processed",
                        "Samples and tokens processed by the current attempt (counters restart with each attempt).",
                        (
                            Query(f"max({_trainer(m.SAMPLES_TOTAL.name)})", "samples"),
                            Query(f"max({_trainer(m.TOKENS_TOTAL.name)})", "tokens"),
                        ),
                        width=6,
                    ),
                    Panel(
                        "Step time",
                        "Wall time of one optimizer step, p50 and p95.",
                        _quantiles(m.STEP_SECONDS.name, JOB_SELECTOR),
                        unit="s",
                        width=6,
                    ),
                    Panel(
                        "Model FLOPs utilization",
                        "Achieved model FLOP/s per accelerator over its dense bf16 peak (MFU); "
                        "0 on CPUs or unknown accelerators without resources.acceleratorPeakTflops.",
                        (Query(f"max({_trainer(m.MODEL_FLOPS_UTILIZATION.name)})", "MFU"),),
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
                        _quantiles(m.CHECKPOINT_SECONDS.name, JOB_SELECTOR, by="phase"),
                        unit="s",
                        width=8,
                    ),
                    Panel(
                        "Checkpoint upload rate",
                        "Checkpoint bytes uploaded per second.",
                        (Query(f"sum(rate({_trainer(m.CHECKPOINT_BYTES_TOTAL.name)}[{RATE}]))", "bytes/s"),),
                        unit="Bps",
                        width=8,
                    ),
                    Panel(
                        "Last checkpoint",
                        "Step of the last committed checkpoint, its age, and restores that fell back past a bad one.",
                        (
                            Query(f"max({_trainer(m.CHECKPOINT_STEP.name)})", "step"),
                            Query(
                                f"time() - max({_trainer(m.CHECKPOINT_TIMESTAMP.name)})",
                                "age (s)",
                            ),
                            Query(f"max({_trainer(m.CHECKPOINT_FALLBACKS_TOTAL.name)})", "fallbacks"),
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
                                f"max by (pod, kind) ({_trainer(m.ACCELERATOR_MEMORY_BYTES.name)})",
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


def _query_variable(name: str, label: str, query: str) -> dict[str, Any]:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "definition": query,
        "query": {"query": query, "refId": f"{name}-variable"},
        "refresh": 2,
        "sort": 1,
        "includeAll": False,
        "multi": False,
        "hide": 0,
        "current": {},
        "options": [],
    }


def _panel_json(panel: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    options: dict[str, Any]
    if panel.kind == "stat":
        options = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}, "colorMode": "value"}
    elif panel.kind == "table":
        options = {"showHeader": True}
    else:
        options = {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi"},
        }
    targets = []
    for index, query in enumerate(panel.queries):
        target: dict[str, Any] = {"refId": chr(ord("A") + index), "datasource": DATASOURCE, "expr": query.expr}
        if query.legend:
            target["legendFormat"] = query.legend
        if panel.kind == "table":
            target["format"] = "table"
            target["instant"] = True
        targets.append(target)
    result: dict[str, Any] = {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": panel.height, "w": panel.width, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
        "options": options,
        "targets": targets,
    }
    if panel.kind == "table":
        result["transformations"] = [{"id": "merge", "options": {}}]
    return result


def to_json(dashboard: Dashboard) -> dict[str, Any]:
    """The Grafana dashboard model (schemaVersion 39) of ``dashboard``, with grid positions laid out."""
    panels: list[dict[str, Any]] = []
    panel_id = 1
    y = 0
    for row in dashboard.rows:
        panels.append(
            {
                "id": panel_id,
                "type": "row",
                "title": row.title,
                "collapsed": False,
                "panels": [],
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
            }
        )
        panel_id += 1
        y += 1
        x = 0
        row_height = 0
        for panel in row.panels:
            if x + panel.width > 24:
                x, y, row_height = 0, y + row_height, 0
            panels.append(_panel_json(panel, panel_id, x, y))
            panel_id += 1
            x += panel.width
            row_height = max(row_height, panel.height)
        y += row_height
    datasource_variable = {
        "name": "datasource",
        "label": "Data source",
        "type": "datasource",
        "query": "prometheus",
        "current": {},
        "hide": 0,
        "options": [],
        "refresh": 1,
    }
    return {
        "uid": dashboard.uid,
        "title": dashboard.title,
        "description": dashboard.description,
        "tags": ["kubetune"],
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "timezone": "browser",
        "annotations": {"list": []},
        "links": [],
        "templating": {"list": [datasource_variable, *dashboard.variables]},
        "panels": panels,
    }


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
