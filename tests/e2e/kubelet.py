"""A test "kubelet + Job controller" that runs the pods of every Job as local processes.

It talks to the Kubernetes API (the kmock emulator) over HTTP only, as a node
agent would: it lists Jobs, creates their pods, starts each pod's container
exactly as specified (command, args, env, ``secretKeyRef``, ConfigMap volume)
with :mod:`kubetune_operator.localpods`, and reports back what happened: pod
phase, container exit codes and termination messages, and the Job's
conditions, following the Job's ``podFailurePolicy`` (any failed container
fails the Job and the other pods are terminated).

Cluster DNS is emulated by mapping every pod host name
``<job>-<index>.<subdomain>[.<ns>.svc[.cluster.local]]`` to 127.0.0.1; each pod's
``metrics`` port is a free local port, written into the pod object it creates so
that ``status.podIP`` plus the pod's ``metrics`` port reach the trainer.
"""

from __future__ import annotations

import base64
import contextlib
import secrets
import signal
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import requests

from kubetune_operator import names
from kubetune_operator.localpods import (
    LocalLayout,
    LocalPod,
    free_port,
    local_base_env,
    materialize_volumes,
    plan_pod,
)
from kubetune_trainer.spec import runtime as rt

MAX_TERMINATION_MESSAGE = 4096


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class RunningJob:
    """One Job whose pods run here."""

    name: str
    uid: str
    pods: dict[int, LocalPod] = field(default_factory=dict)
    pod_names: dict[int, str] = field(default_factory=dict)
    reported: set[int] = field(default_factory=set)
    finished: bool = False
    started: str = field(default_factory=_now)


class ProcessKubelet:
    """Runs every Job of ``namespace`` on this machine until :meth:`stop`."""

    def __init__(
        self,
        api: str,
        namespace: str,
        root: Path,
        *,
        base_env: dict[str, str] | None = None,
        poll_seconds: float = 0.3,
        grace_seconds: float = 60.0,
    ) -> None:
        self.api = api.rstrip("/")
        self.namespace = namespace
        self.root = root
        self.base_env = dict(base_env if base_env is not None else local_base_env(2))
        self.poll_seconds = poll_seconds
        self.grace_seconds = grace_seconds
        self.jobs: dict[str, RunningJob] = {}
        self.events: list[tuple[str, str]] = []  # (job name, what happened), for test diagnostics
        self._session = requests.Session()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="process-kubelet", daemon=True)
        self._lock = threading.Lock()

    # -- API helpers -----------------------------------------------------------------

    def _url(self, group_version: str, resource: str, name: str | None = None, sub: str | None = None) -> str:
        base = f"{self.api}/api/v1" if group_version == "v1" else f"{self.api}/apis/{group_version}"
        url = f"{base}/namespaces/{self.namespace}/{resource}"
        if name:
            url += f"/{name}"
        if sub:
            url += f"/{sub}"
        return url

    def _get(self, group_version: str, resource: str, name: str | None = None) -> dict[str, Any] | None:
        response = self._session.get(self._url(group_version, resource, name), timeout=10)
        if response.status_code == 404:
            return None
        response.raise_for_status()
        return dict(response.json())

    def _patch_status(self, group_version: str, resource: str, name: str, status: dict[str, Any]) -> None:
        headers = {"Content-Type": "application/merge-patch+json"}
        body = {"status": status}
        response = self._session.patch(
            self._url(group_version, resource, name, "status"), json=body, headers=headers, timeout=10
        )
        if response.status_code in (404, 405):
            response = self._session.patch(
                self._url(group_version, resource, name), json=body, headers=headers, timeout=10
            )
        if response.status_code != 404:
            response.raise_for_status()

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> ProcessKubelet:
        """Start following Jobs in a background thread."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop following Jobs and kill whatever still runs."""
        self._stop.set()
        self._thread.join(timeout=30)
        for job in self.jobs.values():
            for pod in job.pods.values():
                pod.signal(signal.SIGKILL)
                with contextlib.suppress(Exception):
                    pod.process.wait(timeout=10)
                pod.close()

    def pod(self, job_name: str, index: int) -> LocalPod:
        """The local process group of one pod (for fault injection)."""
        return self.jobs[job_name].pods[index]

    def wait_for_pod(self, job_name: str, index: int, timeout: float) -> LocalPod:
        """Wait until the pod of ``job_name`` with ``index`` runs here."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.jobs.get(job_name)
            if job is not None and index in job.pods:
                return job.pods[index]
            time.sleep(0.2)
        raise TimeoutError(f"pod {index} of Job {job_name} did not start within {timeout} s")

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._sync()
            except requests.RequestException as exc:  # the emulator may restart in some tests
                self.events.append(("*", f"API error: {exc}"))
            self._stop.wait(self.poll_seconds)

    def _sync(self) -> None:
        listing = self._get("batch/v1", "jobs") or {"items": []}
        present = {item["metadata"]["name"]: item for item in listing.get("items", [])}
        for name, job in list(self.jobs.items()):
            if name not in present or present[name]["metadata"].get("uid") != job.uid:
                self._terminate(job, reason="deleted")
                del self.jobs[name]
        for name, obj in present.items():
            job = self.jobs.get(name)
            if job is None:
                if obj["spec"].get("suspend") or (obj.get("status") or {}).get("conditions"):
                    continue
                self.jobs[name] = job = RunningJob(name, obj["metadata"].get("uid", ""))
                self._start_pods(obj, job)
            elif obj["spec"].get("suspend") and not job.finished:
                self._terminate(job, reason="suspended")
                self._patch_status(
                    "batch/v1",
                    "jobs",
                    name,
                    {"active": 0, "conditions": [self._condition("Suspended", "JobSuspended")]},
                )
                job.finished = True
                continue
            if not job.finished:
                for pod in job.pods.values():
                    if pod.exit_code is None:
                        pod.remember_descendants()
                self._report(obj, job)

    # -- pods ------------------------------------------------------------------------

    def _layout(self, obj: dict[str, Any], job: RunningJob) -> LocalLayout:
        template = obj["spec"]["template"]
        pod_spec = template["spec"]
        subdomain = pod_spec.get("subdomain", "")
        aliases: dict[str, str] = {}
        for index in range(int(obj["spec"].get("completions", 1))):
            host = f"{job.name}-{index}"
            for suffix in (
                "",
                f".{subdomain}",
                f".{subdomain}.{self.namespace}.svc",
                f".{subdomain}.{self.namespace}.svc.cluster.local",
            ):
                aliases[host + suffix] = "127.0.0.1"
        config_maps: dict[str, dict[str, str]] = {}
        secret_data: dict[str, dict[str, str]] = {}
        for volume in pod_spec.get("volumes", []):
            if "configMap" in volume:
                cm = self._get("v1", "configmaps", volume["configMap"]["name"]) or {}
                config_maps[volume["configMap"]["name"]] = dict(cm.get("data") or {})
        for container in pod_spec["containers"]:
            for entry in container.get("env", []):
                ref = (entry.get("valueFrom") or {}).get("secretKeyRef")
                if ref and ref["name"] not in secret_data:
                    secret = self._get("v1", "secrets", ref["name"]) or {}
                    secret_data[ref["name"]] = {
                        key: base64.b64decode(value).decode() for key, value in (secret.get("data") or {}).items()
                    }
        ports = {
            p.get("containerPort")
            for c in pod_spec["containers"]
            for p in c.get("ports", [])
            if p.get("name") != "metrics"
        }
        port_map = {int(rt.RENDEZVOUS_PORT): free_port(), **{int(p): free_port() for p in ports if p}}
        return LocalLayout(
            root=self.root / job.name,
            host_aliases=aliases,
            port_map=port_map,
            secrets=secret_data,
            config_maps=config_maps,
            base_env=self.base_env,
        )

    def _start_pods(self, obj: dict[str, Any], job: RunningJob) -> None:
        layout = self._layout(obj, job)
        template = obj["spec"]["template"]
        pod_spec = template["spec"]
        for index in range(int(obj["spec"].get("completions", 1))):
            launch = plan_pod(pod_spec, job.name, index, layout)
            materialize_volumes(pod_spec, launch, layout)
            pod_name = f"{job.name}-{index}-{secrets.token_hex(3)}"
            self._create_pod_object(obj, template, index, pod_name, launch.metrics_port)
            job.pods[index] = LocalPod(launch, log_path=layout.root / f"{pod_name}.log", cwd=Path.cwd())
            job.pod_names[index] = pod_name
        self._patch_status("batch/v1", "jobs", job.name, {"active": len(job.pods), "startTime": job.started})
        self.events.append((job.name, f"started {len(job.pods)} pod(s)"))

    def _create_pod_object(
        self, obj: dict[str, Any], template: dict[str, Any], index: int, pod_name: str, metrics_port: int
    ) -> None:
        metadata = template.get("metadata") or {}
        labels = {
            **(metadata.get("labels") or {}),
            "batch.kubernetes.io/job-name": obj["metadata"]["name"],
            "job-name": obj["metadata"]["name"],
            names.COMPLETION_INDEX_KEY: str(index),
        }
        spec = {**template["spec"], "hostname": f"{obj['metadata']['name']}-{index}"}
        containers = []
        for container in spec["containers"]:
            ports = [
                {**p, "containerPort": metrics_port} if p.get("name") == "metrics" else p
                for p in container.get("ports", [])
            ]
            containers.append({**container, "ports": ports})
        spec["containers"] = containers
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": pod_name,
                "namespace": self.namespace,
                "labels": labels,
                "annotations": {**(metadata.get("annotations") or {}), names.COMPLETION_INDEX_KEY: str(index)},
                "ownerReferences": [
                    {
                        "apiVersion": "batch/v1",
                        "kind": "Job",
                        "name": obj["metadata"]["name"],
                        "uid": obj["metadata"].get("uid", ""),
                        "controller": True,
                        "blockOwnerDeletion": True,
                    }
                ],
            },
            "spec": spec,
        }
        response = self._session.post(self._url("v1", "pods"), json=pod, timeout=10)
        response.raise_for_status()
        self._patch_status(
            "v1",
            "pods",
            pod_name,
            {
                "phase": "Running",
                "podIP": "127.0.0.1",
                "startTime": _now(),
                "containerStatuses": [
                    {
                        "name": spec["containers"][0]["name"],
                        "ready": True,
                        "restartCount": 0,
                        "state": {"running": {"startedAt": _now()}},
                    }
                ],
            },
        )

    def _report_pod(self, job: RunningJob, index: int, pod: LocalPod, code: int) -> None:
        message = pod.termination_message()[:MAX_TERMINATION_MESSAGE]
        if not message and code != 0:
            message = self._log_tail(job, index)  # terminationMessagePolicy: FallbackToLogsOnError
        exit_code = code if code >= 0 else 128 - code  # killed by signal N -> 128+N, as a container runtime reports
        reason = "Completed" if code == 0 else "Error"
        self._patch_status(
            "v1",
            "pods",
            job.pod_names[index],
            {
                "phase": "Succeeded" if code == 0 else "Failed",
                "containerStatuses": [
                    {
                        "name": "trainer",
                        "ready": False,
                        "restartCount": 0,
                        "state": {
                            "terminated": {
                                "exitCode": exit_code,
                                "reason": reason,
                                "message": message,
                                "finishedAt": _now(),
                            }
                        },
                    }
                ],
            },
        )
        job.reported.add(index)

    def _log_tail(self, job: RunningJob, index: int) -> str:
        path = self.root / job.name / f"{job.pod_names[index]}.log"
        try:
            return path.read_text(errors="replace")[-2048:]
        except FileNotFoundError:
            return ""

    def _condition(self, kind: str, reason: str, message: str = "") -> dict[str, Any]:
        return {
            "type": kind,
            "status": "True",
            "reason": reason,
            "message": message,
            "lastTransitionTime": _now(),
            "lastProbeTime": _now(),
        }

    def _report(self, obj: dict[str, Any], job: RunningJob) -> None:
        failed_index = None
        for index, pod in job.pods.items():
            code = pod.exit_code
            if code is None or index in job.reported:
                continue
            self._report_pod(job, index, pod, code)
            if code != 0 and failed_index is None:
                failed_index = index
        if failed_index is not None:
            # podFailurePolicy FailJob: the Job fails at once; the other pods are terminated.
            self._terminate(job, reason=f"pod {failed_index} failed")
            for index, pod in job.pods.items():
                if index not in job.reported and pod.exit_code is not None:
                    self._report_pod(job, index, pod, pod.exit_code)
            status = {
                "active": 0,
                "failed": len([p for p in job.pods.values() if (p.exit_code or 0) != 0]),
                "conditions": [
                    self._condition("FailureTarget", "PodFailurePolicy", f"pod {failed_index} failed"),
                    self._condition(
                        "Failed", "PodFailurePolicy", f"Container trainer for pod {job.pod_names[failed_index]} failed"
                    ),
                ],
            }
            self._patch_status("batch/v1", "jobs", job.name, status)
            job.finished = True
            self.events.append((job.name, f"failed (pod {failed_index})"))
            return
        if len(job.reported) == len(job.pods) and all(p.exit_code == 0 for p in job.pods.values()):
            status = {
                "active": 0,
                "succeeded": len(job.pods),
                "completedIndexes": f"0-{len(job.pods) - 1}" if len(job.pods) > 1 else "0",
                "completionTime": _now(),
                "conditions": [
                    self._condition("SuccessCriteriaMet", "CompletionsReached"),
                    self._condition("Complete", "CompletionsReached"),
                ],
            }
            self._patch_status("batch/v1", "jobs", job.name, status)
            job.finished = True
            self.events.append((job.name, "complete"))

    def _terminate(self, job: RunningJob, *, reason: str) -> None:
        running = [pod for pod in job.pods.values() if pod.exit_code is None]
        for pod in running:
            pod.signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace_seconds
        for pod in running:
            pod.stop(max(0.1, deadline - time.monotonic()))
        if running:
            self.events.append((job.name, f"terminated {len(running)} pod(s): {reason}"))
