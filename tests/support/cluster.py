"""One fake Kubernetes cluster for the operator and end-to-end tests, behaving like a real one where it matters.

The API server is the emulator (:mod:`tests.support.kube`); this module adds the rest of a
cluster, talking to it over HTTP only, as the real components do:

* **nodes** (``v1/nodes``) with labels, taints and optional ``nvidia.com/gpu`` capacity, that can
  go NotReady (the kubelet is gone: pods on it freeze, their deletion never finishes);
* a **scheduler** that binds pods to Ready nodes that match their node selector, tolerate their
  taints and have room, or reports ``PodScheduled=False, reason=Unschedulable`` with the
  scheduler's message ("0/3 nodes are available: ...");
* the **Job controller** (:mod:`tests.support.jobcontroller`) and the **kubelets**
  (:mod:`tests.support.kubelet`) with a container runtime (:mod:`tests.support.runtimes`):
  scripted containers for operator tests, real local processes for end-to-end tests;
* **disruptions** as Kubernetes performs them: API eviction and node drain (``DisruptionTarget``,
  then graceful deletion: the container gets SIGTERM and the pod ends ``Failed`` with its exit
  code), scheduler preemption, the taint manager on a lost node, a spot reclaim (graceful node
  shutdown), Kueue eviction and admission (``spec.suspend`` of the Job).

``cluster.start()`` runs all of it in a background thread; ``cluster.step()`` runs one pass.
"""

from __future__ import annotations

import threading
import urllib.error
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kubetune_operator import names
from tests.support.jobcontroller import JobController
from tests.support.kube import Client
from tests.support.kubelet import Kubelets, completion_index, condition, terminal, with_condition
from tests.support.runtimes import Exit, Runtime, ScriptedRuntime

GPU = "nvidia.com/gpu"
UNREACHABLE_TAINT = names.NODE_UNREACHABLE_TAINTS[0]


@dataclass(frozen=True)
class NodeSpec:
    """A node of the fake cluster."""

    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    gpus: int | None = None  # nvidia.com/gpu capacity; None: no accounting (room for anything)


class FakeCluster:
    """Nodes, scheduler, Job controller and kubelets over the emulator's API."""

    def __init__(
        self,
        client: Client,
        *,
        nodes: Iterable[NodeSpec] = (NodeSpec("node-1"), NodeSpec("node-2"), NodeSpec("node-3")),
        runtime: Runtime | None = None,
        pod_selector: str = "",
    ) -> None:
        self.client = client
        self.pod_selector = pod_selector  # e.g. only the operator's pods, in a cluster full of others
        self.runtime: Runtime = runtime or ScriptedRuntime()
        self.jobs = JobController(client)
        self._jobs_by_uid: dict[str, dict[str, Any]] = {}
        self.kubelets = Kubelets(client, self.runtime, self._owner_job)
        self.errors: list[str] = []
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()  # one pass at a time (the loop, or a test calling step())
        self._shutting_down: set[str] = set()  # nodes whose kubelet stops their pods, then goes away
        for node in nodes:
            self.add_node(node)

    # ------------------------------------------------------------------------------------ nodes

    def add_node(self, node: NodeSpec) -> None:
        """Register a Ready node."""
        capacity = {"pods": "110", **({GPU: str(node.gpus)} if node.gpus is not None else {})}
        body = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": node.name, "labels": {"kubernetes.io/hostname": node.name, **node.labels}},
            "spec": {},
        }
        self.client.create("v1", "nodes", None, body)
        status = {
            "capacity": capacity,
            "allocatable": capacity,
            "conditions": [condition("Ready", True, "KubeletReady")],
        }
        self.client.patch("v1", "nodes", None, node.name, {"status": status}, "status")

    def set_node_ready(self, name: str, ready: bool) -> None:
        """The node's kubelet stops (or resumes) reporting: Ready=Unknown and the unreachable taint, as the
        node lifecycle controller sets them; pods on it freeze."""
        node = self.client.get("v1", "nodes", None, name)
        taints = [t for t in (node.get("spec") or {}).get("taints") or [] if t.get("key") != UNREACHABLE_TAINT]
        if not ready:
            taints.append({"key": UNREACHABLE_TAINT, "effect": "NoExecute"})
        self.client.patch("v1", "nodes", None, name, {"spec": {"taints": taints or None}})
        ready_condition = (
            condition("Ready", True, "KubeletReady")
            if ready
            else {
                **condition("Ready", False, "NodeStatusUnknown", "Kubelet stopped posting node status."),
                "status": "Unknown",
            }
        )
        conditions = with_condition(list((node.get("status") or {}).get("conditions") or []), ready_condition)
        self.client.patch("v1", "nodes", None, name, {"status": {"conditions": conditions}}, "status")

    def _ready_nodes(self, nodes: list[dict[str, Any]]) -> set[str]:
        ready = set()
        for node in nodes:
            conditions = {c["type"]: c["status"] for c in (node.get("status") or {}).get("conditions") or []}
            if conditions.get("Ready") == "True":
                ready.add(node["metadata"]["name"])
        return ready

    # ------------------------------------------------------------------------------------ the loop

    def step(self) -> None:
        """One pass: the Job controller, the scheduler, then the kubelets."""
        with self._lock:
            nodes = self.client.list("v1", "nodes")
            jobs = self.client.list("batch/v1", "jobs")
            pods = self.client.list("v1", "pods", selector=self.pod_selector)
            self._jobs_by_uid = {job["metadata"]["uid"]: job for job in jobs}
            by_job: dict[str, list[dict[str, Any]]] = {}
            for pod in pods:
                owner = next(iter(pod["metadata"].get("ownerReferences") or []), {})
                by_job.setdefault(owner.get("uid", ""), []).append(pod)
            orphans = [pod for uid, group in by_job.items() if uid not in self._jobs_by_uid for pod in group]
            self._guarded("orphans", self.jobs.release, orphans)
            for job in jobs:
                self._guarded(
                    job["metadata"].get("name", "?"), self.jobs.sync, job, by_job.get(job["metadata"]["uid"], [])
                )
            self._schedule(pods, nodes)
            self.kubelets.sync(pods, self._ready_nodes(nodes))
            for node in sorted(self._shutting_down):
                if not [p for p in pods if (p.get("spec") or {}).get("nodeName") == node and not terminal(p)]:
                    self._shutting_down.discard(node)
                    self._guarded(node, self.set_node_ready, node, False)

    def _guarded(self, what: str, action: Any, *args: Any) -> None:
        try:
            action(*args)
        except (urllib.error.URLError, OSError, KeyError, TypeError) as error:  # objects vanish under us
            self.errors.append(f"{what}: {error!r}")

    def start(self, interval: float = 0.1) -> FakeCluster:
        """Run the cluster in a background thread until :meth:`stop`."""

        def loop() -> None:
            while not self._stop.is_set():
                try:
                    self.step()
                except (urllib.error.URLError, OSError, KeyError, TypeError) as error:
                    self.errors.append(repr(error))
                self._stop.wait(interval)

        self._thread = threading.Thread(target=loop, name="fake-cluster", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the loop and every container."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
        self.runtime.stop()

    def _owner_job(self, pod: Mapping[str, Any]) -> dict[str, Any] | None:
        owner = next(iter(pod["metadata"].get("ownerReferences") or []), {})
        return self._jobs_by_uid.get(owner.get("uid", ""))

    # ------------------------------------------------------------------------------------ scheduler

    def _schedule(self, pods: list[dict[str, Any]], nodes: list[dict[str, Any]]) -> None:
        used: dict[str, int] = {}  # GPUs in use per node
        load: dict[str, int] = {}  # pods per node: the emptiest feasible node wins (spreads a gang)
        for pod in pods:
            node = (pod.get("spec") or {}).get("nodeName")
            if node and not terminal(pod):
                used[node] = used.get(node, 0) + _gpus(pod)
                load[node] = load.get(node, 0) + 1
        for pod in pods:
            spec = pod.get("spec") or {}
            if spec.get("nodeName") or pod["metadata"].get("deletionTimestamp") or terminal(pod):
                continue
            fitting, reasons = self._fit(pod, nodes, used)
            if fitting:
                chosen = min(fitting, key=lambda name: (load.get(name, 0), name))
                used[chosen] = used.get(chosen, 0) + _gpus(pod)
                load[chosen] = load.get(chosen, 0) + 1
                self._guarded(pod["metadata"]["name"], self._bind, pod, chosen)
                continue
            counts = ", ".join(f"{n} {why}" for why, n in sorted(reasons.items()))
            message = f"0/{len(nodes)} nodes are available: {counts}."
            unschedulable = condition("PodScheduled", False, "Unschedulable", message)
            current = {c["type"]: c for c in (pod.get("status") or {}).get("conditions") or []}.get("PodScheduled")
            if not current or current.get("message") != message:
                meta = pod["metadata"]
                body = {"status": {"conditions": [unschedulable]}}
                self._guarded(
                    meta["name"], self.client.patch, "v1", "pods", meta["namespace"], meta["name"], body, "status"
                )

    def _fit(
        self, pod: Mapping[str, Any], nodes: list[dict[str, Any]], used: Mapping[str, int]
    ) -> tuple[list[str], dict[str, int]]:
        """The nodes the pod fits on, and why the others do not (the scheduler's reasons, counted)."""
        fitting: list[str] = []
        reasons: dict[str, int] = {}
        wanted = _gpus(pod)
        selector = (pod.get("spec") or {}).get("nodeSelector") or {}
        tolerations = (pod.get("spec") or {}).get("tolerations") or []
        for node in nodes:
            name = node["metadata"]["name"]
            labels = node["metadata"].get("labels") or {}
            taints = [
                t
                for t in (node.get("spec") or {}).get("taints") or []
                if t.get("effect") in ("NoSchedule", "NoExecute")
            ]
            capacity = (node.get("status") or {}).get("allocatable", {}).get(GPU)
            why = None
            if any(labels.get(k) != v for k, v in selector.items()):
                why = "node(s) didn't match Pod's node affinity/selector"
            elif any(not _tolerates(tolerations, taint) for taint in taints):
                why = "node(s) had untolerated taint(s)"
            elif (node.get("spec") or {}).get("unschedulable"):
                why = "node(s) were unschedulable"
            elif wanted and capacity is not None and used.get(name, 0) + wanted > int(capacity):
                why = f"Insufficient {GPU}"
            if why is None:
                fitting.append(name)
            else:
                reasons[why] = reasons.get(why, 0) + 1
        return fitting, reasons

    def _bind(self, pod: Mapping[str, Any], node: str) -> None:
        meta = pod["metadata"]
        self.client.patch("v1", "pods", meta["namespace"], meta["name"], {"spec": {"nodeName": node}})
        conditions = with_condition(
            list((pod.get("status") or {}).get("conditions") or []), condition("PodScheduled", True)
        )
        self.client.patch(
            "v1", "pods", meta["namespace"], meta["name"], {"status": {"conditions": conditions}}, "status"
        )

    # ------------------------------------------------------------------------------------ what tests do

    def job_pods(self, namespace: str, job_name: str) -> list[dict[str, Any]]:
        """The pods of a Job, by completion index."""
        pods = [
            p
            for p in self.client.list("v1", "pods", namespace)
            if any(ref.get("name") == job_name for ref in p["metadata"].get("ownerReferences") or [])
        ]
        return sorted(pods, key=completion_index)

    def end(
        self, namespace: str, job_name: str, index: int, code: int, message: Mapping[str, Any] | str | None = None
    ) -> None:
        """The running container of pod ``index`` exits with ``code`` and ``message`` (scripted runtime)."""
        runtime = self.runtime
        assert isinstance(runtime, ScriptedRuntime), "only scripted containers end on request"
        for pod in self.job_pods(namespace, job_name):
            if completion_index(pod) == index and runtime.end(pod["metadata"]["uid"], Exit.of(code, message)):
                return
        raise AssertionError(f"no running container of pod {index} of Job {namespace}/{job_name}")

    def fail(
        self,
        namespace: str,
        job_name: str,
        *,
        index: int = 0,
        exit_code: int = 20,
        message: Mapping[str, Any] | str | None = None,
    ) -> None:
        """Pod ``index`` fails by itself; the Job's podFailurePolicy then stops the rest of the gang."""
        self.end(namespace, job_name, index, exit_code, message)

    def succeed(self, namespace: str, job_name: str, rank0_message: Mapping[str, Any] | None = None) -> None:
        """Every pod exits 0; rank 0 leaves ``rank0_message``, the others the trainer's plain success."""
        for pod in self.job_pods(namespace, job_name):
            rank = completion_index(pod)
            message = rank0_message if rank == 0 else {"reason": "Succeeded", "message": "done", "exitCode": 0}
            self.end(namespace, job_name, rank, 0, message)

    def evict(self, pod: Mapping[str, Any], *, reason: str = "EvictionByEvictionAPI", grace: int | None = None) -> None:
        """What the API server does for an eviction (and the scheduler for a preemption, the taint manager
        for a lost node): ``DisruptionTarget`` on the pod, then a graceful deletion."""
        meta = pod["metadata"]
        current = self.client.get("v1", "pods", meta["namespace"], meta["name"]) or pod
        message = {
            "EvictionByEvictionAPI": "Eviction API: evicting",
            "PreemptionByKubeScheduler": "Kubernetes Scheduler: preempting to accommodate a higher priority pod",
            "DeletionByTaintManager": "Taint manager: deleting due to NoExecute taint",
            "TerminationByKubelet": "Pod was terminated in response to imminent node shutdown.",
        }.get(reason, reason)
        conditions = with_condition(
            list((current.get("status") or {}).get("conditions") or []),
            condition("DisruptionTarget", True, reason, message),
        )
        self.client.patch(
            "v1", "pods", meta["namespace"], meta["name"], {"status": {"conditions": conditions}}, "status"
        )
        self.client.delete("v1", "pods", meta["namespace"], meta["name"], grace_period_seconds=grace)

    def reclaim_node(self, node: str) -> list[str]:
        """A spot reclaim: graceful node shutdown.  The kubelet marks every pod of the node
        ``DisruptionTarget`` (``TerminationByKubelet``) and stops it (SIGTERM); the pods end ``Failed``
        and the node then goes away (NotReady).  The pods' names."""
        stopped = []
        with self._lock:
            for pod in self.client.list("v1", "pods"):
                meta = pod["metadata"]
                if (pod.get("spec") or {}).get("nodeName") != node or terminal(pod):
                    continue
                disruption = condition(
                    "DisruptionTarget",
                    True,
                    "TerminationByKubelet",
                    "Pod was terminated in response to imminent node shutdown.",
                )
                conditions = with_condition(list((pod.get("status") or {}).get("conditions") or []), disruption)
                body = {"status": {"conditions": conditions}}
                self.client.patch("v1", "pods", meta["namespace"], meta["name"], body, "status")
                self.runtime.signal(meta["uid"], 15)
                stopped.append(meta["name"])
            self._shutting_down.add(node)
        return stopped

    def drain(self, node: str, *, grace: int | None = None) -> list[str]:
        """``kubectl drain``: cordon the node, then evict every pod on it; the evicted pods' names."""
        self.client.patch("v1", "nodes", None, node, {"spec": {"unschedulable": True}})
        evicted = []
        for pod in self.client.list("v1", "pods"):
            if (pod.get("spec") or {}).get("nodeName") == node and not terminal(pod):
                self.evict(pod, grace=grace)
                evicted.append(pod["metadata"]["name"])
        return evicted

    def uncordon(self, node: str) -> None:
        """The node takes pods again."""
        self.client.patch("v1", "nodes", None, node, {"spec": {"unschedulable": None}})

    def kueue_evict(self, namespace: str, job_name: str) -> None:
        """Kueue preempts a workload: it suspends the Job (its pods get SIGTERM)."""
        self.client.patch("batch/v1", "jobs", namespace, job_name, {"spec": {"suspend": True}})

    def kueue_admit(self, namespace: str, job_name: str) -> None:
        """Kueue admits a workload: it lifts the Job's suspension."""
        self.client.patch("batch/v1", "jobs", namespace, job_name, {"spec": {"suspend": False}})


def _gpus(pod: Mapping[str, Any]) -> int:
    total = 0
    for container in (pod.get("spec") or {}).get("containers") or []:
        requests = (container.get("resources") or {}).get("requests") or {}
        total += int(float(str(requests.get(GPU, 0))))
    return total


def _tolerates(tolerations: list[Mapping[str, Any]], taint: Mapping[str, Any]) -> bool:
    for toleration in tolerations:
        if toleration.get("effect") not in (None, taint.get("effect")):
            continue
        if toleration.get("operator") == "Exists" and toleration.get("key") in (None, taint.get("key")):
            return True
        if toleration.get("key") == taint.get("key") and toleration.get("value") == taint.get("value"):
            return True
    return False
