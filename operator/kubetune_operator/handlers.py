"""kopf handlers: thin, they only route work to one idempotent reconcile.

Create, resume and update of a FineTuneJob, every event of its attempt Jobs and
pods, and a resync timer all call :meth:`Reconciler.run` for that job.  Calls for
one job are serialized and coalesced (events arriving during a reconcile cause
exactly one more), so a burst of pod events costs one or two reconciles.
Handlers return nothing: kopf keeps its progress in annotations, never in status.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import kopf

from kubetune_operator import apply, kube, names
from kubetune_operator.metrics import OperatorMetrics
from kubetune_operator.settings import OperatorSettings
from kubetune_trainer.spec import GROUP, PLURAL, VERSION, Phase

logger = logging.getLogger("kubetune.operator")

Key = tuple[str, str]  # (namespace, name)
TERMINAL = (Phase.SUCCEEDED.value, Phase.FAILED.value)
RETRY_SECONDS = 2.0
SLOW_RETRY_SECONDS = 30.0
CHILD_RESOURCES = (("batch", "v1", "jobs"), ("v1", "pods"))  # watched for events of the attempts


@dataclass
class Context:
    """What one running operator shares between its handlers."""

    settings: OperatorSettings
    metrics: OperatorMetrics
    metrics_url: apply.MetricsUrlFn = apply.default_metrics_url
    api: kube.KubeApi | None = None
    connection: kopf.ConnectionInfo | None = None  # fixed login (tests); else service account / kubeconfig
    reconciler: Reconciler | None = field(default=None)


class Reconciler:
    """Serialized, coalesced and delayed calls of :func:`apply.reconcile_one` per job."""

    def __init__(self, context: Context) -> None:
        self.context = context
        self._running: set[Key] = set()
        self._dirty: set[Key] = set()
        self._timers: dict[Key, tuple[float, asyncio.TimerHandle]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def _api(self) -> kube.KubeApi:
        if self.context.api is None:
            raise kopf.TemporaryError("not logged in yet", delay=1)
        return self.context.api

    async def run(self, key: Key) -> None:
        """Reconcile ``key`` now (or once more after the running reconcile of it).

        Raises :class:`kopf.TemporaryError` when the API failed; the caller decides
        whether kopf retries it or the job is requeued."""
        if key in self._running:
            self._dirty.add(key)
            return
        self._running.add(key)
        try:
            while True:
                self._dirty.discard(key)
                await self._once(key)
                if key not in self._dirty:
                    return
        finally:
            self._running.discard(key)

    async def run_quietly(self, key: Key) -> None:
        """:meth:`run`, turning failures into a delayed retry (for event handlers, which kopf does not retry)."""
        try:
            await self.run(key)
        except kopf.TemporaryError as error:
            self.schedule(key, float(error.delay or RETRY_SECONDS))

    async def _once(self, key: Key) -> None:
        started = time.perf_counter()
        try:
            outcome = await apply.reconcile_one(self._api(), self.context.settings, key[0], key[1])
        except kube.ApiError as error:
            self.context.metrics.reconcile_errors.inc()
            delay = RETRY_SECONDS if error.transient else SLOW_RETRY_SECONDS
            logger.warning("reconcile of %s/%s failed: %s (retry in %ss)", key[0], key[1], error, delay)
            raise kopf.TemporaryError(str(error), delay=delay) from error
        if outcome is None:
            self.context.metrics.forget("/".join(key))
            return
        self.context.metrics.observe("/".join(key), outcome, time.perf_counter() - started)
        if outcome.requeue_after is not None:
            self.schedule(key, outcome.requeue_after)

    def schedule(self, key: Key, delay: float) -> None:
        """Reconcile ``key`` after ``delay`` seconds (an earlier pending request wins)."""
        loop = asyncio.get_running_loop()
        due = loop.time() + max(0.0, delay)
        pending = self._timers.get(key)
        if pending is not None:
            if pending[0] <= due:
                return
            pending[1].cancel()
        self._timers[key] = (due, loop.call_at(due, self._fire, key))

    def _fire(self, key: Key) -> None:
        self._timers.pop(key, None)
        task = asyncio.get_running_loop().create_task(self.run_quietly(key))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def cancel_all(self) -> None:
        """Drop pending delayed reconciles (operator shutdown)."""
        for _due, handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        for task in self._tasks:
            task.cancel()


def _owner_key(namespace: str | None, labels: Mapping[str, str]) -> Key | None:
    name = labels.get(names.LABEL_JOB_NAME)
    return (namespace or "default", name) if name else None


def _unfinished(status: Mapping[str, Any], spec: Mapping[str, Any], **_: Any) -> bool:
    """Resync only what can still change: unfinished jobs, or finished ones awaiting their TTL."""
    if status.get("phase") not in TERMINAL:
        return True
    return ((spec.get("runPolicy") or {}).get("ttlSecondsAfterFinished")) is not None


def _running(status: Mapping[str, Any], **_: Any) -> bool:
    return status.get("phase") == Phase.RUNNING.value


def register(registry: kopf.OperatorRegistry, context: Context) -> None:
    """Register every handler of one operator instance on ``registry``."""
    reconciler = Reconciler(context)
    context.reconciler = reconciler
    _register_lifecycle(registry, context, reconciler)
    _register_finetunejobs(registry, context, reconciler)
    _register_timers(registry, context, reconciler)


def _register_lifecycle(registry: kopf.OperatorRegistry, context: Context, reconciler: Reconciler) -> None:
    """Start-up, login (one API identity shared with kopf) and clean-up."""

    @kopf.on.startup(registry=registry)
    async def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        configure_kopf(settings)

    @kopf.on.login(registry=registry)
    async def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        info = context.connection
        if info is None:
            info = kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)
        if info is not None and context.api is None:
            context.api = kube.KubeApi(
                info.server,
                token=info.token,
                scheme=info.scheme,
                ca_path=str(info.ca_path) if info.ca_path else None,
                ca_data=info.ca_data,
                insecure=bool(info.insecure),
                certificate_path=str(info.certificate_path) if info.certificate_path else None,
                private_key_path=str(info.private_key_path) if info.private_key_path else None,
            )
        return info

    @kopf.on.cleanup(registry=registry)
    async def cleanup(**_: Any) -> None:
        reconciler.cancel_all()
        if context.api is not None:
            await context.api.close()


def _register_finetunejobs(registry: kopf.OperatorRegistry, context: Context, reconciler: Reconciler) -> None:
    """FineTuneJob create/resume/update and every event of its children: one reconcile."""
    children = {names.LABEL_MANAGED_BY: names.MANAGED_BY}

    @kopf.on.resume(GROUP, VERSION, PLURAL, registry=registry)
    @kopf.on.create(GROUP, VERSION, PLURAL, registry=registry)
    @kopf.on.update(GROUP, VERSION, PLURAL, registry=registry)
    async def finetunejob_changed(namespace: str | None, name: str, **_: Any) -> None:
        await reconciler.run((namespace or "default", name))

    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)
    async def finetunejob_event(type: str | None, namespace: str | None, name: str, **_: Any) -> None:
        if type == "DELETED":
            context.metrics.forget(f"{namespace or 'default'}/{name}")

    # A child that was just ADDED tells nothing new (the operator created the Job; a new pod is
    # Pending): skipping those saves a reconcile per child at scale.  Initial listings after a
    # restart arrive without a type and are covered by the resume handler anyway.
    @kopf.on.event(*CHILD_RESOURCES[0], labels=children, registry=registry)
    @kopf.on.event(*CHILD_RESOURCES[1], labels=children, registry=registry)
    async def child_event(
        type: str | None,
        namespace: str | None,
        labels: Mapping[str, str],
        **_: Any,
    ) -> None:
        key = _owner_key(namespace, labels)
        if key is not None and type != "ADDED":
            await reconciler.run_quietly(key)


def _register_timers(registry: kopf.OperatorRegistry, context: Context, reconciler: Reconciler) -> None:
    """The level-based resync of unfinished jobs and the progress reader of running ones."""
    settings = context.settings

    @kopf.timer(
        GROUP,
        VERSION,
        PLURAL,
        interval=settings.resync_interval_seconds,
        initial_delay=settings.resync_interval_seconds,
        when=_unfinished,
        registry=registry,
    )
    async def resync(namespace: str | None, name: str, **_: Any) -> None:
        await reconciler.run_quietly((namespace or "default", name))

    @kopf.timer(
        GROUP,
        VERSION,
        PLURAL,
        interval=settings.progress_interval_seconds,
        when=_running,
        registry=registry,
    )
    async def progress(namespace: str | None, name: str, **_: Any) -> None:
        if context.api is None:
            return
        try:
            await apply.refresh_progress(
                context.api, settings, namespace or "default", name, metrics_url=context.metrics_url
            )
        except kube.ApiError as error:  # progress is best effort; the phase never depends on it
            logger.info("progress of %s/%s not updated: %s", namespace, name, error)


def configure_kopf(settings: kopf.OperatorSettings) -> None:
    """kopf settings every replica uses: progress and diff-base in annotations (never in
    status, which the CRD schema would prune), warnings only as kopf Events (the
    operator posts its own transition Events), a finalizer name of our own, and label
    selectors on the watches of Jobs and pods."""
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=names.KOPF_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=names.KOPF_PREFIX, key=names.KOPF_DIFFBASE_KEY
    )
    settings.persistence.finalizer = names.FINALIZER
    settings.posting.level = logging.WARNING
    # Server-side filtering: the API server sends only our children, never every Job and Pod of the
    # cluster (kopf's handler label filters alone would stream them all and drop them here).
    children = f"{names.LABEL_MANAGED_BY}={names.MANAGED_BY}"
    for resource in CHILD_RESOURCES:
        settings.watching.label_selectors[resource] = children
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.networking.request_timeout = 60
    # Timers need kopf's finalizer; on deletion kopf waits for them to stop and, by default,
    # re-checks only every 60 s.  Our timers are idempotent and safe to cancel: stop them fast
    # so a deleted FineTuneJob never hangs on its finalizer.
    settings.background.cancellation_polling = 1.0
    settings.background.instant_exit_timeout = 0.1
