"""Prometheus metrics of one trainer pod (names fixed by the team contract, DESIGN §6).

Local rank 0 of each pod serves them; job-level values (step, loss, eval) are
set from what every rank agrees on (all-reduced losses), so any pod's endpoint
shows the job's progress.  No label carries a job, pod, step, loss or path:
Prometheus adds pod labels, and loss values in labels would explode cardinality.
"""

from __future__ import annotations

import os
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from kubetune_trainer.spec.runtime import DEFAULT_METRICS_PORT, ENV_METRICS_PORT

STEP_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
CHECKPOINT_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)


class TrainerMetrics:
    """Every trainer metric, in its own registry (tests can hold several)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.step = Gauge("kubetune_trainer_step", "Optimizer steps completed.", registry=r)
        self.total_steps = Gauge("kubetune_trainer_total_steps", "Optimizer steps of the whole run.", registry=r)
        self.epoch = Gauge("kubetune_trainer_epoch", "Fractional epoch.", registry=r)
        self.loss = Gauge("kubetune_trainer_loss", "Training loss by component.", ["component"], registry=r)
        self.learning_rate = Gauge("kubetune_trainer_learning_rate", "Current learning rate.", registry=r)
        self.grad_norm = Gauge("kubetune_trainer_grad_norm", "Global gradient norm before clipping.", registry=r)
        self.samples_total = Counter("kubetune_trainer_samples", "Training examples processed.", registry=r)
        self.tokens_total = Counter("kubetune_trainer_tokens", "Non-padding training tokens processed.", registry=r)
        self.samples_per_second = Gauge("kubetune_trainer_samples_per_second", "Training throughput.", registry=r)
        self.tokens_per_second = Gauge("kubetune_trainer_tokens_per_second", "Token throughput.", registry=r)
        self.model_flops_utilization = Gauge(
            "kubetune_trainer_model_flops_utilization",
            "Model FLOPs utilization: achieved model FLOP/s per accelerator over its dense bf16 peak (0-1).",
            registry=r,
        )
        self.eta_seconds = Gauge("kubetune_trainer_eta_seconds", "Estimated seconds to the last step.", registry=r)
        self.step_seconds = Histogram(
            "kubetune_trainer_step_seconds", "Wall time of one optimizer step.", buckets=STEP_BUCKETS, registry=r
        )
        self.last_step_timestamp = Gauge(
            "kubetune_trainer_last_step_timestamp_seconds", "Unix time of the last completed step.", registry=r
        )
        self.nonfinite_loss_total = Counter(
            "kubetune_trainer_nonfinite_loss", "Steps whose loss was NaN or infinite.", registry=r
        )
        self.eval = Gauge("kubetune_trainer_eval", "Latest evaluation metrics.", ["metric"], registry=r)
        self.checkpoint_seconds = Histogram(
            "kubetune_trainer_checkpoint_seconds",
            "Checkpoint phase durations.",
            ["phase"],
            buckets=CHECKPOINT_BUCKETS,
            registry=r,
        )
        self.checkpoint_bytes_total = Counter(
            "kubetune_trainer_checkpoint_bytes", "Checkpoint bytes uploaded.", registry=r
        )
        self.checkpoint_step = Gauge(
            "kubetune_trainer_checkpoint_step", "Step of the last committed checkpoint.", registry=r
        )
        self.checkpoint_timestamp_seconds = Gauge(
            "kubetune_trainer_checkpoint_timestamp_seconds", "Unix time of the last committed checkpoint.", registry=r
        )
        self.checkpoint_fallbacks_total = Counter(
            "kubetune_trainer_checkpoint_fallbacks", "Restores that fell back to an older checkpoint.", registry=r
        )
        self.memory_bytes = Gauge(
            "kubetune_trainer_accelerator_memory_bytes", "Memory in use by this process.", ["kind"], registry=r
        )
        self.trainable_parameters = Gauge("kubetune_trainer_trainable_parameters", "Trainable parameters.", registry=r)
        self.parameters = Gauge("kubetune_trainer_parameters", "All parameters.", registry=r)
        for component in ("total", "task", "auxiliary", "l2sp"):
            self.loss.labels(component=component)

    def serve(self, port: int | None = None) -> int:
        """Start the HTTP endpoint (``KUBETUNE_METRICS_PORT``, default 9400); returns the port."""
        chosen = port if port is not None else int(os.environ.get(ENV_METRICS_PORT, DEFAULT_METRICS_PORT))
        server, _ = start_http_server(chosen, registry=self.registry)
        return int(server.server_port)  # the real one when 0 asked for any free port

    def record_step(
        self,
        *,
        step: int,
        epoch: float,
        losses: dict[str, float],
        learning_rate: float,
        grad_norm: float | None,
        samples: int,
        tokens: int,
        seconds: float,
        total_steps: int,
    ) -> None:
        """Update the per-step metrics (values already aggregated over ranks)."""
        self.step.set(step)
        self.epoch.set(epoch)
        for component, value in losses.items():
            self.loss.labels(component=component).set(value)
        self.learning_rate.set(learning_rate)
        if grad_norm is not None:
            self.grad_norm.set(grad_norm)
        self.samples_total.inc(samples)
        self.tokens_total.inc(tokens)
        self.step_seconds.observe(seconds)
        if seconds > 0:
            self.samples_per_second.set(samples / seconds)
            self.tokens_per_second.set(tokens / seconds)
            self.eta_seconds.set(max(0, total_steps - step) * seconds)
        self.last_step_timestamp.set(time.time())
        self.record_memory()

    def record_memory(self) -> None:
        """Process RSS, and accelerator memory when there is one."""
        import psutil
        import torch

        self.memory_bytes.labels(kind="rss").set(psutil.Process().memory_info().rss)
        if torch.cuda.is_available():
            self.memory_bytes.labels(kind="allocated").set(torch.cuda.memory_allocated())
            self.memory_bytes.labels(kind="reserved").set(torch.cuda.memory_reserved())

    def record_eval(self, results: dict[str, Any]) -> None:
        """Set ``kubetune_trainer_eval{metric}`` for every numeric result."""
        for name, value in results.items():
            if name != "samples" and isinstance(value, int | float):  # a count, not a metric
                self.eval.labels(metric=name).set(float(value))
