"""Operator metrics (DESIGN §6) on their own registry, served with /healthz on the metrics port."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from kubetune_operator.apply import Outcome
from kubetune_operator.conditions import parse_time
from kubetune_trainer.spec import Phase

_DURATION_BUCKETS = (60, 300, 900, 1800, 3600, 7200, 14400, 43200, 86400, 259200, float("inf"))
_RECONCILE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, float("inf"))


class OperatorMetrics:
    """The operator's Prometheus metrics; one instance (and registry) per running operator."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.jobs = Gauge("kubetune_operator_jobs", "FineTuneJobs by phase.", ["phase"], registry=self.registry)
        self.restarts = Counter(
            "kubetune_operator_restarts", "Gang restarts scheduled after retryable failures.", registry=self.registry
        )
        self.reconcile_seconds = Histogram(
            "kubetune_operator_reconcile_seconds",
            "Duration of one reconcile.",
            buckets=_RECONCILE_BUCKETS,
            registry=self.registry,
        )
        self.reconcile_errors = Counter(
            "kubetune_operator_reconcile_errors", "Reconciles that failed (retried).", registry=self.registry
        )
        self.time_to_running = Histogram(
            "kubetune_operator_time_to_running_seconds",
            "From FineTuneJob creation until all pods of its first attempt ran.",
            buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, float("inf")),
            registry=self.registry,
        )
        self.job_duration = Histogram(
            "kubetune_operator_job_duration_seconds",
            "From first start until Succeeded or Failed.",
            buckets=_DURATION_BUCKETS,
            registry=self.registry,
        )
        self._phases: dict[str, str] = {}
        for phase in Phase:
            self.jobs.labels(phase.value).set(0)

    def observe(self, key: str, outcome: Outcome, seconds: float) -> None:
        """Account one successful reconcile of ``key`` (namespace/name)."""
        self.reconcile_seconds.observe(seconds)
        if outcome.restarts > outcome.old_restarts:
            self.restarts.inc(outcome.restarts - outcome.old_restarts)
        status: Mapping[str, object] = outcome.status
        if outcome.phase != outcome.old_phase and outcome.status_changed:
            created = parse_time(outcome.created_at)
            started = parse_time(str(status.get("startTime") or "") or None)
            first_run = outcome.phase == Phase.RUNNING and int(str(status.get("restarts") or 0)) == 0
            if first_run and outcome.old_phase in (None, Phase.PENDING) and created and started:
                self.time_to_running.observe(max(0.0, (started - created).total_seconds()))
            finished = parse_time(str(status.get("completionTime") or "") or None)
            if outcome.phase in (Phase.SUCCEEDED, Phase.FAILED) and finished and started:
                self.job_duration.observe(max(0.0, (finished - started).total_seconds()))
        if outcome.deleted_self:
            self.forget(key)
        elif outcome.phase:
            self._set_phase(key, outcome.phase)

    def forget(self, key: str) -> None:
        """The FineTuneJob is gone."""
        old = self._phases.pop(key, None)
        if old is not None:
            self.jobs.labels(old).dec()

    def _set_phase(self, key: str, phase: str) -> None:
        old = self._phases.get(key)
        if old == phase:
            return
        if old is not None:
            self.jobs.labels(old).dec()
        self.jobs.labels(phase).inc()
        self._phases[key] = phase

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)


async def start_metrics_server(metrics: OperatorMetrics, port: int, host: str = "0.0.0.0") -> web.AppRunner:  # noqa: S104
    """Serve ``/metrics`` and ``/healthz`` on ``port`` (in the operator's event loop)."""

    async def serve_metrics(_request: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def serve_health(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "time": datetime.now().isoformat()})

    app = web.Application()
    app.router.add_get("/metrics", serve_metrics)
    app.router.add_get("/healthz", serve_health)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
