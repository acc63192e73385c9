"""Per-step reporting: Prometheus metrics on every pod, a log line from rank 0, throughput and MFU.

Works on :class:`~kubetune_trainer.step.StepStats`, which every rank holds
identically (all-reduced), so any pod's endpoint shows the job's progress.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any

from kubetune_trainer.flops import utilization
from kubetune_trainer.session import Session
from kubetune_trainer.step import StepStats


@dataclass
class Reporter:
    """Turns step statistics into metrics, log lines and the run's throughput figures."""

    metrics: Any  # TrainerMetrics
    session: Session
    total_steps: int
    batches_per_epoch: int
    log_every: int
    flops_per_token: float
    peak_tflops: float | None  # per device; None: MFU is not reported
    samples: int = 0
    tokens: int = 0
    seconds: float = 0.0
    steady: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # samples, tokens, seconds after warm-up
    first_step: int | None = None  # this attempt's first step
    _window: list[float] = field(default_factory=lambda: [0.0, 0.0, time.time()])  # samples, tokens, start

    def step(self, stats: StepStats) -> None:
        """Record one optimizer step."""
        self.samples += stats.samples
        self.tokens += stats.tokens
        self.seconds += stats.seconds
        if self.first_step is None:
            self.first_step = stats.step  # 1, or the step after the checkpoint this attempt resumed
        if stats.step - self.first_step >= self.warmup_steps:  # every attempt warms up again
            self.steady = [
                self.steady[0] + stats.samples,
                self.steady[1] + stats.tokens,
                self.steady[2] + stats.seconds,
            ]
        epoch = stats.position / self.batches_per_epoch
        self.metrics.record_step(
            step=stats.step,
            epoch=epoch,
            losses=stats.losses,
            learning_rate=stats.learning_rate,
            grad_norm=stats.grad_norm,
            samples=stats.samples,
            tokens=stats.tokens,
            seconds=stats.seconds,
            total_steps=self.total_steps,
        )
        mfu = self.step_mfu(stats)
        if mfu is not None:
            self.metrics.model_flops_utilization.set(mfu)
        self._window[0] += stats.samples
        self._window[1] += stats.tokens
        if self.session.rank == 0 and (stats.step % self.log_every == 0 or stats.step == self.total_steps):
            elapsed = max(time.time() - self._window[2], 1e-9)
            losses = stats.losses
            line = (
                f"step {stats.step}/{self.total_steps} epoch {epoch:.2f} "
                f"loss {losses['total']:.4f} (task {losses['task']:.4f} aux {losses['auxiliary']:.4f} "
                f"l2sp {losses['l2sp']:.4f}) lr {stats.learning_rate:.3g} {self._window[0] / elapsed:.1f} samples/s "
                f"{self._window[1] / elapsed:.0f} tokens/s"
            )
            if mfu is not None:
                line += f" MFU {mfu:.1%}"
            print(line, file=sys.stderr, flush=True)
            self._window = [0.0, 0.0, time.time()]

    @property
    def warmup_steps(self) -> int:
        """Steps of this attempt left out of the steady-state figures (allocator growth, compilation, cache warm-up)."""
        return min(10, self.total_steps // 3)

    def step_mfu(self, stats: StepStats) -> float | None:
        """MFU of one step (None without a known accelerator peak)."""
        if stats.seconds <= 0:
            return None
        per_device = stats.tokens / stats.seconds / self.session.world_size
        return utilization(per_device, self.flops_per_token, self.peak_tflops)

    def throughput(self) -> dict[str, Any]:
        """The run's throughput for ``kubetune-metrics.json``."""
        seconds = self.seconds
        per_device = self.tokens / seconds / self.session.world_size if seconds else 0.0
        figures: dict[str, Any] = {
            "samplesPerSecond": self.samples / seconds if seconds else 0.0,
            "tokensPerSecond": self.tokens / seconds if seconds else 0.0,
            "trainSeconds": seconds,
            "flopsPerToken": self.flops_per_token,
        }
        mfu = utilization(per_device, self.flops_per_token, self.peak_tflops)
        if mfu is not None:
            figures["modelFlopsUtilization"] = mfu
            figures["peakTflopsPerDevice"] = self.peak_tflops
        samples, tokens, steady_seconds = self.steady
        if steady_seconds > 0:
            figures["steadyState"] = {
                "afterSteps": self.warmup_steps,
                "samplesPerSecond": samples / steady_seconds,
                "tokensPerSecond": tokens / steady_seconds,
            }
            steady_mfu = utilization(
                tokens / steady_seconds / self.session.world_size, self.flops_per_token, self.peak_tflops
            )
            if steady_mfu is not None:
                figures["steadyState"]["modelFlopsUtilization"] = steady_mfu
        return figures
