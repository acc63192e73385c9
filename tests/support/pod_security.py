"""A checker for the Pod Security Standards "baseline" and "restricted" profiles (Kubernetes 1.30 rules).

``restricted_violations(pod_spec)`` returns one line per violated control, naming the container and
field, so a test can show exactly what is wrong.  It follows the controls listed on
https://kubernetes.io/docs/concepts/security/pod-security-standards/ (the policy version "latest").
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

#: Volume types the restricted profile allows.
RESTRICTED_VOLUME_TYPES = frozenset(
    {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret"}
)
#: Capabilities the baseline profile allows to be added.
BASELINE_CAPABILITIES = frozenset(
    {
        "AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD", "NET_BIND_SERVICE",
        "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT",
    }
)  # fmt: skip
SAFE_SYSCTLS = frozenset(
    {
        "kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
        "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
        "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
        "net.ipv4.tcp_keepalive_probes",
    }
)  # fmt: skip
SELINUX_TYPES = frozenset({"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"})
VOLUME_SOURCE_KEYS = frozenset(
    {
        "awsElasticBlockStore", "azureDisk", "azureFile", "cephfs", "cinder", "configMap", "csi", "downwardAPI",
        "emptyDir", "ephemeral", "fc", "flexVolume", "flocker", "gcePersistentDisk", "gitRepo", "glusterfs",
        "hostPath", "image", "iscsi", "nfs", "persistentVolumeClaim", "photonPersistentDisk", "portworxVolume",
        "projected", "quobyte", "rbd", "scaleIO", "secret", "storageos", "vsphereVolume",
    }
)  # fmt: skip


def pod_spec_of(obj: dict[str, Any]) -> dict[str, Any]:
    """The PodSpec inside a Pod, Deployment, Job, StatefulSet, DaemonSet or CronJob object."""
    kind = obj.get("kind")
    if kind == "Pod":
        return obj["spec"]
    if kind == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return obj["spec"]["template"]["spec"]


def _containers(pod: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for field in ("initContainers", "containers", "ephemeralContainers"):
        for container in pod.get(field) or []:
            yield f"{field}[{container.get('name', '?')}]", container


def baseline_violations(pod: dict[str, Any]) -> list[str]:
    """Violations of the baseline profile."""
    problems: list[str] = []
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(field):
            problems.append(f"spec.{field} is true")
    pod_sc = pod.get("securityContext") or {}
    for name, value in _selinux(pod_sc, "spec.securityContext"):
        problems.append(f"{name}: {value}")
    for sysctl in pod_sc.get("sysctls") or []:
        if sysctl.get("name") not in SAFE_SYSCTLS:
            problems.append(f"spec.securityContext.sysctls: {sysctl.get('name')} is not a safe sysctl")
    if (pod_sc.get("seccompProfile") or {}).get("type") == "Unconfined":
        problems.append("spec.securityContext.seccompProfile.type is Unconfined")
    if (pod_sc.get("appArmorProfile") or {}).get("type") == "Unconfined":
        problems.append("spec.securityContext.appArmorProfile.type is Unconfined")
    for volume in pod.get("volumes") or []:
        if "hostPath" in volume:
            problems.append(f"volume {volume.get('name')} is a hostPath")
    for where, container in _containers(pod):
        sc = container.get("securityContext") or {}
        if sc.get("privileged"):
            problems.append(f"{where}.securityContext.privileged is true")
        added = set((sc.get("capabilities") or {}).get("add") or [])
        if added - BASELINE_CAPABILITIES:
            problems.append(f"{where}.securityContext.capabilities.add has {sorted(added - BASELINE_CAPABILITIES)}")
        if sc.get("procMount", "Default") != "Default":
            problems.append(f"{where}.securityContext.procMount is {sc['procMount']}")
        if (sc.get("seccompProfile") or {}).get("type") == "Unconfined":
            problems.append(f"{where}.securityContext.seccompProfile.type is Unconfined")
        if (sc.get("appArmorProfile") or {}).get("type") == "Unconfined":
            problems.append(f"{where}.securityContext.appArmorProfile.type is Unconfined")
        for name, value in _selinux(sc, f"{where}.securityContext"):
            problems.append(f"{name}: {value}")
        for port in container.get("ports") or []:
            if port.get("hostPort"):
                problems.append(f"{where}.ports[{port.get('name', '?')}].hostPort is {port['hostPort']}")
    return problems


def _selinux(sc: dict[str, Any], where: str) -> Iterator[tuple[str, str]]:
    options = sc.get("seLinuxOptions") or {}
    if options.get("type", "") not in SELINUX_TYPES:
        yield f"{where}.seLinuxOptions.type", f"{options['type']} is not allowed"
    for field in ("user", "role"):
        if options.get(field):
            yield f"{where}.seLinuxOptions.{field}", "must not be set"


def restricted_violations(pod: dict[str, Any]) -> list[str]:
    """Violations of the restricted profile (which includes baseline)."""
    problems = baseline_violations(pod)
    pod_sc = pod.get("securityContext") or {}
    for volume in pod.get("volumes") or []:
        kinds = set(volume) & VOLUME_SOURCE_KEYS
        if not kinds <= RESTRICTED_VOLUME_TYPES:
            problems.append(f"volume {volume.get('name')} has type {sorted(kinds - RESTRICTED_VOLUME_TYPES)}")
    if pod_sc.get("runAsUser") == 0:
        problems.append("spec.securityContext.runAsUser is 0")
    pod_non_root = pod_sc.get("runAsNonRoot")
    pod_seccomp = (pod_sc.get("seccompProfile") or {}).get("type")
    for where, container in _containers(pod):
        sc = container.get("securityContext") or {}
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{where}.securityContext.allowPrivilegeEscalation must be false")
        non_root = sc.get("runAsNonRoot", pod_non_root)
        if non_root is not True:
            problems.append(f"{where}: runAsNonRoot must be true (pod or container)")
        if sc.get("runAsUser") == 0:
            problems.append(f"{where}.securityContext.runAsUser is 0")
        seccomp = (sc.get("seccompProfile") or {}).get("type", pod_seccomp)
        if seccomp not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{where}: seccompProfile.type must be RuntimeDefault or Localhost (is {seccomp})")
        capabilities = sc.get("capabilities") or {}
        if "ALL" not in (capabilities.get("drop") or []):
            problems.append(f"{where}.securityContext.capabilities.drop must contain ALL")
        added = set(capabilities.get("add") or [])
        if added - {"NET_BIND_SERVICE"}:
            problems.append(f"{where}.securityContext.capabilities.add may only hold NET_BIND_SERVICE: {sorted(added)}")
    return problems


def read_only_root_violations(pod: dict[str, Any]) -> list[str]:
    """Containers whose root filesystem is writable (not a PSS control; kubetune requires it)."""
    return [
        f"{where}.securityContext.readOnlyRootFilesystem must be true"
        for where, container in _containers(pod)
        if (container.get("securityContext") or {}).get("readOnlyRootFilesystem") is not True
    ]
