"""`kubetune run`: two local "nodes" train for real, sharing the CPUs; Ctrl-C checkpoints; running again resumes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from kubetune_trainer.cpus import threads_per_rank
from tests.support.tiny_models import sentiment_rows, tiny_bert, write_jsonl

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]


def _job(tmp_path: Path, *, max_steps: int, every: int) -> Path:
    model = tiny_bert(tmp_path / "model")
    train = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(320, seed=1))
    validation = write_jsonl(tmp_path / "validation.jsonl", sentiment_rows(64, seed=2))
    manifest = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "local-resume"},
        "spec": {
            "model": {
                "source": f"file://{model}",
                "task": "sequence-classification",
                "labels": ["negative", "positive"],
            },
            "dataset": {"train": str(train), "validation": str(validation), "maxLength": 32},
            "strategy": {"type": "lora", "lora": {"r": 4, "alpha": 8, "targetModules": ["query", "value"]}},
            "training": {
                "maxSteps": max_steps,
                "learningRate": 5e-3,
                "microBatchSize": 8,
                "precision": "fp32",
                "logEverySteps": 1,
                "evaluation": {"everySteps": max_steps},
            },
            "deepspeed": {"zeroStage": 2},
            "resources": {"nodes": 2, "processesPerNode": 1},
            # Never resume another job's checkpoints: running the same file again is the same job.
            "checkpoint": {"everySteps": every, "keepLast": 2, "resume": "Never"},
        },
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(manifest))
    return path


def _run(job: Path, storage: Path) -> subprocess.Popen[str]:
    # No OMP_NUM_THREADS: as typed at a terminal, the pods' launchers split the machine between them.
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["PYTHONPATH"] = f"{REPO / 'operator'}:{REPO / 'trainer_image'}:{REPO}"
    return subprocess.Popen(
        [sys.executable, "-m", "kubetune_operator.cli", "run", str(job), "--storage", str(storage)],
        cwd=job.parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # As a command typed at a terminal: SIGINT at its default.  A suite started in the background by a
        # non-interactive shell inherits SIGINT ignored, and Python then never raises KeyboardInterrupt.
        preexec_fn=_sigint_default,
    )


def _sigint_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _latest(storage: Path) -> str | None:
    latest = storage / "checkpoints" / "LATEST"
    return latest.read_text().strip() if latest.exists() else None


def _newest_pod_logs(storage: Path) -> str:
    newest = max((storage / ".local").iterdir(), key=lambda p: p.name)  # one timestamped folder per run
    return "\n".join(p.read_text(errors="replace") for p in sorted(newest.glob("*.log")))


@pytest.fixture
def runs() -> Iterator[list[subprocess.Popen[str]]]:
    """Started `kubetune run` processes; any still running at the end are stopped (SIGTERM
    stops their pods like Ctrl-C does)."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.terminate()
            try:
                process.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                process.kill()


def test_ctrl_c_checkpoints_and_running_again_resumes(tmp_path: Path, runs: list[subprocess.Popen[str]]) -> None:
    job = _job(tmp_path, max_steps=60, every=4)
    storage = tmp_path / "runs"
    first = _run(job, storage)
    runs.append(first)
    deadline = time.monotonic() + 600
    while _latest(storage) is None:
        assert first.poll() is None, f"the run ended before its first checkpoint:\n{first.communicate()[0]}"
        assert time.monotonic() < deadline, "no checkpoint committed within 600 s"
        time.sleep(0.5)
    first.send_signal(signal.SIGINT)  # what Ctrl-C delivers to the foreground process
    output, _ = first.communicate(timeout=240)
    assert first.returncode == 130, output
    assert "run the same command again to resume" in output
    interrupted_at = _latest(storage)
    assert interrupted_at is not None
    step = int(interrupted_at.rsplit("-", 1)[-1])
    assert 0 < step < 60, interrupted_at
    manifest = json.loads((storage / "checkpoints" / interrupted_at / "MANIFEST.json").read_text())
    assert manifest["step"] == step

    second = _run(job, storage)
    runs.append(second)
    output, _ = second.communicate(timeout=600)
    assert second.returncode == 0, output
    new_logs = _newest_pod_logs(storage)
    resumed = f"resumed from file://{storage.resolve()}/checkpoints/step-{step:08d} at step {step}"
    assert resumed in new_logs, f"the second run did not resume the interrupted checkpoint:\n{new_logs[-3000:]}"
    assert "another FineTuneJob" not in new_logs  # its own checkpoint, not one another job left there
    for chatter in ("FutureWarning", "before it has started"):  # library notices the user cannot act on
        assert chatter not in new_logs, f"{chatter!r} in the pods' logs:\n{new_logs[-3000:]}"
    assert _latest(storage) == f"step-{60:08d}"
    published = json.loads((storage / "output" / "kubetune-metrics.json").read_text())
    assert "accuracy" in output
    assert "60/60 steps" in output  # the bar's last frame: the last step, whenever the last read was
    # Two local pods x one rank share this machine's CPUs: one share each, not the machine each.
    assert published["cpuThreadsPerRank"] == threads_per_rank(2)

    # Once more, finished: it resumes at the last step and runs none; the bar shows that step, not step 0
    # and a loss of 0 (the gauges of a trainer that has taken no step in this process).
    third = _run(job, storage)
    runs.append(third)
    output, _ = third.communicate(timeout=600)
    assert third.returncode == 0, output
    # (The total shows as "?" when no read of the bar fell between the restore and the exit.)
    assert re.search(r"60/(60|\?) steps loss - ", output), output
