"""The metric catalog: every metric kubetune exports, stated once (DESIGN §6).

The trainer's :mod:`kubetune_trainer.metrics` and the operator's metrics build
their instruments from these entries (:func:`instrument`), the operator's progress
reader looks samples up by them, and the Grafana dashboards and Prometheus alert
rules write their PromQL with them; ``tests/unit/test_single_definitions.py`` fails when
a metric name is spelled anywhere else in ``operator/`` or ``trainer_image/``.

Every label has a closed set of values so the series count of a job is bounded:
Prometheus adds the pod's own labels (namespace, pod, job name), never a step,
loss value or path.  Pure: prometheus-client is imported only by :func:`instrument`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

# Through the package (not a section module): the API models may move between its modules.
from kubetune_trainer.spec import Metric, Phase
from kubetune_trainer.spec.data import DROP_REASONS

MetricType = Literal["gauge", "counter", "histogram"]

#: Scrape job names the dashboards and alert rules expect (the ServiceMonitor/PodMonitor set them).
OPERATOR_SCRAPE_JOB = "kubetune-operator"
TRAINER_SCRAPE_JOB = "kubetune-trainer"

#: The Prometheus label the PodMonitor copies from the pods' job-name label.
JOB_NAME_LABEL = "job_name"

LOSS_COMPONENTS = ("total", "task", "auxiliary", "l2sp")
CHECKPOINT_PHASES = ("save", "upload", "commit", "retention", "restore")
MEMORY_KINDS = ("allocated", "reserved", "rss")
EVAL_METRICS = tuple(m.value for m in Metric)
JOB_PHASES = tuple(p.value for p in Phase)

_INF = float("inf")


@dataclass(frozen=True)
class MetricSpec:
    """One exported metric family: its name, type, help, the allowed values of each label, histogram buckets."""

    name: str
    type: MetricType
    help: str
    labels: dict[str, tuple[str, ...]] = field(default_factory=dict)
    unit: str = ""
    buckets: tuple[float, ...] = ()

    @property
    def client_name(self) -> str:
        """The name to give prometheus-client, which appends ``_total`` to counters itself."""
        return self.name.removesuffix("_total") if self.type == "counter" else self.name

    def select(self, **labels: str) -> str:
        """PromQL selector of this family, e.g. ``kubetune_trainer_loss{component="total"}``."""
        if not labels:
            return self.name
        inner = ", ".join(f'{key}="{value}"' for key, value in labels.items())
        return f"{self.name}{{{inner}}}"

    @property
    def bucket(self) -> str:
        """The ``_bucket`` series of a histogram."""
        return f"{self.name}_bucket"

    @property
    def count(self) -> str:
        """The ``_count`` series of a histogram."""
        return f"{self.name}_count"


# -- the trainer (each pod's local rank 0, named container port "metrics")

STEP = MetricSpec("kubetune_trainer_step", "gauge", "Optimizer steps completed, counting those before a resume.")
TOTAL_STEPS = MetricSpec(
    "kubetune_trainer_total_steps", "gauge", "Optimizer steps the job will run; 0 until the checkpoint is restored."
)
EPOCH = MetricSpec("kubetune_trainer_epoch", "gauge", "Current epoch (fractional).")
LOSS = MetricSpec(
    "kubetune_trainer_loss", "gauge", "Training loss of the last step by component.", {"component": LOSS_COMPONENTS}
)
LEARNING_RATE = MetricSpec("kubetune_trainer_learning_rate", "gauge", "Learning rate of the last step.")
GRAD_NORM = MetricSpec("kubetune_trainer_grad_norm", "gauge", "Global gradient norm of the last step.")
SAMPLES_TOTAL = MetricSpec("kubetune_trainer_samples_total", "counter", "Training samples processed.")
TOKENS_TOTAL = MetricSpec("kubetune_trainer_tokens_total", "counter", "Training tokens processed.")
SAMPLES_PER_SECOND = MetricSpec(
    "kubetune_trainer_samples_per_second", "gauge", "Training throughput in samples per second."
)
TOKENS_PER_SECOND = MetricSpec(
    "kubetune_trainer_tokens_per_second", "gauge", "Training throughput in tokens per second."
)
MODEL_FLOPS_UTILIZATION = MetricSpec(
    "kubetune_trainer_model_flops_utilization",
    "gauge",
    "Model FLOPs utilization: achieved model FLOP/s per accelerator over its dense bf16 peak (0-1).",
    unit="ratio",
)
ETA_SECONDS = MetricSpec(
    "kubetune_trainer_eta_seconds", "gauge", "Estimated seconds until the last step.", unit="seconds"
)
STEP_SECONDS = MetricSpec(
    "kubetune_trainer_step_seconds",
    "histogram",
    "Wall time of one optimizer step.",
    unit="seconds",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
LAST_STEP_TIMESTAMP = MetricSpec(
    "kubetune_trainer_last_step_timestamp_seconds",
    "gauge",
    "Unix time the last optimizer step finished.",
    unit="seconds",
)
NONFINITE_LOSS_TOTAL = MetricSpec(
    "kubetune_trainer_nonfinite_loss_total", "counter", "Steps whose loss was NaN or infinite."
)
EVAL = MetricSpec("kubetune_trainer_eval", "gauge", "Last evaluation result by metric.", {"metric": EVAL_METRICS})
CHECKPOINT_SECONDS = MetricSpec(
    "kubetune_trainer_checkpoint_seconds",
    "histogram",
    "Duration of checkpoint phases.",
    {"phase": CHECKPOINT_PHASES},
    unit="seconds",
    buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800),
)
CHECKPOINT_BYTES_TOTAL = MetricSpec(
    "kubetune_trainer_checkpoint_bytes_total", "counter", "Checkpoint bytes uploaded.", unit="bytes"
)
CHECKPOINT_STEP = MetricSpec("kubetune_trainer_checkpoint_step", "gauge", "Step of the last committed checkpoint.")
CHECKPOINT_TIMESTAMP = MetricSpec(
    "kubetune_trainer_checkpoint_timestamp_seconds",
    "gauge",
    "Unix time the last checkpoint was committed (a resumed one: when it was saved).",
    unit="seconds",
)
CHECKPOINT_FALLBACKS_TOTAL = MetricSpec(
    "kubetune_trainer_checkpoint_fallbacks_total",
    "counter",
    "Restores that skipped a corrupt or incomplete checkpoint.",
)
ACCELERATOR_MEMORY_BYTES = MetricSpec(
    "kubetune_trainer_accelerator_memory_bytes",
    "gauge",
    "Accelerator (or host, on CPU) memory by kind.",
    {"kind": MEMORY_KINDS},
    unit="bytes",
)
EXAMPLES_DROPPED_TOTAL = MetricSpec(
    "kubetune_trainer_examples_dropped_total",
    "counter",
    "Examples dropped at tokenization because no trainable token was left, by reason.",
    {"reason": DROP_REASONS},
)
TRAINABLE_PARAMETERS = MetricSpec("kubetune_trainer_trainable_parameters", "gauge", "Parameters the optimizer updates.")
PARAMETERS = MetricSpec("kubetune_trainer_parameters", "gauge", "Parameters of the model.")

# -- the operator

OPERATOR_JOBS = MetricSpec("kubetune_operator_jobs", "gauge", "FineTuneJobs by phase.", {"phase": JOB_PHASES})
OPERATOR_RESTARTS_TOTAL = MetricSpec(
    "kubetune_operator_restarts_total", "counter", "Gang restarts (new attempts) after failures."
)
OPERATOR_PREEMPTIONS_TOTAL = MetricSpec(
    "kubetune_operator_preemptions_total",
    "counter",
    "Attempts ended by a disruption (eviction, drain, lost node, Kueue preemption) and re-queued.",
)
PODS_FORCE_DELETED_TOTAL = MetricSpec(
    "kubetune_operator_pods_force_deleted_total",
    "counter",
    "Pods force-deleted after their grace period, stuck Terminating on a NotReady or lost node.",
)
RECONCILE_SECONDS = MetricSpec(
    "kubetune_operator_reconcile_seconds",
    "histogram",
    "Duration of one reconcile.",
    unit="seconds",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, _INF),
)
RECONCILE_ERRORS_TOTAL = MetricSpec(
    "kubetune_operator_reconcile_errors_total", "counter", "Reconciles that raised an error."
)
TIME_TO_RUNNING_SECONDS = MetricSpec(
    "kubetune_operator_time_to_running_seconds",
    "histogram",
    "Seconds from FineTuneJob creation to phase Running.",
    unit="seconds",
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, _INF),
)
JOB_DURATION_SECONDS = MetricSpec(
    "kubetune_operator_job_duration_seconds",
    "histogram",
    "Seconds from FineTuneJob creation to Succeeded or Failed.",
    unit="seconds",
    buckets=(60, 300, 900, 1800, 3600, 7200, 14400, 43200, 86400, 259200, _INF),
)

TRAINER_METRICS: tuple[MetricSpec, ...] = (
    STEP,
    TOTAL_STEPS,
    EPOCH,
    LOSS,
    LEARNING_RATE,
    GRAD_NORM,
    SAMPLES_TOTAL,
    TOKENS_TOTAL,
    SAMPLES_PER_SECOND,
    TOKENS_PER_SECOND,
    MODEL_FLOPS_UTILIZATION,
    ETA_SECONDS,
    STEP_SECONDS,
    LAST_STEP_TIMESTAMP,
    NONFINITE_LOSS_TOTAL,
    EVAL,
    CHECKPOINT_SECONDS,
    CHECKPOINT_BYTES_TOTAL,
    CHECKPOINT_STEP,
    CHECKPOINT_TIMESTAMP,
    CHECKPOINT_FALLBACKS_TOTAL,
    ACCELERATOR_MEMORY_BYTES,
    EXAMPLES_DROPPED_TOTAL,
    TRAINABLE_PARAMETERS,
    PARAMETERS,
)

OPERATOR_METRICS: tuple[MetricSpec, ...] = (
    OPERATOR_JOBS,
    OPERATOR_RESTARTS_TOTAL,
    OPERATOR_PREEMPTIONS_TOTAL,
    PODS_FORCE_DELETED_TOTAL,
    RECONCILE_SECONDS,
    RECONCILE_ERRORS_TOTAL,
    TIME_TO_RUNNING_SECONDS,
    JOB_DURATION_SECONDS,
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
        return (spec.bucket, f"{spec.name}_sum", spec.count)
    return (spec.name,)


def instrument(spec: MetricSpec, registry: Any) -> Any:
    """The prometheus-client Gauge, Counter or Histogram of ``spec`` in ``registry``."""
    from prometheus_client import Counter, Gauge, Histogram

    labels = tuple(spec.labels)
    if spec.type == "histogram":
        return Histogram(spec.client_name, spec.help, labels, buckets=spec.buckets, registry=registry)
    kind = Counter if spec.type == "counter" else Gauge
    return kind(spec.client_name, spec.help, labels, registry=registry)
