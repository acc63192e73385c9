"""Shared helpers of the trainer tests: job documents and launching the trainer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable


def trainer_env(**extra: str) -> dict[str, str]:
    """Environment for a trainer launch: our sources on the path, a free metrics port, quiet libraries."""
    env = dict(os.environ)
    # Ours first, then whatever the caller had: a GPU machine's carried packages live on PYTHONPATH.
    inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "operator"), str(REPO / "trainer_image"), str(REPO), *inherited])
    env["KUBETUNE_METRICS_PORT"] = "0"
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["HF_HUB_OFFLINE"] = "1"
    env["PYTHONWARNINGS"] = "ignore"
    env.update(extra)
    return env


def job_document(spec: dict[str, Any], name: str = "t") -> dict[str, Any]:
    """A FineTuneJob document around ``spec``."""
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name}, "spec": spec}


def launch(
    args: list[str], *, env: dict[str, str], nproc: int = 2, timeout: float = 900
) -> subprocess.CompletedProcess[str]:
    """``python -m kubetune_trainer.launch --nproc-per-node N ARGS`` (the pod command, minus rendezvous)."""
    return subprocess.run(
        pod_command(args, nproc), env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO, check=False
    )


def start(args: list[str], *, env: dict[str, str], log: Path, nproc: int = 2) -> subprocess.Popen[bytes]:
    """:func:`launch` in the background, its output in ``log``, in a session of its own (see ``kill_tree``)."""
    with log.open("wb") as out:
        return subprocess.Popen(
            pod_command(args, nproc),
            env=env,
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def pod_command(args: list[str], nproc: int) -> list[str]:
    """The pod command's argv on one node of ``nproc`` processes."""
    return [PYTHON, "-m", "kubetune_trainer.launch", f"--nproc-per-node={nproc}", *args]


def write_job(path: Path, spec: dict[str, Any]) -> Path:
    """Write a job document to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(job_document(spec)))
    return path


@pytest.fixture(scope="session")
def tiny_backbones(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny BERT and GPT-2 checkpoints, saved once per session."""
    from tests.support.tiny_models import tiny_bert, tiny_gpt2

    root = tmp_path_factory.mktemp("backbones")
    return {"bert": tiny_bert(root / "bert"), "gpt2": tiny_gpt2(root / "gpt2")}
