"""The fake cluster's kubelets: one agent that plays the kubelet of every Ready node.

For each pod bound to a Ready node it does what a kubelet does, in order:

* a pod being deleted gets SIGTERM once (SIGKILL after its grace period), is reported
  terminal — ``Failed`` with the container's exit code, unless it exited 0 — and then its
  deletion is confirmed (``gracePeriodSeconds: 0``);
* a pod that has not started is checked first: a ``secretKeyRef`` to a missing Secret or key
  leaves it waiting with ``CreateContainerConfigError``; an image the cluster cannot pull, with
  ``ImagePullBackOff`` (messages as the real kubelet words them); otherwise its container starts;
* a running container that ended is reported with its exit code and termination message.

Pods on a NotReady node get none of this: their status freezes and a deletion never finishes,
as with a kubelet that is gone.
"""

from __future__ import annotations

import base64
import datetime
from collections.abc import Callable, Mapping
from typing import Any

from kubetune_operator import names
from tests.support.kube import Client
from tests.support.runtimes import Exit, Runtime

UNPULLABLE = "does-not-exist"  # an image whose reference contains this cannot be pulled


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def stamp(moment: datetime.datetime | None = None) -> str:
    return (moment or now()).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))


def condition(kind: str, status: bool, reason: str = "", message: str = "") -> dict[str, Any]:
    return {
        "type": kind,
        "status": "True" if status else "False",
        "reason": reason,
        "message": message,
        "lastTransitionTime": stamp(),
    }


def with_condition(conditions: list[dict[str, Any]], new: dict[str, Any]) -> list[dict[str, Any]]:
    """``conditions`` with ``new`` replacing the one of its type."""
    return [c for c in conditions if c.get("type") != new["type"]] + [new]


def terminal(pod: Mapping[str, Any]) -> bool:
    return (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed")


class Kubelets:
    """The kubelet of every Ready node, driven by :class:`~tests.support.cluster.FakeCluster`."""

    def __init__(self, client: Client, runtime: Runtime, job_of: Callable[[Mapping[str, Any]], Any]) -> None:
        self.client = client
        self.runtime = runtime
        self.job_of = job_of  # the Job that owns a pod (the process runtime runs its template)
        self.started: set[str] = set()  # pod uids whose container was started
        self.terminating: set[str] = set()  # pod uids that were sent SIGTERM
        self.unpullable = UNPULLABLE
        self.log: list[str] = []  # what the kubelets did, for test diagnostics

    def sync(self, pods: list[dict[str, Any]], ready_nodes: set[str]) -> None:
        """One pass over every pod bound to a Ready node."""
        for pod in pods:
            node = (pod.get("spec") or {}).get("nodeName")
            if not node or node not in ready_nodes:
                continue
            uid = pod["metadata"]["uid"]
            if pod["metadata"].get("deletionTimestamp"):
                self._deleting(pod, uid)
            elif terminal(pod):
                continue
            elif uid not in self.started:
                self._start(pod, uid)
            else:
                ended = self.runtime.poll(uid)
                if ended is not None:
                    self._report(pod, ended)

    def _patch_status(self, pod: Mapping[str, Any], status: Mapping[str, Any]) -> None:
        meta = pod["metadata"]
        self.client.patch("v1", "pods", meta["namespace"], meta["name"], {"status": status}, "status")

    def _deleting(self, pod: dict[str, Any], uid: str) -> None:
        name = pod["metadata"]["name"]
        if uid in self.started and uid not in self.terminating and not terminal(pod):
            self.runtime.signal(uid, 15)
            self.terminating.add(uid)
            self.log.append(f"{stamp()} {name}: SIGTERM (deleted, grace until {pod['metadata']['deletionTimestamp']})")
        ended = self.runtime.poll(uid) if uid in self.started else None
        if uid in self.started and ended is None and now() >= parse(pod["metadata"]["deletionTimestamp"]):
            self.runtime.signal(uid, 9)  # the grace period is over
            self.log.append(f"{stamp()} {name}: SIGKILL (grace period over)")
            ended = self.runtime.poll(uid)
        if uid in self.started and ended is None:
            return
        if not terminal(pod):
            self._report(pod, ended or Exit(137, ""))
        meta = pod["metadata"]
        self.client.delete("v1", "pods", meta["namespace"], meta["name"], grace_period_seconds=0)
        self.log.append(f"{stamp()} {name}: deletion confirmed")
        self.runtime.forget(uid)
        self.started.discard(uid)
        self.terminating.discard(uid)

    def _start(self, pod: dict[str, Any], uid: str) -> None:
        status = pod.get("status") or {}
        problem = self._config_problem(pod) or self._image_problem(pod)
        container = pod["spec"]["containers"][0]
        if problem is not None:
            waiting = {"name": container["name"], "ready": False, "state": {"waiting": problem}}
            if status.get("containerStatuses") != [waiting]:
                self._patch_status(pod, {"phase": "Pending", "containerStatuses": [waiting]})
            return
        ip = self.runtime.start(pod, self.job_of(pod))
        self.started.add(uid)
        self.log.append(f"{stamp()} {pod['metadata']['name']}: started on {pod['spec'].get('nodeName')}")
        conditions = list(status.get("conditions") or [])
        for kind in ("Initialized", "Ready", "ContainersReady"):
            conditions = with_condition(conditions, condition(kind, True))
        running = {
            "name": container["name"],
            "ready": True,
            "restartCount": 0,
            "state": {"running": {"startedAt": stamp()}},
        }
        self._patch_status(
            pod,
            {
                "phase": "Running",
                "podIP": ip,
                "startTime": stamp(),
                "conditions": conditions,
                "containerStatuses": [running],
            },
        )

    def _config_problem(self, pod: Mapping[str, Any]) -> dict[str, str] | None:
        """A ``secretKeyRef`` the kubelet cannot resolve: CreateContainerConfigError, in the kubelet's words."""
        namespace = pod["metadata"]["namespace"]
        for container in pod["spec"]["containers"]:
            for entry in container.get("env") or []:
                ref = (entry.get("valueFrom") or {}).get("secretKeyRef")
                if not ref or ref.get("optional"):
                    continue
                secret = self.client.get("v1", "secrets", namespace, ref["name"])
                if secret is None:
                    message = f'secret "{ref["name"]}" not found'
                elif ref["key"] not in (secret.get("data") or {}) and ref["key"] not in (
                    secret.get("stringData") or {}
                ):
                    message = f"couldn't find key {ref['key']} in Secret {namespace}/{ref['name']}"
                else:
                    continue
                return {"reason": "CreateContainerConfigError", "message": message}
        return None

    def _image_problem(self, pod: Mapping[str, Any]) -> dict[str, str] | None:
        image = str(pod["spec"]["containers"][0].get("image", ""))
        if self.unpullable and self.unpullable in image:
            return {"reason": "ImagePullBackOff", "message": f'Back-off pulling image "{image}"'}
        return None

    def _report(self, pod: Mapping[str, Any], ended: Exit) -> None:
        """The container ended: the pod is terminal, ``Succeeded`` on exit 0 and ``Failed`` otherwise (also
        when it was deleted: the kubelet gives a pod a terminal phase before its deletion completes)."""
        self.log.append(f"{stamp()} {pod['metadata']['name']}: exited {ended.code}")
        container = pod["spec"]["containers"][0]
        terminated = {
            "exitCode": ended.code,
            "reason": ended.terminated_reason,
            "message": ended.message,
            "finishedAt": stamp(),
        }
        status = {
            "phase": "Succeeded" if ended.code == 0 else "Failed",
            "containerStatuses": [
                {"name": container["name"], "ready": False, "restartCount": 0, "state": {"terminated": terminated}}
            ],
        }
        conditions = list((pod.get("status") or {}).get("conditions") or [])
        if conditions:
            status["conditions"] = with_condition(conditions, condition("Ready", False, "PodCompleted"))
        self._patch_status(pod, status)


def secret(namespace: str, name: str, data: Mapping[str, str]) -> dict[str, Any]:
    """A Secret manifest with ``data`` base64-encoded."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace},
        "type": "Opaque",
        "data": {key: base64.b64encode(value.encode()).decode() for key, value in data.items()},
    }


def completion_index(pod: Mapping[str, Any]) -> int:
    return int(pod["metadata"]["labels"][names.COMPLETION_INDEX_KEY])
