"""Container runtimes of the fake cluster's kubelets: what "running a container" means in a test.

* :class:`ScriptedRuntime` — containers run until the test says how they end; SIGTERM is answered
  the way the trainer answers it (checkpoint, then exit 21 with a ``Preempted`` termination
  message), SIGKILL with 137.  For operator tests.
* :class:`ProcessRuntime` — each container is the pod's real command as a local process group
  (:mod:`kubetune_operator.localpods`: env, ``$(VAR)``, ``secretKeyRef``, ConfigMap volumes, the
  rendezvous host on loopback), so the real launcher and trainer run.  For end-to-end tests.

A runtime is told to start, signal and forget containers by pod uid, and is polled for their
exits; the kubelet (:mod:`tests.support.kubelet`) turns those into pod status.
"""

from __future__ import annotations

import base64
import contextlib
import json
import signal
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from kubetune_operator import names
from kubetune_operator.localpods import LocalLayout, LocalPod, free_port, materialize_volumes, plan_pod
from kubetune_trainer.spec import runtime as rt
from tests.support.kube import Client

MAX_TERMINATION_MESSAGE = 4096
PREEMPTED_MESSAGE = {
    "reason": "Preempted",
    "message": "SIGTERM: checkpoint committed, exiting",
    "exitCode": int(rt.ExitCode.PREEMPTED),
}


@dataclass(frozen=True)
class Exit:
    """How a container ended, as the kubelet reports it."""

    code: int
    message: str = ""  # the termination message (or log tail)
    reason: str | None = None  # Completed | Error | OOMKilled; derived from the code when None

    @property
    def terminated_reason(self) -> str:
        return self.reason or ("Completed" if self.code == 0 else "Error")

    @staticmethod
    def of(code: int, message: Mapping[str, Any] | str | None = None) -> Exit:
        """An exit with a JSON (mapping) or plain-text termination message."""
        text = json.dumps(message) if isinstance(message, Mapping) else (message or "")
        return Exit(code, text)


class Runtime(Protocol):
    """What a kubelet needs from a container runtime."""

    def start(self, pod: Mapping[str, Any], job: Mapping[str, Any] | None) -> str:
        """Start the pod's container; its IP."""

    def signal(self, uid: str, signum: int) -> None:
        """Deliver a signal to the container."""

    def poll(self, uid: str) -> Exit | None:
        """The container's exit, once it ended."""

    def forget(self, uid: str) -> None:
        """The pod is gone: release what it held."""

    def stop(self) -> None:
        """The cluster stops: end every container."""


@dataclass
class _Scripted:
    pod: dict[str, Any]
    exit: Exit | None = None
    on_sigterm: Exit | None = None


class ScriptedRuntime:
    """Containers that run until :meth:`end` says how they end (thread-safe: tests script them)."""

    def __init__(self, on_sigterm: Exit | None = None) -> None:
        self.on_sigterm = on_sigterm or Exit.of(int(rt.ExitCode.PREEMPTED), PREEMPTED_MESSAGE)
        self.containers: dict[str, _Scripted] = {}
        self._lock = threading.Lock()
        self._next_ip = 0

    def start(self, pod: Mapping[str, Any], job: Mapping[str, Any] | None) -> str:
        with self._lock:
            self.containers[pod["metadata"]["uid"]] = _Scripted(dict(pod))
            self._next_ip += 1
            return f"10.1.{self._next_ip // 250}.{self._next_ip % 250 + 1}"

    def end(self, uid: str, outcome: Exit, *, on_sigterm: Exit | None = None) -> bool:
        """Make a running container end with ``outcome`` (or, with ``on_sigterm``, answer a later
        SIGTERM so); False when no such container runs here."""
        with self._lock:
            container = self.containers.get(uid)
            if container is None or container.exit is not None:
                return False
            if on_sigterm is not None:
                container.on_sigterm = on_sigterm
            else:
                container.exit = outcome
            return True

    def signal(self, uid: str, signum: int) -> None:
        with self._lock:
            container = self.containers.get(uid)
            if container is None or container.exit is not None:
                return
            if signum == signal.SIGKILL:
                container.exit = Exit(137, "", "Error")
            elif signum == signal.SIGTERM:
                container.exit = container.on_sigterm or self.on_sigterm

    def poll(self, uid: str) -> Exit | None:
        with self._lock:
            container = self.containers.get(uid)
            return container.exit if container else None

    def forget(self, uid: str) -> None:
        with self._lock:
            self.containers.pop(uid, None)

    def stop(self) -> None:
        with self._lock:
            self.containers.clear()


@dataclass
class _JobLayout:
    layout: LocalLayout
    pods: dict[int, LocalPod] = field(default_factory=dict)


class ProcessRuntime:
    """Each container is the pod's command run as a local process group, exactly as specified."""

    def __init__(self, client: Client, root: Path, base_env: Mapping[str, str]) -> None:
        self.client = client
        self.root = root
        self.base_env = dict(base_env)
        self.layouts: dict[str, _JobLayout] = {}  # Job uid -> its local layout
        self.pods: dict[str, tuple[str, int, LocalPod]] = {}  # pod uid -> (Job name, index, process)
        self.log_paths: dict[str, Path] = {}

    def _layout(self, job: Mapping[str, Any]) -> _JobLayout:
        uid = job["metadata"]["uid"]
        if uid not in self.layouts:
            self.layouts[uid] = _JobLayout(self._new_layout(job))
        return self.layouts[uid]

    def _new_layout(self, job: Mapping[str, Any]) -> LocalLayout:
        """Cluster DNS on loopback, the Job's ports on free local ones, its ConfigMaps and Secrets read
        from the API as a kubelet reads them."""
        name, namespace = job["metadata"]["name"], job["metadata"]["namespace"]
        pod_spec = job["spec"]["template"]["spec"]
        subdomain = pod_spec.get("subdomain", "")
        aliases: dict[str, str] = {}
        for index in range(int(job["spec"].get("completions", 1))):
            host = f"{name}-{index}"
            for suffix in (
                "",
                f".{subdomain}",
                f".{subdomain}.{namespace}.svc",
                f".{subdomain}.{namespace}.svc.cluster.local",
            ):
                aliases[host + suffix] = "127.0.0.1"
        config_maps = {
            volume["configMap"]["name"]: dict(
                (self.client.get("v1", "configmaps", namespace, volume["configMap"]["name"]) or {}).get("data") or {}
            )
            for volume in pod_spec.get("volumes", [])
            if "configMap" in volume
        }
        secrets: dict[str, dict[str, str]] = {}
        for container in pod_spec["containers"]:
            for entry in container.get("env", []):
                ref = (entry.get("valueFrom") or {}).get("secretKeyRef")
                if ref and ref["name"] not in secrets:
                    secret = self.client.get("v1", "secrets", namespace, ref["name"]) or {}
                    data = secret.get("data") or {}
                    secrets[ref["name"]] = {key: base64.b64decode(value).decode() for key, value in data.items()}
        ports = {
            p.get("containerPort")
            for c in pod_spec["containers"]
            for p in c.get("ports", [])
            if p.get("name") != "metrics"
        }
        port_map = {int(rt.RENDEZVOUS_PORT): free_port(), **{int(p): free_port() for p in ports if p}}
        return LocalLayout(
            root=self.root / name,
            host_aliases=aliases,
            port_map=port_map,
            secrets=secrets,
            config_maps=config_maps,
            base_env=self.base_env,
        )

    def start(self, pod: Mapping[str, Any], job: Mapping[str, Any] | None) -> str:
        assert job is not None, "the process runtime runs Job pods only"
        entry = self._layout(job)
        index = int(pod["metadata"]["labels"][names.COMPLETION_INDEX_KEY])
        pod_spec = job["spec"]["template"]["spec"]
        launch = plan_pod(pod_spec, job["metadata"]["name"], index, entry.layout)
        materialize_volumes(pod_spec, launch, entry.layout)
        log = entry.layout.root / f"{pod['metadata']['name']}.log"
        process = LocalPod(launch, log_path=log, cwd=Path.cwd())
        entry.pods[index] = process
        self.pods[pod["metadata"]["uid"]] = (job["metadata"]["name"], index, process)
        self.log_paths[pod["metadata"]["uid"]] = log
        return "127.0.0.1"

    def pod(self, job_name: str, index: int) -> LocalPod:
        """The process group of one pod (for fault injection)."""
        for name, number, process in self.pods.values():
            if name == job_name and number == index:
                return process
        raise KeyError(f"no pod {index} of Job {job_name} runs here")

    def metrics_url(self, pod: Mapping[str, Any]) -> str | None:
        """Where a pod's trainer serves its metrics on this machine (the operator's metrics-URL hook)."""
        found = self.pods.get(pod["metadata"].get("uid", ""))
        return f"http://127.0.0.1:{found[2].launch.metrics_port}/metrics" if found else None

    def signal(self, uid: str, signum: int) -> None:
        if uid in self.pods:
            self.pods[uid][2].signal(signum)

    def poll(self, uid: str) -> Exit | None:
        if uid not in self.pods:
            return None
        process = self.pods[uid][2]
        process.remember_descendants()
        code = process.exit_code
        if code is None:
            return None
        message = process.termination_message()[:MAX_TERMINATION_MESSAGE]
        if not message and code != 0:  # terminationMessagePolicy: FallbackToLogsOnError
            with contextlib.suppress(FileNotFoundError):
                message = self.log_paths[uid].read_text(errors="replace")[-2048:]
        return Exit(code if code >= 0 else 128 - code, message)  # killed by signal N -> 128+N

    def forget(self, uid: str) -> None:
        found = self.pods.pop(uid, None)
        if found is not None:
            found[2].close()

    def stop(self) -> None:
        for _name, _index, process in self.pods.values():
            process.signal(signal.SIGKILL)
            with contextlib.suppress(Exception):
                process.process.wait(timeout=10)
            process.close()
