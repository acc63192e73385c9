"""Checkpoints through the real trainer: ``python -m kubetune_trainer.launch`` (the pod command), 2 ranks,
ZeRO-2, a tiny BERT, moto S3 on loopback.

* Resume equivalence: run A trains 40 steps uninterrupted; run B is SIGKILLed
  (launcher and workers) after the step-20 checkpoint, around step 25, and
  started again: it resumes at step 20, its losses for steps 21-40 equal A's
  and its published weights equal A's within 1e-6.
* SIGTERM: the step in progress finishes, a checkpoint is committed, the
  launcher exits 21 (PREEMPTED) and the termination message says so.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.checkpoint import tiny
from tests.support.processes import kill_tree
from tests.support.s3 import S3Endpoint, threaded_moto

pytestmark = pytest.mark.e2e

CKPT = "checkpoints"
STEP_LINE = re.compile(r"^step (\d+)/\d+ epoch \S+ loss (\S+)", re.MULTILINE)


def tag(step: int) -> str:
    return f"step-{step:08d}"


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Endpoint]:
    with threaded_moto("kubetune-trainer") as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT (not pre-trained: full fine-tuning needs no meaningful features) and sentiment data."""
    from tests.support.tiny_models import sentiment_rows, tiny_bert, write_jsonl

    root = tmp_path_factory.mktemp("trainer-assets")
    tiny_bert(root / "bert", pretrain_steps=0)
    write_jsonl(root / "train.jsonl", sentiment_rows(320, seed=1))
    return root


def job_file(path: Path, assets: Path, s3: S3Endpoint, prefix: str, *, steps: int, every: int) -> Path:
    spec: dict[str, Any] = {
        "model": {
            "source": f"file://{assets / 'bert'}",
            "task": "sequence-classification",
            "labels": ["negative", "positive"],
        },
        "dataset": {"train": str(assets / "train.jsonl"), "maxLength": 32},
        "strategy": {"type": "full"},
        "training": {
            "maxSteps": steps,
            "learningRate": 1e-3,
            "scheduler": "constant",
            "microBatchSize": 4,
            "precision": "fp32",
            "logEverySteps": 1,
            "seed": 7,
        },
        "deepspeed": {"zeroStage": 2},
        "checkpoint": {
            "uri": s3.uri(prefix),
            "endpoint": s3.endpoint,
            "everySteps": every,
            "keepLast": 3,
            "asyncUpload": True,
        },
        "output": {"uri": s3.uri(f"{prefix}/output")},
    }
    doc = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": prefix}, "spec": spec}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


def trainer_env(tmp: Path) -> dict[str, str]:
    return tiny.env(
        {
            "KUBETUNE_METRICS_PORT": "0",
            "KUBETUNE_WORK_DIR": str(tmp / "work"),
            "KUBETUNE_TERMINATION_LOG": str(tmp / "termination-log"),
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1",
            "PYTHONWARNINGS": "ignore",
        }
    )


def start(job: Path, tmp: Path, log: Path) -> subprocess.Popen[bytes]:
    """The pod command (one node, two ranks) in a session of its own, output to ``log``."""
    argv = [
        sys.executable,
        "-m",
        "kubetune_trainer.launch",
        "--nnodes=1",
        "--nproc-per-node=2",
        "--node-rank=0",
        "--master-addr=127.0.0.1",
        f"--master-port={tiny.free_port()}",
        "-m",
        "kubetune_trainer",
        "--config",
        str(job),
    ]
    with log.open("ab") as out:
        return subprocess.Popen(
            argv, env=trainer_env(tmp), stdout=out, stderr=subprocess.STDOUT, cwd=tiny.REPO, start_new_session=True
        )


def losses(log_text: str) -> dict[int, str]:
    """Step → the loss the trainer printed (4 decimals)."""
    return {int(m.group(1)): m.group(2) for m in STEP_LINE.finditer(log_text)}


def published_weights(s3: S3Endpoint, prefix: str) -> dict[str, Any]:
    from safetensors.torch import load

    return load(s3.read(f"{prefix}/output/model.safetensors"))


def latest(s3: S3Endpoint, prefix: str) -> str | None:
    key = f"{prefix}/{CKPT}/LATEST"
    return s3.read(key).decode().strip() if key in s3.keys(f"{prefix}/{CKPT}/") else None


def wait(proc: subprocess.Popen[bytes], log: Path, timeout: float = 600) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        raise AssertionError(f"trainer did not finish in {timeout}s:\n{log.read_text()[-5000:]}") from None


@pytest.mark.slow
def test_resume_after_sigkill_equals_an_uninterrupted_run(s3: S3Endpoint, assets: Path, tmp_path: Path) -> None:
    log_a = tmp_path / "a.log"
    a = start(job_file(tmp_path / "a.json", assets, s3, "run-a", steps=40, every=10), tmp_path / "a", log_a)
    assert wait(a, log_a) == 0, log_a.read_text()[-5000:]

    job_b = job_file(tmp_path / "b.json", assets, s3, "run-b", steps=40, every=10)
    log_b1 = tmp_path / "b1.log"
    b = start(job_b, tmp_path / "b", log_b1)
    deadline = time.monotonic() + 600
    try:
        # After the step-20 checkpoint is committed, somewhere after step 22 (before step 30's checkpoint).
        while latest(s3, "run-b") != tag(20) or max(losses(log_b1.read_text()), default=0) < 23:
            assert b.poll() is None, f"run B ended early:\n{log_b1.read_text()[-5000:]}"
            assert time.monotonic() < deadline, "run B never committed step 20"
            time.sleep(0.05)
    finally:
        kill_tree(b)
    killed_at = max(losses(log_b1.read_text()))
    assert latest(s3, "run-b") == tag(20), f"killed too late (step {killed_at}): step 30 was committed"

    log_b2 = tmp_path / "b2.log"
    b = start(job_b, tmp_path / "b", log_b2)
    assert wait(b, log_b2) == 0, log_b2.read_text()[-5000:]
    resumed = log_b2.read_text()
    assert f"resumed from {s3.uri('run-b')}/{CKPT}/{tag(20)} at step 20" in resumed
    loss_a, loss_b = losses(log_a.read_text()), losses(resumed)
    assert sorted(loss_b) == list(range(21, 41)), sorted(loss_b)
    assert {s: loss_b[s] for s in range(21, 41)} == {s: loss_a[s] for s in range(21, 41)}
    weights_a, weights_b = published_weights(s3, "run-a"), published_weights(s3, "run-b")
    assert weights_a.keys() == weights_b.keys()
    for name, tensor in weights_a.items():
        assert (tensor - weights_b[name]).abs().max().item() <= 1e-6, name
    assert latest(s3, "run-b") == tag(40)


def test_sigterm_commits_a_checkpoint_and_exits_preempted(s3: S3Endpoint, assets: Path, tmp_path: Path) -> None:
    job = job_file(tmp_path / "job.json", assets, s3, "run-term", steps=500, every=1000)
    log = tmp_path / "term.log"
    proc = start(job, tmp_path, log)
    deadline = time.monotonic() + 600
    while max(losses(log.read_text()), default=0) < 3:
        assert proc.poll() is None, log.read_text()[-5000:]
        assert time.monotonic() < deadline, "no training step within 600 s"
        time.sleep(0.1)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)  # what the kubelet sends to the container's main process
    code = wait(proc, log, timeout=300)
    output = log.read_text()
    assert code == 21, f"exit {code}:\n{output[-5000:]}"
    message = json.loads((tmp_path / "termination-log").read_text())
    assert message["reason"] == "Preempted"
    assert message["exitCode"] == 21
    step = int(re.match(r"SIGTERM at step (\d+):", message["message"]).group(1))  # type: ignore[union-attr]
    assert message["message"] == f"SIGTERM at step {step}: checkpoint {tag(step)} committed"
    assert step >= 3
    assert latest(s3, "run-term") == tag(step)
    manifest = json.loads(s3.read(f"run-term/{CKPT}/{tag(step)}/MANIFEST.json"))
    assert manifest["step"] == step
    assert time.monotonic() - sent < 120  # well inside a default pod grace period… on a loaded 2-core machine
