"""Run the operator: kopf with peering and a liveness endpoint, plus the metrics server.

``run_operator()`` blocks (the container's entry point, ``kubetune operator``);
``operator_task()`` is the same as a coroutine and ``start_in_thread()`` runs it in
a background thread with its own event loop, for tests and the e2e harness.
"""

from __future__ import annotations

import asyncio
import logging
import random
import sys
import threading
from dataclasses import dataclass, field
from typing import Any

import kopf

from kubetune_operator.apply import MetricsUrlFn, default_metrics_url
from kubetune_operator.handlers import Context, configure_kopf, register
from kubetune_operator.metrics import OperatorMetrics, start_metrics_server
from kubetune_operator.settings import OperatorSettings, SettingsError, load_settings
from kubetune_trainer.spec.plugins import load_plugins

logger = logging.getLogger("kubetune.operator")


def peering_priority(settings: OperatorSettings) -> int:
    """This replica's peering priority: the configured one, else random, because replicas
    with equal priorities all freeze (a Deployment gives every replica the same env)."""
    if settings.peering_priority:
        return settings.peering_priority
    return random.randint(1, 2**31 - 1)  # noqa: S311 (not security: tie-breaking between replicas)


@dataclass
class OperatorHandle:
    """Control of an operator started by :func:`start_in_thread`."""

    thread: threading.Thread
    stop_flag: threading.Event
    ready_flag: threading.Event
    context: Context
    errors: list[BaseException] = field(default_factory=list)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until kopf started its watches (or raise)."""
        if not self.ready_flag.wait(timeout):
            raise TimeoutError(f"operator not ready after {timeout}s (errors: {self.errors})")

    def stop(self, timeout: float = 30.0) -> None:
        """Ask kopf to exit and wait for the thread."""
        self.stop_flag.set()
        self.thread.join(timeout)

    @property
    def metrics(self) -> OperatorMetrics:
        return self.context.metrics


async def operator_task(
    settings: OperatorSettings | None = None,
    *,
    connection: kopf.ConnectionInfo | None = None,
    metrics_url: MetricsUrlFn = default_metrics_url,
    stop_flag: Any = None,
    ready_flag: Any = None,
    context: Context | None = None,
    serve_metrics: bool = True,
    identity: str | None = None,
) -> None:
    """Run one operator in the current event loop until ``stop_flag`` is set or it is cancelled."""
    settings = settings or load_settings()
    context = context or Context(settings=settings, metrics=OperatorMetrics(), metrics_url=metrics_url)
    context.connection = connection
    registry = kopf.OperatorRegistry()
    register(registry, context)
    kopf_settings = kopf.OperatorSettings()
    configure_kopf(kopf_settings)
    # Peering is mandatory unless standalone: a replica stays paused until it has seen its peers,
    # so two replicas never both act at start-up.  kopf's peering CRDs and the peering object
    # must exist (the chart ships them); a single replica without them runs with
    # KUBETUNE_STANDALONE=true.
    runner = await start_metrics_server(context.metrics, settings.metrics_port) if serve_metrics else None
    standalone = settings.standalone
    try:
        await kopf.operator(
            registry=registry,
            settings=kopf_settings,
            clusterwide=settings.all_namespaces,
            namespaces=settings.watch_namespaces,
            standalone=standalone,
            priority=None if standalone else peering_priority(settings),
            peering_name=None if standalone else settings.peering_name,
            liveness_endpoint=f"http://0.0.0.0:{settings.health_port}/healthz" if serve_metrics else None,
            stop_flag=stop_flag,
            ready_flag=ready_flag,
            identity=identity,  # type: ignore[arg-type]  # kopf.Identity is a NewType of str
            memo=kopf.Memo(),
        )
    finally:
        if runner is not None:
            await runner.cleanup()


def start_in_thread(
    settings: OperatorSettings | None = None,
    *,
    connection: kopf.ConnectionInfo | None = None,
    metrics_url: MetricsUrlFn = default_metrics_url,
    serve_metrics: bool = True,
    identity: str | None = None,
) -> OperatorHandle:
    """Start an operator in a daemon thread with its own event loop; returns its handle."""
    settings = settings or load_settings()
    stop_flag = threading.Event()
    ready_flag = threading.Event()
    context = Context(settings=settings, metrics=OperatorMetrics(), metrics_url=metrics_url)
    handle = OperatorHandle(threading.Thread(), stop_flag, ready_flag, context)

    def target() -> None:
        try:
            asyncio.run(
                operator_task(
                    settings,
                    connection=connection,
                    metrics_url=metrics_url,
                    stop_flag=stop_flag,
                    ready_flag=ready_flag,
                    context=context,
                    serve_metrics=serve_metrics,
                    identity=identity,
                )
            )
        except BaseException as error:  # reported through the handle, the thread must not die silently
            handle.errors.append(error)
            ready_flag.set()

    handle.thread = threading.Thread(target=target, name="kubetune-operator", daemon=True)
    handle.thread.start()
    return handle


def run_operator(settings: OperatorSettings | None = None) -> None:
    """The operator's main loop (blocks until SIGTERM/SIGINT)."""
    settings = settings or load_settings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # One INFO line per handled watch event is noise at scale; the operator logs its own decisions.
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    asyncio.run(operator_task(settings))


def main() -> None:
    """``python -m kubetune_operator.main``: exits 2 with the offending variable on bad settings."""
    try:
        load_plugins()
        settings = load_settings()
    except (SettingsError, ValueError, ImportError) as error:
        print(f"kubetune-operator: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    run_operator(settings)


if __name__ == "__main__":
    main()
