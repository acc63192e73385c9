"""The CPUs a pod may use and each rank's share of them (``cpus.py``), and the launcher's default.

The real run's side is asserted where a trainer runs: the strategy matrix (no
``OMP_NUM_THREADS``: the launcher's share), ``kubetune run`` (two local pods split
the machine: ``tests/e2e/test_local_run.py``) and the operator e2e (the pod's
``OMP_NUM_THREADS=1`` wins), through ``cpuThreadsPerRank`` in kubetune-metrics.json.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kubetune_operator.localpods import local_base_env
from kubetune_trainer.cpus import available_cpus, cgroup_cpu_quota, pods_sharing_cpus, threads_per_rank
from kubetune_trainer.launch import _ranks_per_node, default_threads
from kubetune_trainer.spec.runtime import ENV_PODS_SHARING_CPUS


def affinity() -> int:
    return len(os.sched_getaffinity(0))


def cgroup_v2(root: Path, cpu_max: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "cpu.max").write_text(cpu_max + "\n")
    return root


def cgroup_v1(root: Path, quota_us: int, period_us: int = 100_000) -> Path:
    (root / "cpu").mkdir(parents=True, exist_ok=True)
    (root / "cpu" / "cpu.cfs_quota_us").write_text(f"{quota_us}\n")
    (root / "cpu" / "cpu.cfs_period_us").write_text(f"{period_us}\n")
    return root


@pytest.mark.parametrize(
    ("cpu_max", "quota"),
    [("max 100000", None), ("150000 100000", 1.5), ("800000 100000", 8.0), ("50000 100000", 0.5)],
)
def test_a_cgroup_v2_limit_is_the_pods_cpu_limit(tmp_path: Path, cpu_max: str, quota: float | None) -> None:
    assert cgroup_cpu_quota(cgroup_v2(tmp_path, cpu_max)) == quota


def test_a_cgroup_v1_quota_is_read_and_minus_one_means_unlimited(tmp_path: Path) -> None:
    assert cgroup_cpu_quota(cgroup_v1(tmp_path / "limited", 250_000)) == 2.5
    assert cgroup_cpu_quota(cgroup_v1(tmp_path / "unlimited", -1)) is None


def test_no_cgroup_files_means_no_limit(tmp_path: Path) -> None:
    assert cgroup_cpu_quota(tmp_path) is None
    assert available_cpus(tmp_path) == affinity()


def test_the_quota_caps_the_affinity_rounded_down_and_never_below_one(tmp_path: Path) -> None:
    assert available_cpus(cgroup_v2(tmp_path / "a", "50000 100000")) == 1  # half a CPU: still one thread
    assert available_cpus(cgroup_v2(tmp_path / "b", "150000 100000")) == 1  # 1.5 CPUs
    assert available_cpus(cgroup_v2(tmp_path / "c", f"{(affinity() + 64) * 100000} 100000")) == affinity()


@pytest.mark.parametrize(("ranks", "cpus", "threads"), [(1, 16, 16), (2, 16, 8), (3, 16, 5), (8, 2, 1), (0, 4, 4)])
def test_the_ranks_of_a_node_share_its_cpus(ranks: int, cpus: int, threads: int) -> None:
    assert threads_per_rank(ranks, cpus) == threads


@pytest.mark.parametrize(
    ("argv", "ranks"),
    [
        (["--nproc-per-node=2", "-m", "kubetune_trainer", "--config", "job.json"], 2),
        (["--nnodes=2", "--nproc_per_node", "4", "--node-rank=1", "-m", "kubetune_trainer"], 4),
        (["--nproc-per-node=cpu", "-m", "kubetune_trainer"], os.cpu_count()),
        (["--no-such-flag", "-m", "kubetune_trainer"], 1),  # torchrun reports it when it parses the argv
    ],
)
def test_the_launcher_reads_the_ranks_per_node_from_torchruns_argv(argv: list[str], ranks: int) -> None:
    assert _ranks_per_node(argv) == ranks


@pytest.mark.parametrize(("value", "pods"), [(None, 1), ("3", 3), ("0", 1), ("-2", 1), ("two", 1), ("", 1)])
def test_pods_sharing_the_machine_come_from_the_environment(value: str | None, pods: int) -> None:
    environ = {} if value is None else {ENV_PODS_SHARING_CPUS: value}
    assert pods_sharing_cpus(environ) == pods


def test_kubetune_run_pods_split_the_machines_cpus_between_all_their_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    # kubetune run: 3 local pods x 2 ranks on a 12-CPU machine get 2 threads each, not 6 (the launcher
    # of each pod would otherwise give its 2 ranks the whole machine).
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    pod_env = local_base_env(3)
    assert "OMP_NUM_THREADS" not in pod_env  # the launcher decides, from the CPUs this process may use
    argv = ["--nnodes=3", "--nproc-per-node=2", "-m", "kubetune_trainer"]
    assert default_threads(argv, pod_env, cpus=12) == 2
    assert default_threads(argv, {}, cpus=12) == 6  # a cluster pod: the node's CPUs are its alone
    assert default_threads(argv, pod_env) == threads_per_rank(6)  # this machine's affinity and quota
