"""DeepSpeed's just-in-time ops: a build lock left by a killed process no longer hangs every later run.

torch guards each build, and each later load, of an extension with a ``lock`` file; a process killed
while holding it (Ctrl-C or SIGKILL during the first run's build) used to leave the next `kubetune run`,
and CI, spinning on it forever.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kubetune_operator.localpods import free_port
from kubetune_trainer.dsconfig import deep_merge, native_ops
from kubetune_trainer.nativeops import (
    ABANDONED_AFTER_S,
    CPU_ADAM,
    SHARED_MEMORY_COMM,
    abandoned_build_locks,
    extensions_root,
    machine_wide_build_lock,
    open_files,
)
from kubetune_trainer.spec import FineTuneJobSpec
from tests.trainer.conftest import REPO, trainer_env

SHM_OP = "deepspeed_shm_comm"  # ShareMemCommBuilder's build folder

_HOLD_OPEN = "import sys, time; f = open(sys.argv[1], 'a'); print('holding', flush=True); time.sleep(120)"

_BUILD = "from kubetune_trainer.nativeops import *; load_native_ops([SHARED_MEMORY_COMM], print)"

_JOIN = r"""
from kubetune_trainer.session import start_session

session = start_session()
session.barrier()
print(f"rank {session.rank} of {session.world_size} joined", flush=True)
"""


def _lock(root: Path, op: str) -> Path:
    lock = root / "py311_cpu" / op / "lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.touch()
    return lock


def test_a_build_lock_no_live_process_holds_is_abandoned_and_a_held_one_is_not(tmp_path: Path) -> None:
    left_behind = _lock(tmp_path, "cpu_adam")
    in_use = _lock(tmp_path, SHM_OP)
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_OPEN, str(in_use)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "holding"
        assert abandoned_build_locks(tmp_path, open_files()) == [left_behind]
    finally:
        holder.kill()
        holder.wait()
    assert abandoned_build_locks(tmp_path, open_files()) == [left_behind, in_use]  # its holder is gone


def test_without_procfs_only_a_lock_older_than_any_build_is_abandoned(tmp_path: Path) -> None:
    assert open_files(tmp_path) is None  # no <proc>/self/fd: who holds what cannot be read
    old = _lock(tmp_path, "cpu_adam")
    _lock(tmp_path, SHM_OP)  # fresh: perhaps a build under way
    now = time.time()
    os.utime(old, (now - ABANDONED_AFTER_S - 60, now - ABANDONED_AFTER_S - 60))
    assert abandoned_build_locks(tmp_path, None, now=now) == [old]


def test_a_cache_that_cannot_hold_the_lock_loads_without_it(tmp_path: Path) -> None:
    # A read-only cache (its ops prebuilt) must not stop the trainer: DeepSpeed loads without the lock.
    (tmp_path / "a-file").write_text("")
    said: list[str] = []
    with machine_wide_build_lock(tmp_path / "a-file" / "torch_extensions", said.append) as held:
        assert held is False
    assert len(said) == 1
    assert said[0].startswith(f"cannot lock {tmp_path / 'a-file' / 'torch_extensions'} for DeepSpeed's op builds")
    with machine_wide_build_lock(tmp_path / "writable", said.append) as held:
        assert held is True
    assert len(said) == 1


def test_a_job_loads_cpu_adam_only_when_its_optimizer_is_offloaded() -> None:
    base = {
        "model": {"source": "file:///models/bert", "task": "sequence-classification", "labels": ["neg", "pos"]},
        "dataset": {"train": "file:///data/train.jsonl"},
        "strategy": {"type": "full"},
        "training": {"epochs": 1},
    }

    def ops(**sections: object) -> tuple[str, ...]:
        return native_ops(FineTuneJobSpec.model_validate(deep_merge(base, sections)))

    assert ops() == (SHARED_MEMORY_COMM,)
    assert ops(deepspeed={"zeroStage": 3}) == (SHARED_MEMORY_COMM,)
    assert ops(deepspeed={"zeroStage": 2, "offloadOptimizer": "cpu"}) == (SHARED_MEMORY_COMM, CPU_ADAM)
    raw_nvme = {"zero_optimization": {"offload_optimizer": {"device": "nvme", "nvme_path": "/nvme"}}}
    assert ops(deepspeed={"zeroStage": 3, "config": raw_nvme}) == (SHARED_MEMORY_COMM, CPU_ADAM)
    raw_none = {"zero_optimization": {"offload_optimizer": {"device": "none"}}}
    assert ops(deepspeed={"zeroStage": 2, "offloadOptimizer": "cpu", "config": raw_none}) == (SHARED_MEMORY_COMM,)


@pytest.fixture
def extensions_with_a_built_shm_op(tmp_path: Path) -> Path:
    """A private extensions folder holding the machine's built shared-memory op (built first if the
    machine has none yet), so a planted lock touches nothing but this test's copy."""
    build = subprocess.run(
        [sys.executable, "-c", _BUILD],
        env=trainer_env(),
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO,
        check=False,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    built = sorted(extensions_root().glob(f"*/{SHM_OP}"))
    if not built:
        pytest.skip(f"DeepSpeed has no shared-memory op on this machine: nothing under {extensions_root()}")
    root = tmp_path / "torch-extensions"  # as TORCH_EXTENSIONS_DIR: each op's folder right under it
    shutil.copytree(built[0], root / SHM_OP)  # keeps the timestamps: ninja finds it built
    (root / SHM_OP / "lock").unlink(missing_ok=True)
    return root


def test_two_ranks_join_past_a_build_lock_a_killed_run_left(extensions_with_a_built_shm_op: Path) -> None:
    """Without the cleanup both ranks spin on the lock inside ``deepspeed.init_distributed`` forever."""
    root = extensions_with_a_built_shm_op
    lock = root / SHM_OP / "lock"
    lock.touch()  # what a process SIGKILLed while building or loading the op leaves
    port = str(free_port())
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", _JOIN],
            env=trainer_env(
                TORCH_EXTENSIONS_DIR=str(root),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                WORLD_SIZE="2",
                LOCAL_WORLD_SIZE="2",
                OMP_NUM_THREADS="1",
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        for rank in (0, 1)
    ]
    outputs = []
    try:
        for proc in ranks:
            outputs.append(proc.communicate(timeout=300))
    finally:
        for proc in ranks:
            proc.kill()
    for rank, (proc, (out, err)) in enumerate(zip(ranks, outputs, strict=True)):
        assert proc.returncode == 0, err[-3000:]
        assert f"rank {rank} of 2 joined" in out
    removals = [line for _, err in outputs for line in err.splitlines() if "build lock left by a process" in line]
    left_by = "a build lock left by a process that was killed while it built or loaded that op"
    assert removals == [f"kubetune: removed {lock}: {left_by}"]
    assert not lock.exists()
