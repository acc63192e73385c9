"""Run tests/checkpoint/train_tiny.py under torchrun and read what it wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.processes import kill_tree
from tests.support.s3 import FAKE_CREDENTIALS, S3Endpoint, free_port

REPO = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("train_tiny.py")


@dataclass
class TinyRun:
    """The outcome of one run of the tiny training program."""

    returncode: int
    log: str
    out: Path

    @property
    def result(self) -> dict[str, Any]:
        return json.loads((self.out / "result.json").read_text())

    @property
    def losses(self) -> dict[int, float]:
        return {int(k): v for k, v in self.result["losses"].items()}

    def weights(self, which: str = "final") -> dict[str, Any]:
        import torch

        return torch.load(self.out / f"{which}_weights.pt")


def env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a run: our sources on the path, one thread per rank, fake S3 credentials."""
    return {
        **os.environ,
        **FAKE_CREDENTIALS,
        "PYTHONPATH": os.pathsep.join(str(REPO / p) for p in ("operator", "trainer_image", ".")),
        "OMP_NUM_THREADS": "1",
        **(extra or {}),
    }


def command(nproc: int, *, uri: str, endpoint: S3Endpoint | None, work: Path, out: Path, **options: Any) -> list[str]:
    """argv of ``torchrun --nproc-per-node N train_tiny.py ...``; options become ``--flag value``."""
    argv = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        f"--master-port={free_port()}",
        str(SCRIPT),
        f"--uri={uri}",
        f"--work-dir={work}",
        f"--out={out}",
    ]
    if endpoint is not None:
        argv.append(f"--endpoint={endpoint.endpoint}")
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value not in (None, False):
            argv.append(f"{flag}={value}")
    return argv


def run(
    nproc: int,
    *,
    uri: str,
    endpoint: S3Endpoint | None,
    tmp: Path,
    name: str,
    check: bool = True,
    timeout: float = 240,
    extra_env: dict[str, str] | None = None,
    **options: Any,
) -> TinyRun:
    """Run the tiny program to completion; AssertionError with its log when it fails and ``check``."""
    out = tmp / name / "out"
    argv = command(nproc, uri=uri, endpoint=endpoint, work=tmp / name / "work", out=out, **options)
    # A session of its own: on a timeout torchrun and its workers are killed together.
    proc = subprocess.Popen(
        argv, env=env(extra_env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        log, _ = proc.communicate()
        raise AssertionError(f"{name} did not finish in {timeout}s:\n{log[-6000:]}") from None
    (tmp / name).mkdir(parents=True, exist_ok=True)
    (tmp / name / "log.txt").write_text(log)
    if check:
        assert proc.returncode == 0, f"{name} failed with {proc.returncode}:\n{log[-6000:]}"
    return TinyRun(proc.returncode, log, out)


def copy_prefix(endpoint: S3Endpoint, source: str, target: str) -> None:
    """Server-side copy of every object under ``source/`` to ``target/``."""
    client = endpoint.client()
    for key in endpoint.keys(source + "/"):
        client.copy_object(
            Bucket=endpoint.bucket,
            Key=target + key[len(source) :],
            CopySource={"Bucket": endpoint.bucket, "Key": key},
        )
