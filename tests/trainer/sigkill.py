"""A committed checkpoint, then SIGKILL of the whole pod command (a lost node), then a resume.

Shared by the GPU suite (``tests/gpu``) and its bf16-on-the-CPU twin (``test_precision.py``), so CI runs
the very code the GPU machine runs.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune_trainer.spec.layout import step_of
from tests.support.processes import kill_tree
from tests.support.tiny_models import lm_rows, write_jsonl
from tests.trainer.conftest import launch, start, trainer_env, write_job


@dataclass(frozen=True)
class Resumed:
    committed: int  # the step LATEST named when the node was lost
    termination: dict[str, Any]  # the resumed run's termination message
    log: str  # the resumed run's log


def sigkill_after_a_checkpoint_then_resume(
    root: Path, gpt2: Path, *, steps: int, every: int, env: dict[str, str] | None = None
) -> Resumed:
    """Full fine-tuning of ``gpt2`` for ``steps`` (a checkpoint ``every`` steps); SIGKILL the launcher and
    its workers once the first checkpoint is committed; run the same pod command again to the end."""
    train = write_jsonl(root / "train.jsonl", lm_rows(512, seed=1))
    checkpoints = root / "ckpt"
    spec = {
        "model": {"source": f"file://{gpt2}", "task": "causal-lm"},
        "dataset": {"train": str(train), "maxLength": 32},
        "strategy": {"type": "full"},
        "training": {"maxSteps": steps, "learningRate": 1e-3, "microBatchSize": 4, "logEverySteps": 10},
        "checkpoint": {"uri": f"file://{checkpoints}", "everySteps": every, "asyncUpload": False},
    }
    config = write_job(root / "job.json", spec)
    run_env = trainer_env(
        KUBETUNE_TERMINATION_LOG=str(root / "termination"), KUBETUNE_WORK_DIR=str(root / "w"), **(env or {})
    )
    pod = ["-m", "kubetune_trainer", "--config", str(config)]
    first = start(pod, env=run_env, log=root / "first.log", nproc=1)
    latest = checkpoints / "checkpoints" / "LATEST"
    deadline = time.monotonic() + 300
    try:
        while not latest.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert latest.exists(), f"no checkpoint was committed:\n{(root / 'first.log').read_text()[-3000:]}"
    finally:
        kill_tree(first)  # no SIGTERM, no goodbye: the launcher and its workers alike
    committed = step_of(latest.read_text().strip())
    second = launch(pod, env=run_env, nproc=1)
    assert second.returncode == 0, second.stderr[-3000:]
    return Resumed(committed, json.loads((root / "termination").read_text()), second.stderr)
