"""`kubetune run` on a machine with GPUs gives each local pod its own, as a device plugin gives a node's:
pod i of a job with P GPUs per pod sees the machine's GPUs i·P … i·P+P-1 (``CUDA_VISIBLE_DEVICES``), a pod
that asks for none sees none, and a job that needs more GPUs than the machine has stops before any pod
starts, naming the fields to change. Without GPUs (CI, laptops) the pods inherit the environment as is."""

from __future__ import annotations

import copy
import os
import stat
from pathlib import Path
from typing import Any

import yaml

from kubetune_operator.builders import desired_children
from kubetune_operator.localpods import GPU_VISIBILITY_ENV, LocalLayout, plan_pod, visible_gpus
from kubetune_operator.localrun import RunOptions, localize_job
from kubetune_trainer.spec import FineTuneJob
from tests.unit.test_cli import kubetune

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "examples" / "local" / "demo.yaml"  # 2 nodes, 1 process each, no GPU request
EIGHT_GPU_PODS = ROOT / "examples" / "full-sequence-classification-zero3.yaml"  # 4 nodes x 8 nvidia.com/gpu


def _pods_env(manifest: dict[str, Any], tmp_path: Path, gpus: list[str] | None, **options: Any) -> list[dict[str, str]]:
    """Each local pod's environment, planned from the attempt Job the operator's builders make."""
    job, _ = localize_job(FineTuneJob.model_validate(manifest), RunOptions(storage=tmp_path / "runs", **options))
    _config_map, _service, attempt = desired_children(job, attempt=1)
    layout = LocalLayout(root=tmp_path / "attempt", base_env={"PATH": os.environ["PATH"]}, gpus=gpus)
    pod_spec = attempt["spec"]["template"]["spec"]
    return [plan_pod(pod_spec, "job-a1", index, layout).env for index in range(job.spec.resources.nodes)]


def test_each_pod_sees_its_own_gpus(tmp_path: Path) -> None:
    manifest = yaml.safe_load(EIGHT_GPU_PODS.read_text())
    machine = [str(i) for i in range(8)]
    envs = _pods_env(manifest, tmp_path, machine, nodes=2, processes_per_node=4)
    assert [env[GPU_VISIBILITY_ENV] for env in envs] == ["0,1,2,3", "4,5,6,7"]
    # The machine's own list (a user's CUDA_VISIBLE_DEVICES, GPU UUIDs) is what is handed out.
    envs = _pods_env(manifest, tmp_path, ["GPU-aa", "GPU-bb", "5"], nodes=3, processes_per_node=1)
    assert [env[GPU_VISIBILITY_ENV] for env in envs] == ["GPU-aa", "GPU-bb", "5"]


def test_a_pod_that_asks_for_no_gpu_sees_none_and_without_gpus_nothing_changes(tmp_path: Path) -> None:
    manifest = yaml.safe_load(DEMO.read_text())
    # Two pods' local rank 0 on one GPU is what NCCL refuses as a duplicate GPU; in a cluster they
    # would see no GPU at all, and so they do here.
    assert [env[GPU_VISIBILITY_ENV] for env in _pods_env(manifest, tmp_path, ["0", "1"])] == ["", ""]
    assert all(GPU_VISIBILITY_ENV not in env for env in _pods_env(manifest, tmp_path, None))
    gpu_job = yaml.safe_load(EIGHT_GPU_PODS.read_text())
    assert all(GPU_VISIBILITY_ENV not in env for env in _pods_env(gpu_job, tmp_path, None, nodes=2))


def test_the_visible_gpus_are_the_users_list_else_the_drivers(tmp_path: Path) -> None:
    assert visible_gpus({GPU_VISIBILITY_ENV: "GPU-aa, 3"}) == ["GPU-aa", "3"]
    assert visible_gpus({GPU_VISIBILITY_ENV: ""}) is None  # every GPU hidden: the pods train on the CPUs
    assert visible_gpus({"PATH": str(tmp_path)}) is None  # no NVIDIA driver
    # nvidia-smi -L lists one "GPU i:" line per GPU (and its MIG instances indented below it).
    smi = tmp_path / "nvidia-smi"
    smi.write_text(
        "#!/bin/sh\n"
        'echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-aa)"\n'
        'echo "  MIG 3g.40gb     Device  0: (UUID: MIG-bb)"\n'
        'echo "GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-cc)"\n'
    )
    smi.chmod(smi.stat().st_mode | stat.S_IXUSR)
    assert visible_gpus({"PATH": str(tmp_path)}) == ["0", "1"]
    smi.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed because it could not communicate with the driver'\nexit 9\n")
    assert visible_gpus({"PATH": str(tmp_path)}) is None


def test_a_job_that_needs_more_gpus_than_the_machine_has_starts_nothing(tmp_path: Path) -> None:
    manifest = copy.deepcopy(yaml.safe_load(EIGHT_GPU_PODS.read_text()))
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(manifest))
    result = kubetune("run", str(job), "--nodes", "2", env={GPU_VISIBILITY_ENV: "0,1,2,3"}, cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "2 node(s) x 8 nvidia.com/gpu = 16 GPUs" in output
    assert "gives 4 (CUDA_VISIBLE_DEVICES=0,1,2,3)" in output
    assert "--processes-per-node" in output
    assert "Traceback" not in output
    assert not (tmp_path / "runs").exists()  # no pod started, no storage written
