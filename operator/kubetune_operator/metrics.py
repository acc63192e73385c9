"""Operator metrics (DESIGN §6, from :mod:`kubetune_trainer.spec.catalog`), served with /healthz on the metrics port."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from kubetune_operator.apply import Outcome
from kubetune_operator.conditions import parse_time
from kubetune_trainer.spec import Phase
from kubetune_trainer.spec import catalog as m


class OperatorMetrics:
    """The operator's Prometheus metrics (from the catalog); one instance (and registry) per running operator."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.jobs = m.instrument(m.OPERATOR_JOBS, self.registry)
        self.restarts = m.instrument(m.OPERATOR_RESTARTS_TOTAL, self.registry)
        self.preemptions = m.instrument(m.OPERATOR_PREEMPTIONS_TOTAL, self.registry)
        self.force_deleted = m.instrument(m.PODS_FORCE_DELETED_TOTAL, self.registry)
        self.reconcile_seconds = m.instrument(m.RECONCILE_SECONDS, self.registry)
        self.reconcile_errors = m.instrument(m.RECONCILE_ERRORS_TOTAL, self.registry)
        self.time_to_running = m.instrument(m.TIME_TO_RUNNING_SECONDS, self.registry)
        self.job_duration = m.instrument(m.JOB_DURATION_SECONDS, self.registry)
        self._phases: dict[str, str] = {}
        for phase in Phase:
            self.jobs.labels(phase.value).set(0)

    def observe(self, key: str, outcome: Outcome, seconds: float) -> None:
        """Account one successful reconcile of ``key`` (namespace/name)."""
        self.reconcile_seconds.observe(seconds)
        if outcome.restarts > outcome.old_restarts:
            self.restarts.inc(outcome.restarts - outcome.old_restarts)
        if outcome.preemptions > outcome.old_preemptions:
            self.preemptions.inc(outcome.preemptions - outcome.old_preemptions)
        if outcome.force_deleted:
            self.force_deleted.inc(outcome.force_deleted)
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
