"""Deterministic names of everything the operator creates for a FineTuneJob.

Children are found again by name, never by a generated one: a reconcile that
runs twice (kopf delivers at least once) finds what the first one created.
"""

from __future__ import annotations

ATTEMPT_SEPARATOR = "-a"


def job_name_for(name: str, attempt: int) -> str:
    """Name of the batch/v1 Job of ``attempt`` (1-based): ``<name>-a<attempt>``."""
    if attempt < 1:
        raise ValueError(f"attempt must be >= 1, got {attempt}")
    return f"{name}{ATTEMPT_SEPARATOR}{attempt}"


def attempt_of(job_name: str, name: str) -> int | None:
    """The attempt number encoded in a Job name of FineTuneJob ``name``, or None."""
    prefix = name + ATTEMPT_SEPARATOR
    if not job_name.startswith(prefix):
        return None
    rest = job_name[len(prefix) :]
    return int(rest) if rest.isdigit() and not rest.startswith("0") else None


def service_name(name: str) -> str:
    """Name of the headless Service giving the pods stable host names."""
    return name


def config_map_name(name: str) -> str:
    """Name of the ConfigMap holding the trainer config (``job.json``)."""
    return f"{name}-config"


def pod_hostname(name: str, attempt: int, index: int) -> str:
    """Host name Kubernetes gives completion ``index`` of an Indexed Job: ``<job>-<index>``."""
    return f"{job_name_for(name, attempt)}-{index}"


def master_address(job_name: str, attempt: int) -> str:
    """Rendezvous host of ``attempt``: pod index 0 through the headless Service
    (``<name>-a<attempt>-0.<service>``, resolvable from every pod of the namespace)."""
    return f"{pod_hostname(job_name, attempt, 0)}.{service_name(job_name)}"
