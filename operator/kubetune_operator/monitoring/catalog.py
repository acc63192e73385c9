"""The metric names and label sets kubetune exports: the one list dashboards, alerts and tests agree on.

The names are the cross-team contract (DESIGN §6).  Every label has a closed set of values so the
series count of a job is bounded: Prometheus adds the pod's own labels (namespace, pod, job name),
never a step, loss value or path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from kubetune_trainer.spec.job import Metric
from kubetune_trainer.spec.status import Phase

MetricType = Literal["gauge", "counter", "histogram"]

#: Scrape job names the dashboards and alert rules expect (the ServiceMonitor/PodMonitor set them).
OPERATOR_SCRAPE_JOB = "kubetune-operator"
TRAINER_SCRAPE_JOB = "kubetune-trainer"

#: The label the PodMonitor copies from the pod label ``kubetune.io/job-name``.
JOB_NAME_LABEL = "job_name"

LOSS_COMPONENTS = ("total", "task", "auxiliary", "l2sp")
CHECKPOINT_PHASES = ("save", "upload", "commit", "retention", "restore")
MEMORY_KINDS = ("allocated", "reserved", "rss")
EVAL_METRICS = tuple(m.value for m in Metric)
JOB_PHASES = tuple(p.value for p in Phase)


@dataclass(frozen=True)
class MetricSpec:
    """One exported metric family: its name, type and the allowed values of each of its labels."""

    name: str
    type: MetricType
    help: str
    labels: dict[str, tuple[str, ...]] = field(default_factory=dict)
    unit: str = ""


TRAINER_METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("kubetune_trainer_step", "gauge", "Optimizer steps completed."),
    MetricSpec("kubetune_trainer_total_steps", "gauge", "Optimizer steps the job will run."),
    MetricSpec("kubetune_trainer_epoch", "gauge", "Current epoch (fractional)."),
    MetricSpec(
        "kubetune_trainer_loss", "gauge", "Training loss of the last step by component.", {"component": LOSS_COMPONENTS}
    ),
    MetricSpec("kubetune_trainer_learning_rate", "gauge", "Learning rate of the last step."),
    MetricSpec("kubetune_trainer_grad_norm", "gauge", "Global gradient norm of the last step."),
    MetricSpec("kubetune_trainer_samples_total", "counter", "Training samples processed."),
    MetricSpec("kubetune_trainer_tokens_total", "counter", "Training tokens processed."),
    MetricSpec("kubetune_trainer_samples_per_second", "gauge", "Training throughput in samples per second."),
    MetricSpec("kubetune_trainer_tokens_per_second", "gauge", "Training throughput in tokens per second."),
    MetricSpec(
        "kubetune_trainer_model_flops_utilization",
        "gauge",
        "Model FLOPs utilization: achieved model FLOP/s per accelerator over its dense bf16 peak (0-1).",
        unit="ratio",
    ),
    MetricSpec("kubetune_trainer_eta_seconds", "gauge", "Estimated seconds until the last step.", unit="seconds"),
    MetricSpec("kubetune_trainer_step_seconds", "histogram", "Wall time of one optimizer step.", unit="seconds"),
    MetricSpec(
        "kubetune_trainer_last_step_timestamp_seconds",
        "gauge",
        "Unix time the last optimizer step finished.",
        unit="seconds",
    ),
    MetricSpec("kubetune_trainer_nonfinite_loss_total", "counter", "Steps whose loss was NaN or infinite."),
    MetricSpec("kubetune_trainer_eval", "gauge", "Last evaluation result by metric.", {"metric": EVAL_METRICS}),
    MetricSpec(
        "kubetune_trainer_checkpoint_seconds",
        "histogram",
        "Duration of checkpoint phases.",
        {"phase": CHECKPOINT_PHASES},
        unit="seconds",
    ),
    MetricSpec("kubetune_trainer_checkpoint_bytes_total", "counter", "Checkpoint bytes uploaded.", unit="bytes"),
    MetricSpec("kubetune_trainer_checkpoint_step", "gauge", "Step of the last committed checkpoint."),
    MetricSpec(
        "kubetune_trainer_checkpoint_timestamp_seconds",
        "gauge",
        "Unix time the last checkpoint was committed.",
        unit="seconds",
    ),
    MetricSpec(
        "kubetune_trainer_checkpoint_fallbacks_total",
        "counter",
        "Restores that skipped a corrupt or incomplete checkpoint.",
    ),
    MetricSpec(
        "kubetune_trainer_accelerator_memory_bytes",
        "gauge",
        "Accelerator (or host, on CPU) memory by kind.",
        {"kind": MEMORY_KINDS},
        unit="bytes",
    ),
    MetricSpec("kubetune_trainer_trainable_parameters", "gauge", "Parameters the optimizer updates."),
    MetricSpec("kubetune_trainer_parameters", "gauge", "Parameters of the model."),
)

OPERATOR_METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("kubetune_operator_jobs", "gauge", "FineTuneJobs by phase.", {"phase": JOB_PHASES}),
    MetricSpec("kubetune_operator_restarts_total", "counter", "Gang restarts (new attempts) created."),
    MetricSpec("kubetune_operator_reconcile_seconds", "histogram", "Duration of one reconcile.", unit="seconds"),
    MetricSpec("kubetune_operator_reconcile_errors_total", "counter", "Reconciles that raised an error."),
    MetricSpec(
        "kubetune_operator_time_to_running_seconds",
        "histogram",
        "Seconds from FineTuneJob creation to phase Running.",
        unit="seconds",
    ),
    MetricSpec(
        "kubetune_operator_job_duration_seconds",
        "histogram",
        "Seconds from FineTuneJob creation to Succeeded or Failed.",
        unit="seconds",
    ),
)

ALL_METRICS: tuple[MetricSpec, ...] = TRAINER_METRICS + OPERATOR_METRICS


def metric(name: str) -> MetricSpec:
    """Return the catalog entry called ``name`` (KeyError names the unknown metric)."""
    for spec in ALL_METRICS:
        if spec.name == name:
            return spec
    raise KeyError(f"unknown kubetune metric {name!r}")


def series_names(spec: MetricSpec) -> tuple[str, ...]:
    """Names of the series a family exposes (histograms expose _bucket, _sum and _count)."""
    if spec.type == "histogram":
        return (f"{spec.name}_bucket", f"{spec.name}_sum", f"{spec.name}_count")
    return (spec.name,)
