"""The only code that talks to the API server: read, decide (pure), apply.

:func:`reconcile_one` is idempotent and level-based: it reads the FineTuneJob,
its attempt Jobs and pods, asks :func:`~kubetune_operator.reconcile.next_status`
what should be, and applies the plan — deletions first, then create-if-absent
with deterministic names, then one status patch (only when it changed), then
one Event per transition (after the status landed), then TTL deletion.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from kubetune_operator import conditions as c
from kubetune_operator import kube, names
from kubetune_operator.builders import METRICS_PORT_NAME, desired_children
from kubetune_operator.observe import Conflict, Observed, node_ready, observe, ownership, pod_state, stuck_pods
from kubetune_operator.progress import parse_progress, with_step_time
from kubetune_operator.reconcile import Event, Plan, invalid_spec_plan, next_status
from kubetune_operator.resolve import InvalidSpec, ResolvedJob, load_job
from kubetune_operator.settings import OperatorSettings
from kubetune_trainer.spec import ConditionType, Phase
from kubetune_trainer.spec import runtime as rt

logger = logging.getLogger("kubetune.operator")

MetricsUrlFn = Callable[[Mapping[str, Any]], str | None]
EVENT_SOURCE = "kubetune-operator"
VOLATILE_PROGRESS = ("updated", "eta")  # change on every read; not worth a write on their own


def default_metrics_url(pod: Mapping[str, Any]) -> str | None:
    """Rank 0's metrics URL from its pod IP and the container port named ``metrics`` (the port the pod
    was built with, which need not be today's setting)."""
    ip = (pod.get("status") or {}).get("podIP")
    if not ip:
        return None
    containers = (pod.get("spec") or {}).get("containers") or []
    ports = [p for c in containers for p in c.get("ports") or [] if p.get("name") == METRICS_PORT_NAME]
    port = ports[0].get("containerPort") if ports else rt.DEFAULT_METRICS_PORT
    return f"http://{ip}:{port}/metrics"


@dataclass(frozen=True)
class Outcome:
    """What one reconcile did (for metrics and tests)."""

    phase: str | None
    old_phase: str | None
    requeue_after: float | None
    created: bool
    status_changed: bool
    deleted_self: bool
    restarts: int
    old_restarts: int
    status: Mapping[str, Any]
    created_at: str | None
    preemptions: int = 0
    old_preemptions: int = 0
    force_deleted: int = 0


def _status_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """A merge patch turning ``old`` into ``new`` (top-level keys; removed keys become null)."""
    patch: dict[str, Any] = {}
    for key in set(old) | set(new):
        if old.get(key) != new.get(key):
            patch[key] = new.get(key)
    return patch


async def post_event(api: kube.KubeApi, body: Mapping[str, Any], event: Event, now: datetime) -> None:
    """Record ``event`` on the FineTuneJob (best effort: an Event is never worth a retry)."""
    metadata = body.get("metadata") or {}
    namespace = metadata.get("namespace") or "default"
    stamp = c.rfc3339(now)
    manifest = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{metadata.get('name')}.", "namespace": namespace},
        "involvedObject": {
            "apiVersion": body.get("apiVersion"),
            "kind": body.get("kind"),
            "name": metadata.get("name"),
            "namespace": namespace,
            "uid": metadata.get("uid"),
        },
        "type": event.type,
        "reason": event.reason,
        "message": event.message[:1024],
        "source": {"component": EVENT_SOURCE},
        "reportingComponent": EVENT_SOURCE,
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "count": 1,
    }
    try:
        await api.create(kube.EVENTS, namespace, manifest)
    except kube.ApiError as error:
        logger.warning("could not post event %s on %s/%s: %s", event.reason, namespace, metadata.get("name"), error)


async def find_conflicts(api: kube.KubeApi, job: ResolvedJob, children: list[dict[str, Any]]) -> tuple[Conflict, ...]:
    """Existing objects that hold a child's name but are not this FineTuneJob's (create-if-absent
    must never adopt a user's object: a foreign Service of the job's name would break rendezvous)."""
    found: list[Conflict] = []
    for child in children:
        existing = await api.get(kube.resource_of(child), child["metadata"].get("namespace"), child["metadata"]["name"])
        if existing is None:
            continue
        ours, stale, who = ownership(existing, job.uid, job.name)
        if not ours:
            found.append(Conflict(str(child["kind"]), str(child["metadata"]["name"]), stale, who))
    return tuple(found)


async def _create_children(api: kube.KubeApi, job: ResolvedJob, children: list[dict[str, Any]]) -> bool:
    created = False
    for child in children:
        resource, namespace, name = (
            kube.resource_of(child),
            child["metadata"].get("namespace"),
            child["metadata"]["name"],
        )
        if await api.create(resource, namespace, child):
            created = True
            continue
        # 409: someone created it between our check and our create; it must be ours to go on.
        existing = await api.get(resource, namespace, name)
        if existing is not None and not ownership(existing, job.uid, job.name)[0]:
            raise kube.ApiError(409, "Conflict", f"{child['kind']} {namespace}/{name} is not owned by {job.name}")
    return created


async def unready_nodes(api: kube.KubeApi, observed: Observed, now: datetime) -> frozenset[str]:
    """The nodes of pods stuck Terminating past their grace period that are NotReady, unreachable or gone."""
    found: set[str] = set()
    for node_name in sorted({pod.node for pod in stuck_pods(observed, now) if pod.node}):
        try:
            node = await api.get(kube.NODES, None, node_name)
        except kube.ApiError as error:  # e.g. 403 without the chart's node read: never force-delete blindly
            logger.warning("cannot read node %s (%s): pods stuck on it are left alone", node_name, error)
            continue
        if node is None or not node_ready(node):
            found.add(node_name)
    return frozenset(found)


async def _apply(api: kube.KubeApi, namespace: str, plan: Plan, job: ResolvedJob | None) -> bool:
    """Act on the plan: force deletions, deletions, suspend flips, then the new attempt's children
    (create-if-absent)."""
    created = False
    for name in plan.force_delete_pods:
        await api.delete(kube.PODS, namespace, name, propagation="Background", grace_period_seconds=0)
    for name in plan.delete_jobs:
        # Background: the Job goes now, its pods after it; the next attempt waits until they are gone.
        await api.delete(kube.JOBS, namespace, name, propagation="Background")
    if plan.suspend_job:
        await api.patch(kube.JOBS, namespace, plan.suspend_job, {"spec": {"suspend": True}})
    if plan.unsuspend_job:
        await api.patch(kube.JOBS, namespace, plan.unsuspend_job, {"spec": {"suspend": False}})
    if plan.create_attempt is not None and job is not None:
        created = await _create_children(api, job, desired_children(job, attempt=plan.create_attempt))
    return created


async def _patch_status(api: kube.KubeApi, namespace: str, name: str, patch: dict[str, Any]) -> Any:
    """Merge-patch the status subresource; None when the object is gone."""
    return await api.patch(kube.FINETUNEJOBS, namespace, name, {"status": patch}, subresource="status")


async def reconcile_one(
    api: kube.KubeApi,
    settings: OperatorSettings,
    namespace: str,
    name: str,
    *,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> Outcome | None:
    """Bring FineTuneJob ``namespace/name`` one step closer to its desired state.

    Returns None when the object is gone or being deleted.  Raises
    :class:`kube.ApiError` on API failures (the caller retries)."""
    body = await api.get(kube.FINETUNEJOBS, namespace, name)
    if body is None or (body.get("metadata") or {}).get("deletionTimestamp"):
        return None
    metadata = body.get("metadata") or {}
    old_status: dict[str, Any] = dict(body.get("status") or {})
    generation = metadata.get("generation")
    moment = now()
    job: ResolvedJob | None = None
    try:
        job = load_job(body, settings)  # the one parse and resolve of this read; everything below takes it
    except InvalidSpec as error:
        plan = invalid_spec_plan(old_status, error.field, error.message, moment, generation, _raw_ttl(body))
    else:
        plan = await _decide(api, job, old_status, moment)
    # The decision is recorded before it is acted on.  A crash between the two then repeats
    # idempotent actions on the next reconcile instead of forgetting the decision: deleting
    # attempt 1's Job first and dying before the status said "attempt 2" would make the next
    # reconcile see attempt 1 without a Job and create it a second time.
    patch = _status_patch(old_status, plan.status)
    if patch and await _patch_status(api, namespace, name, patch) is None:
        return None  # deleted meanwhile
    created = await _apply(api, namespace, plan, job)
    if patch:
        for event in plan.events:
            await post_event(api, body, event, moment)
    for event in plan.notices:
        await post_event(api, body, event, moment)
    if plan.delete_self:
        await api.delete(kube.FINETUNEJOBS, namespace, name, propagation="Background")
    return Outcome(
        phase=plan.status.get("phase"),
        old_phase=old_status.get("phase"),
        requeue_after=plan.requeue_after,
        created=created,
        status_changed=bool(patch),
        deleted_self=plan.delete_self,
        restarts=int(plan.status.get("restarts") or 0),
        old_restarts=int(old_status.get("restarts") or 0),
        status=plan.status,
        created_at=metadata.get("creationTimestamp"),
        preemptions=int(plan.status.get("preemptions") or 0),
        old_preemptions=int(old_status.get("preemptions") or 0),
        force_deleted=len(plan.force_delete_pods),
    )


def _raw_ttl(body: Mapping[str, Any]) -> int | None:
    """``spec.runPolicy.ttlSecondsAfterFinished`` of a spec that could not be loaded, when it is readable."""
    run_policy = (body.get("spec") or {}).get("runPolicy")
    ttl = run_policy.get("ttlSecondsAfterFinished") if isinstance(run_policy, Mapping) else None
    return ttl if isinstance(ttl, int) and not isinstance(ttl, bool) and ttl >= 0 else None


async def _decide(api: kube.KubeApi, job: ResolvedJob, old_status: Mapping[str, Any], now: datetime) -> Plan:
    """Observe the job's children (and, when it matters, the nodes of stuck pods and the owners of
    the names the next attempt needs), then ask the state machine."""
    jobs = await api.list(kube.JOBS, job.namespace, names.children_selector(job.name))
    pods = await api.list(kube.PODS, job.namespace, names.children_selector(job.name))
    observed = observe(job.name, job.uid, old_status, jobs, pods)
    if stuck_pods(observed, now):
        observed = replace(observed, unready_nodes=await unready_nodes(api, observed, now))
    plan = next_status(job, observed, now)
    if plan.create_attempt is not None:
        conflicts = await find_conflicts(api, job, desired_children(job, attempt=plan.create_attempt))
        if conflicts:
            plan = next_status(job, replace(observed, conflicts=conflicts), now)
    return plan


async def refresh_progress(
    api: kube.KubeApi,
    settings: OperatorSettings,
    namespace: str,
    name: str,
    *,
    metrics_url: MetricsUrlFn = default_metrics_url,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
    timeout: float = 3.0,
) -> bool:
    """Read rank 0's metrics into ``status.progress``/``status.checkpoint``; True if written.

    A failed read changes nothing (never the phase): the pod may be starting or gone."""
    body = await api.get(kube.FINETUNEJOBS, namespace, name)
    if body is None:
        return False
    status = body.get("status") or {}
    attempt = status.get("attempt")
    if status.get("phase") != Phase.RUNNING.value or not attempt:
        return False
    try:
        job = load_job(body, settings)
    except InvalidSpec:
        return False  # the reconcile reports it
    pods = await api.list(kube.PODS, namespace, names.children_selector(name, int(attempt)))
    rank0 = [p for p in pods if pod_state(p).index == 0 and pod_state(p).running]
    if not rank0:
        return False
    url = metrics_url(rank0[0])
    if not url:
        return False
    text = await api.fetch_text(url, timeout)
    if text is None:
        return False
    moment = now()
    parsed = parse_progress(text, moment)
    if parsed is None:
        return False
    running = next((x for x in status.get("conditions") or [] if x.get("type") == ConditionType.RUNNING.value), None)
    since = c.parse_time(running.get("lastTransitionTime")) if running else None
    known = status.get("progress") or {}
    # What the trainer has not stated yet (a restarted pod loading) keeps its last known value.
    progress = with_step_time(parsed[0], known, since, moment)
    checkpoint = parsed[1]
    patch: dict[str, Any] = {"progress": progress}
    if checkpoint:
        merged = {**(status.get("checkpoint") or {}), **checkpoint}
        merged["uri"] = job.checkpoint_step_uri(int(checkpoint["step"]))
        patch["checkpoint"] = merged
    old_progress = {k: v for k, v in known.items() if k not in VOLATILE_PROGRESS}
    new_progress = {k: v for k, v in progress.items() if k not in VOLATILE_PROGRESS}
    if old_progress == new_progress and patch.get("checkpoint", status.get("checkpoint")) == status.get("checkpoint"):
        return False
    landed = await api.patch(kube.FINETUNEJOBS, namespace, name, {"status": patch}, subresource="status")
    return landed is not None
