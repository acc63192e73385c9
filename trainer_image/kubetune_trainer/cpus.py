"""How many CPUs this pod may use, and how many threads each rank gets of them.

``os.cpu_count()`` is the node's count, not the pod's: in a pod limited to 8 CPUs
on a 128-core node, torch's default of one intra-op thread per core makes every
rank run 128 threads on 8 CPUs' worth of quota, and the kernel throttles them
(CFS) for most of each period.  Here the count is the process's CPU affinity
capped by its cgroup's CPU quota (v2 ``cpu.max``, or v1 ``cpu.cfs_quota_us``), and
the ranks of a node split it between them, with the ranks of the job's other pods
when several run on one machine (``kubetune run``).  No torch import: the
tokenizer's worker pool and the launcher use this before any model exists.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

from kubetune_trainer.spec.runtime import ENV_PODS_SHARING_CPUS

CGROUP_ROOT = Path("/sys/fs/cgroup")


def available_cpus(cgroup_root: Path = CGROUP_ROOT) -> int:
    """CPUs this pod may use: its CPU affinity, capped by a cgroup CPU quota (rounded down, at least 1)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_cpu_quota(cgroup_root)
    if quota is not None:
        cores = min(cores, max(1, math.floor(quota)))
    return max(1, cores)


def cgroup_cpu_quota(cgroup_root: Path = CGROUP_ROOT) -> float | None:
    """The cgroup's CPU quota in CPUs (a pod's ``limits.cpu``), or None when unlimited or unreadable."""
    try:
        quota, period = (cgroup_root / "cpu.max").read_text().split()[:2]  # cgroup v2: "max 100000" or "150000 100000"
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        v1 = cgroup_root / "cpu"
        quota_us = int((v1 / "cpu.cfs_quota_us").read_text())  # -1 when unlimited
        period_us = int((v1 / "cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None


def threads_per_rank(ranks: int, cpus: int | None = None) -> int:
    """Intra-op threads for each of the ``ranks`` that share ``cpus`` (default :func:`available_cpus`):
    an equal share, at least one, so the ranks never oversubscribe the pod."""
    return max(1, (available_cpus() if cpus is None else cpus) // max(1, ranks))


def pods_sharing_cpus(environ: Mapping[str, str]) -> int:
    """How many of the job's pods split this machine's CPUs: ``KUBETUNE_PODS_SHARING_CPUS`` (``kubetune
    run`` sets the job's node count), else 1 (a cluster pod's CPUs are its own).  A value that is not a
    positive whole number counts as 1: more threads than a share, never a failed start."""
    try:
        return max(1, int(environ.get(ENV_PODS_SHARING_CPUS, "1")))
    except ValueError:
        return 1


def pod_threads_per_rank(ranks_per_pod: int, environ: Mapping[str, str], cpus: int | None = None) -> int:
    """Threads for each of this pod's ranks when nothing set ``OMP_NUM_THREADS``: ``cpus`` (default
    :func:`available_cpus`) split between its ranks and those of the pods it shares the machine with."""
    return threads_per_rank(max(1, ranks_per_pod) * pods_sharing_cpus(environ), cpus)
