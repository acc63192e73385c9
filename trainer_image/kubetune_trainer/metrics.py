"""Prometheus metrics of one trainer pod, built from the catalog (:mod:`kubetune_trainer.spec.catalog`).

Local rank 0 of each pod serves them; job-level values (step, loss, eval) are
set from what every rank agrees on (all-reduced losses), so any pod's endpoint
shows the job's progress.  No label carries a job, pod, step, loss or path:
Prometheus adds pod labels, and loss values in labels would explode cardinality.
"""

from __future__ import annotations

import os
import time
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server

from kubetune_trainer.spec import catalog as m
from kubetune_trainer.spec.runtime import DEFAULT_METRICS_PORT, ENV_METRICS_PORT


class TrainerMetrics:
    """Every trainer metric of the catalog, in its own registry (tests can hold several)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.step = m.instrument(m.STEP, r)
        self.total_steps = m.instrument(m.TOTAL_STEPS, r)
        self.epoch = m.instrument(m.EPOCH, r)
        self.loss = m.instrument(m.LOSS, r)
        self.learning_rate = m.instrument(m.LEARNING_RATE, r)
        self.grad_norm = m.instrument(m.GRAD_NORM, r)
        self.samples_total = m.instrument(m.SAMPLES_TOTAL, r)
        self.tokens_total = m.instrument(m.TOKENS_TOTAL, r)
        self.samples_per_second = m.instrument(m.SAMPLES_PER_SECOND, r)
        self.tokens_per_second = m.instrument(m.TOKENS_PER_SECOND, r)
        self.model_flops_utilization = m.instrument(m.MODEL_FLOPS_UTILIZATION, r)
        self.eta_seconds = m.instrument(m.ETA_SECONDS, r)
        self.step_seconds = m.instrument(m.STEP_SECONDS, r)
        self.last_step_timestamp = m.instrument(m.LAST_STEP_TIMESTAMP, r)
        self.nonfinite_loss_total = m.instrument(m.NONFINITE_LOSS_TOTAL, r)
        self.eval = m.instrument(m.EVAL, r)
        self.checkpoint_seconds = m.instrument(m.CHECKPOINT_SECONDS, r)
        self.checkpoint_bytes_total = m.instrument(m.CHECKPOINT_BYTES_TOTAL, r)
        self.checkpoint_step = m.instrument(m.CHECKPOINT_STEP, r)
        self.checkpoint_timestamp_seconds = m.instrument(m.CHECKPOINT_TIMESTAMP, r)
        self.checkpoint_fallbacks_total = m.instrument(m.CHECKPOINT_FALLBACKS_TOTAL, r)
        self.memory_bytes = m.instrument(m.ACCELERATOR_MEMORY_BYTES, r)
        self.trainable_parameters = m.instrument(m.TRAINABLE_PARAMETERS, r)
        self.parameters = m.instrument(m.PARAMETERS, r)
        self.examples_dropped_total = m.instrument(m.EXAMPLES_DROPPED_TOTAL, r)
        # No loss series until the first step: a pre-created child would export a loss of 0 from the
        # pod's start (a dip to 0 on every restart in the loss panel, a lower baseline for TrainingLossRising).
        for reason in m.EXAMPLES_DROPPED_TOTAL.labels["reason"]:
            self.examples_dropped_total.labels(reason=reason)

    def record_dropped(self, dropped: dict[str, int]) -> None:
        """Count the examples the data pipeline dropped, by reason (once per attempt)."""
        for reason, count in dropped.items():
            if count:
                self.examples_dropped_total.labels(reason=reason).inc(count)

    def serve(self, port: int | None = None) -> int:
        """Start the HTTP endpoint (``KUBETUNE_METRICS_PORT``, default 9400); returns the port."""
        chosen = port if port is not None else int(os.environ.get(ENV_METRICS_PORT, DEFAULT_METRICS_PORT))
        server, _ = start_http_server(chosen, registry=self.registry)
        return int(server.server_port)  # the real one when 0 asked for any free port

    def record_start(self, *, step: int, epoch: float, total_steps: int) -> None:
        """Where this run starts, once its checkpoint is restored (step 0 on a fresh start).

        Until then ``kubetune_trainer_total_steps`` reads 0, which tells a reader (the operator, ``kubetune
        run``) that ``kubetune_trainer_step`` is not yet the job's position: a restarted pod's fresh gauges
        would otherwise set its progress back to step 0 while it loads."""
        self.step.set(step)
        self.epoch.set(epoch)
        self.total_steps.set(total_steps)

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
