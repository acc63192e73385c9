"""Run the pods of an attempt's Job as local process groups, exactly as specified.

Shared by ``kubetune run`` and the end-to-end tests' "kubelet": a pod template
from :func:`kubetune_operator.builders.desired_children` becomes one process
group per completion index, with the container's command and env, Kubernetes
``$(VAR)`` expansion, ``fieldRef``/``secretKeyRef`` resolved the way the kubelet
would, volume mount paths mapped to local directories, the rendezvous host
mapped to loopback and the pod's ports mapped to free local ports.

:func:`plan_pod` is pure; :class:`LocalPod` is the side effect (a process group).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from kubetune_operator import names
from kubetune_trainer.spec import GPU_RESOURCE
from kubetune_trainer.spec import runtime as rt

COMPLETION_INDEX_ANNOTATION = names.COMPLETION_INDEX_KEY  # the e2e kubelet sets it on the pods it runs
GPU_VISIBILITY_ENV = "CUDA_VISIBLE_DEVICES"
_VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)|\$\$")


class PodSpecError(ValueError):
    """A pod cannot be run locally as specified (e.g. a Secret it references is not available)."""


def free_port() -> int:
    """A TCP port that is free on loopback right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def local_base_env(pods: int) -> dict[str, str]:
    """The environment local pods inherit: this process's, plus what a shared machine needs.

    The job's ``pods`` share this machine's CPUs: the launcher in each splits the CPUs the
    machine gives this process (its affinity and cgroup quota, not ``os.cpu_count()``) between
    the ranks of all of them, unless ``OMP_NUM_THREADS`` is set.  The image ships DeepSpeed's
    compiled ops; here they are JIT-built once into torch's per-user cache that outlives the
    pods (the pod's ``HOME`` is a fresh scratch directory each time).
    """
    env = dict(os.environ)
    env[rt.ENV_PODS_SHARING_CPUS] = str(max(1, pods))
    # The pod's HOME is per pod; XDG_CACHE_HOME keeps torch's extension cache per user.
    env.setdefault("XDG_CACHE_HOME", str(Path.home() / ".cache"))
    return env


def visible_gpus(env: Mapping[str, str]) -> list[str] | None:
    """The NVIDIA GPUs local pods may be given, as ``CUDA_VISIBLE_DEVICES`` entries: that variable's
    list when it is set (the user's own choice), else one index per GPU ``nvidia-smi -L`` lists; None
    where there is none (no NVIDIA driver, or every GPU hidden): the pods then train on the CPUs."""
    if GPU_VISIBILITY_ENV in env:
        return [entry.strip() for entry in env[GPU_VISIBILITY_ENV].split(",") if entry.strip()] or None
    smi = shutil.which("nvidia-smi", path=env.get("PATH"))
    if smi is None:
        return None
    try:
        listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=60, check=False)  # noqa: S603
    except (OSError, subprocess.TimeoutExpired):
        return None
    if listed.returncode != 0:
        return None
    return [
        str(i) for i, _ in enumerate(line for line in listed.stdout.splitlines() if line.startswith("GPU "))
    ] or None


def container_gpus(container: Mapping[str, Any]) -> int:
    """The GPUs a container asks for (its ``nvidia.com/gpu`` limit, else its request; 0 when neither)."""
    resources = container.get("resources") or {}
    value = (resources.get("limits") or {}).get(GPU_RESOURCE, (resources.get("requests") or {}).get(GPU_RESOURCE))
    return int(float(str(value))) if value is not None else 0


def gpu_shortage(pods: int, gpus_per_pod: int, gpus: list[str] | None) -> str | None:
    """Why ``pods`` pods of ``gpus_per_pod`` GPUs each cannot run on this machine's ``gpus`` (None when
    they fit, or when the machine has no NVIDIA driver and the pods train on its CPUs)."""
    needed = pods * gpus_per_pod
    if gpus is None or needed <= len(gpus):
        return None
    return (
        f"the job needs {pods} node(s) x {gpus_per_pod} {GPU_RESOURCE} = {needed} GPUs, and this machine "
        f"gives {len(gpus)} ({GPU_VISIBILITY_ENV}={','.join(gpus)}): run it with fewer --nodes or "
        "--processes-per-node (one process per GPU)"
    )


def expand_vars(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes ``$(VAR)`` expansion: defined variables are replaced, ``$$`` escapes ``$``,
    undefined references stay as written.  No shell is involved."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env.get(name, match.group(0))

    return _VAR_REF.sub(replace, text)


@dataclass(frozen=True)
class PodLaunch:
    """How to start one pod locally."""

    name: str
    index: int
    argv: list[str]
    env: dict[str, str]
    termination_log: Path
    metrics_port: int


@dataclass
class LocalLayout:
    """Where a pod's volumes, ports and host names go on this machine."""

    root: Path  # per-attempt scratch directory
    host_aliases: dict[str, str] = field(default_factory=dict)  # pod host name -> 127.0.0.1
    port_map: dict[int, int] = field(default_factory=dict)  # container port -> local port (shared ones)
    secrets: dict[str, dict[str, str]] = field(default_factory=dict)  # Secret name -> key -> value
    config_maps: dict[str, dict[str, str]] = field(default_factory=dict)  # ConfigMap name -> data
    base_env: dict[str, str] = field(default_factory=dict)  # inherited (PATH, PYTHONPATH, ...)
    # The machine's GPUs (CUDA_VISIBLE_DEVICES entries) the pods are given from, as a device plugin gives
    # a node's; None where there is no NVIDIA driver (the pods inherit the environment as it is).
    gpus: list[str] | None = None


def _field_ref(path: str, pod_name: str, index: int, annotations: Mapping[str, str]) -> str:
    if path == names.completion_index_field_path():
        return str(index)
    match = re.fullmatch(r"metadata\.annotations\['([^']+)'\]", path)
    if match:
        return annotations.get(match.group(1), "")
    values = {"metadata.name": pod_name, "status.podIP": "127.0.0.1", "spec.nodeName": socket.gethostname()}
    if path in values:
        return values[path]
    raise PodSpecError(f"env fieldRef {path!r} is not supported locally")


def _map_path(value: str, mounts: Mapping[str, Path]) -> str:
    for mount_path, local in sorted(mounts.items(), key=lambda kv: -len(kv[0])):
        if value == mount_path or value.startswith(mount_path.rstrip("/") + "/"):
            return str(local) + value[len(mount_path.rstrip("/")) :]
    return value


def _map_hosts(value: str, aliases: Mapping[str, str]) -> str:
    return aliases.get(value, value)


def plan_pod(pod_spec: Mapping[str, Any], job_name: str, index: int, layout: LocalLayout) -> PodLaunch:
    """The local launch of completion index ``index`` of a Job's pod template (pure apart
    from choosing directories under ``layout.root``, which it does not create)."""
    container = pod_spec["containers"][0]
    pod_name = f"{job_name}-{index}"
    pod_dir = layout.root / f"pod-{index}"
    mounts: dict[str, Path] = {}
    volumes = {v["name"]: v for v in pod_spec.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        mounts[mount["mountPath"]] = pod_dir / "volumes" / mount["name"]
        if mount["name"] not in volumes:
            raise PodSpecError(f"volumeMount {mount['name']!r} names no volume")
    termination_log = pod_dir / "termination-log"
    mounts[container.get("terminationMessagePath", rt.DEFAULT_TERMINATION_LOG)] = termination_log

    ports = {p.get("name"): int(p["containerPort"]) for p in container.get("ports", [])}
    metrics_container_port = ports.get("metrics", rt.DEFAULT_METRICS_PORT)
    # Every pod shares this host, so each gets its own metrics port; the rendezvous
    # port (in layout.port_map) is shared, as index 0 serves it for all.
    metrics_port = free_port()
    pod_ports = {**layout.port_map, metrics_container_port: metrics_port}

    def localize(value: str) -> str:
        if value.startswith("--") and "=" in value:  # --flag=value: localize the value
            flag, _, rest = value.partition("=")
            return f"{flag}={localize(rest)}"
        value = _map_hosts(value, layout.host_aliases)
        if value.isdigit() and int(value) in pod_ports:
            return str(pod_ports[int(value)])
        return _map_path(value, mounts)

    env: dict[str, str] = dict(layout.base_env)
    if layout.gpus is not None:
        # As a device plugin does: each pod sees the GPUs it asks for, its own, and none when it asks for
        # none (two pods' local rank 0 on one device is what NCCL refuses as a duplicate GPU).
        wanted = container_gpus(container)
        given = layout.gpus[index * wanted : (index + 1) * wanted]
        if len(given) < wanted:
            raise PodSpecError(gpu_shortage(index + 1, wanted, layout.gpus) or f"pod {pod_name}: not enough GPUs")
        env[GPU_VISIBILITY_ENV] = ",".join(given)
    for entry in container.get("env", []):
        name = entry["name"]
        if "value" in entry:
            env[name] = localize(expand_vars(str(entry["value"]), env))
            continue
        source = entry.get("valueFrom", {})
        if "fieldRef" in source:
            env[name] = _field_ref(source["fieldRef"]["fieldPath"], pod_name, index, {})
        elif "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            secret = layout.secrets.get(ref["name"], {})
            if ref["key"] in secret:
                env[name] = secret[ref["key"]]
            elif not ref.get("optional", False):
                raise PodSpecError(f"Secret {ref['name']!r} has no key {ref['key']!r} available locally")
        else:
            raise PodSpecError(f"env {name}: only value, fieldRef and secretKeyRef are supported locally")

    words = [*container.get("command", []), *container.get("args", [])]
    argv = [localize(expand_vars(word, env)) for word in words]
    # The image's interpreter is this machine's interpreter (the one kubetune runs in).
    if argv and argv[0] in ("python", "python3"):
        argv = [sys.executable, *argv[1:]]
    elif argv and argv[0] == "torchrun" and shutil.which("torchrun", path=env.get("PATH")) is None:
        argv = [sys.executable, "-m", "torch.distributed.run", *argv[1:]]
    return PodLaunch(pod_name, index, argv, env, termination_log, metrics_port)


def materialize_volumes(pod_spec: Mapping[str, Any], launch: PodLaunch, layout: LocalLayout) -> None:
    """Create the pod's volume directories and fill ConfigMap volumes with their data."""
    pod_dir = launch.termination_log.parent
    for volume in pod_spec.get("volumes", []):
        target = pod_dir / "volumes" / volume["name"]
        target.mkdir(parents=True, exist_ok=True)
        if "configMap" in volume:
            name = volume["configMap"]["name"]
            if name not in layout.config_maps:
                raise PodSpecError(f"ConfigMap {name!r} for volume {volume['name']!r} is not available")
            for key, text in layout.config_maps[name].items():
                (target / key).write_text(text)
    launch.termination_log.parent.mkdir(parents=True, exist_ok=True)
    launch.termination_log.write_text("")


class LocalPod:
    """One running pod: a process group started from a :class:`PodLaunch`."""

    def __init__(self, launch: PodLaunch, *, log_path: Path | None = None, cwd: Path | None = None) -> None:
        self.launch = launch
        self._descendants: list[psutil.Process] = []
        self._terminating = False
        self._log = open(log_path, "ab") if log_path else None  # noqa: SIM115 (closed in wait/close)
        self.process = subprocess.Popen(  # noqa: S603 (argv from our own builder, never a shell)
            launch.argv,
            env=launch.env,
            cwd=cwd,
            stdout=self._log if self._log else None,
            stderr=subprocess.STDOUT if self._log else None,
            start_new_session=True,  # its own process group: signals reach torchrun and every rank
        )

    @property
    def exit_code(self) -> int | None:
        """The exit code once the pod finished (negative: killed by that signal)."""
        return self.process.poll()

    def termination_message(self) -> str:
        """What the trainer wrote to its termination-message file."""
        try:
            return self.launch.termination_log.read_text(errors="replace").strip()
        except FileNotFoundError:
            return ""

    def signal(self, signum: int) -> None:
        """Signal the pod as the kubelet signals a container: SIGTERM goes to the main
        process only (the launcher forwards it to the ranks); SIGKILL ends every process
        the pod started, as a container's cgroup does (torchrun gives its workers their
        own sessions, so a process-group kill would miss them)."""
        if self.process.poll() is not None and signum != signal.SIGKILL:
            return
        if signum != signal.SIGKILL:
            if signum == signal.SIGTERM:
                if self._terminating:
                    return  # the kubelet sends SIGTERM once; a second one would cut the checkpoint short
                self._terminating = True
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signum)
            return
        try:
            tree = [psutil.Process(self.process.pid)]
            tree += tree[0].children(recursive=True)
        except psutil.NoSuchProcess:
            tree = []
        tree += [p for p in self._descendants if p not in tree]
        for process in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()

    def remember_descendants(self) -> None:
        """Note the pod's current processes, so a later SIGKILL also reaches ranks whose
        launcher already died (orphans are re-parented and no longer its children)."""
        with contextlib.suppress(psutil.NoSuchProcess):
            for child in psutil.Process(self.process.pid).children(recursive=True):
                if child not in self._descendants:
                    self._descendants.append(child)

    def stop(self, grace_seconds: float) -> int:
        """SIGTERM, then SIGKILL after the grace period; the exit code."""
        self.signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=grace_seconds)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.process.wait()
        self.close()
        return int(self.process.returncode)

    def close(self) -> None:
        """Release the log file."""
        if self._log is not None:
            self._log.close()
            self._log = None
