"""`kubetune run` fails and restarts attempts by the operator's failure policy, not one of its own.

The real trainer runs as local pods.  A permanent failure (a missing dataset: exit 11, InvalidData)
ends the run at once with the operator's Failed message; a retryable one (object storage unreachable:
StorageUnavailable) restarts the gang as attempt 2 after ``backoffSeconds`` and, once ``maxRestarts``
are used, ends it with the operator's BackoffLimitExceeded message.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.s3 import FAKE_CREDENTIALS, free_port
from tests.support.tiny_models import sentiment_rows, tiny_bert, write_jsonl

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]


def _job(tmp_path: Path, name: str, train: str, **run_policy: Any) -> Path:
    manifest = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "model": {
                "source": f"file://{tiny_bert(tmp_path / 'model')}",
                "task": "sequence-classification",
                "labels": ["negative", "positive"],
            },
            "dataset": {"train": train, "maxLength": 32},
            "strategy": {"type": "full"},
            "training": {"maxSteps": 4, "microBatchSize": 8, "precision": "fp32"},
            "deepspeed": {"zeroStage": 0},
            "resources": {"nodes": 1, "processesPerNode": 1},
            "runPolicy": run_policy,
        },
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(manifest))
    return path


def _run(job: Path, storage: Path, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": f"{REPO / 'operator'}:{REPO / 'trainer_image'}:{REPO}",
        "OMP_NUM_THREADS": "1",
        "COLUMNS": "400",  # one line per message, however long
        **(extra_env or {}),
    }
    return subprocess.run(
        [sys.executable, "-m", "kubetune_operator.cli", "run", str(job), "--storage", str(storage)],
        cwd=job.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def test_a_permanent_failure_ends_the_run_with_the_operators_verdict(tmp_path: Path) -> None:
    job = _job(tmp_path, "bad-data", str(tmp_path / "no-such-train.jsonl"), maxRestarts=3, backoffSeconds=0)
    result = _run(job, tmp_path / "runs")
    output = result.stdout + result.stderr
    assert result.returncode == 11, output
    assert (
        "failed (InvalidData): attempt 1 failed permanently (InvalidData): pod bad-data-a1-0 exited with code 11"
        in (" ".join(output.split()))
    ), output
    assert "restarting" not in output
    assert len(list((tmp_path / "runs" / ".local").iterdir())) == 1, "one attempt only"


def test_a_retryable_failure_restarts_the_gang_until_max_restarts(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", sentiment_rows(32, seed=1))
    job = _job(tmp_path, "no-storage", "s3://data/train.jsonl", maxRestarts=1, backoffSeconds=1)
    unreachable = {
        **FAKE_CREDENTIALS,
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",  # nothing listens: connection refused
        "KUBETUNE_STORAGE_RETRY_ATTEMPTS": "1",
    }
    result = _run(job, tmp_path / "runs", unreachable)
    output = " ".join((result.stdout + result.stderr).split())
    assert result.returncode == 20, output
    assert "restarting (RestartScheduled): attempt 1 failed (StorageUnavailable)" in output, output
    assert "(restart 1/1)" in output
    assert "failed (BackoffLimitExceeded): attempt 2 failed (StorageUnavailable) and all 1 restarts are used" in output
    attempts = sorted(p.name for p in (tmp_path / "runs" / ".local").iterdir())
    assert len(attempts) == 2, attempts
    assert attempts[1].endswith(".2"), attempts
    assert (tmp_path / "runs" / ".local" / attempts[1] / "no-storage-a2-0.log").exists()
