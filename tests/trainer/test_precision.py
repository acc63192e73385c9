"""Precision on the CPU: the GPU's bf16 code path (``KUBETUNE_CPU_BF16=1``), the guard for half precision
in CI, and half-precision checkpoints trained in fp32.

CI has no GPU, and a CPU run trains in fp32 by default, so nothing there would notice a dtype that
only a bf16 run meets.  Two such bugs were found this way, each of which failed a GPU job before its
first step: ZeRO-3 refused a trainable group mixing bf16 backbone parameters with the fp32 modules a
strategy adds (LoRA/IA3/adapter/prompt with a new head; adapters' fp32 matmul on bf16 activations), and
AdaLoRA's budget update handed DeepSpeed's fp32 gradients to bf16 parameters.

* the GPU suite's matrix (``tests/gpu``, every strategy × task × ZeRO-2/3 and the variants), one rank,
  bf16, checked like the GPU suite checks it;
* the published model's logits in fp32 against the trainer's bf16 ones, allowing for what bf16 does to
  the reload's own logits (a fixed bound failed on another CPU: a sample at a steep point of the model
  moved 5 % under bf16 rounding), and a test that an adapter published without (or with half) its
  update still fails that check;
* the GPU suite's lost-node test (``sigkill.py``: SIGKILL after a checkpoint, then a resume), one rank, bf16;
* a SIGTERM checkpoint in bf16 on 2 ranks, then a resume whose losses equal an uninterrupted run's:
  the fp32 master weights and optimizer state of DeepSpeed's bf16 optimizer round-trip exactly;
* a checkpoint saved in fp16 or bf16 (as most published LLMs are) trains in fp32 with a new head and
  the auxiliary LM head: transformers 5 loads weights in their saved dtype and new heads in fp32, which
  failed at the first matmul until the trainer loaded everything in the training dtype.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from kubetune_trainer.spec.runtime import ENV_CPU_BF16
from tests.support.processes import kill_tree
from tests.support.tiny_models import lm_rows, write_jsonl
from tests.trainer.conftest import launch, start, trainer_env, write_job
from tests.trainer.matrix import (
    ALL_CASES,
    BF16_LOGITS_ATOL,
    Case,
    Matrix,
    build_matrix,
    check_case,
    logits_tolerance,
    reload_published,
)
from tests.trainer.sigkill import sigkill_after_a_checkpoint_then_resume

pytestmark = pytest.mark.e2e

BF16 = {ENV_CPU_BF16: "1"}
STEP_LINE = re.compile(r"^step (\d+)/\d+ epoch \S+ loss (\S+)", re.MULTILINE)


@pytest.fixture(scope="module")
def bf16_matrix(tmp_path_factory: pytest.TempPathFactory, tiny_backbones: dict[str, Path]) -> Matrix:
    return build_matrix(
        tmp_path_factory.mktemp("bf16-matrix"), tiny_backbones, ALL_CASES, nproc=1, precision="bf16", env=BF16
    )


@pytest.mark.parametrize("case", ALL_CASES, ids=[c.id for c in ALL_CASES])
def test_gpu_matrix_case_trains_in_bf16_on_the_cpu(bf16_matrix: Matrix, case: Case) -> None:
    check_case(bf16_matrix, case, logits_atol=BF16_LOGITS_ATOL)
    report = json.loads((bf16_matrix.root / case.id / "output" / "kubetune-metrics.json").read_text())
    assert (report["device"], report["precision"]) == ("cpu", "bf16")


@pytest.mark.parametrize("case_id", ["lora-sequence-classification-zero2", "lora-token-classification-zero2"])
def test_the_bf16_logits_check_still_fails_an_adapter_published_wrong(
    bf16_matrix: Matrix, case_id: str, tmp_path: Path
) -> None:
    # The bf16 check allows for what bf16 arithmetic does to the published model's logits; an
    # adapter published without its trained update (lora_B zero) or at half of it must still fail.
    from safetensors.torch import load_file, save_file

    (entry,) = [e for e in json.loads((bf16_matrix.root / "load.json").read_text()) if e["name"] == case_id]
    tampered = []
    for name, change in (("no-update", lambda t: t * 0), ("half-update", lambda t: t * 0.5)):
        output = tmp_path / name
        shutil.copytree(entry["output"], output)
        adapter = output / "adapter_model.safetensors"
        weights = load_file(adapter)
        assert any("lora_B" in k for k in weights)
        save_file({k: change(t) if "lora_B" in k else t for k, t in weights.items()}, adapter)
        tampered.append(entry | {"name": name, "output": str(output)})
    results = reload_published([entry, *tampered], tmp_path / "load.json")
    assert results[case_id]["bf16_noise"] > 0  # measured for a bf16 run
    assert results[case_id]["max_abs_diff"] < logits_tolerance(results[case_id], BF16_LOGITS_ATOL), results
    for wrong in ("no-update", "half-update"):
        assert results[wrong]["max_abs_diff"] > logits_tolerance(results[wrong], BF16_LOGITS_ATOL), results


def test_without_the_switch_a_cpu_run_falls_back_to_fp32(tmp_path: Path, tiny_backbones: dict[str, Path]) -> None:
    spec = _lm_spec(tmp_path, tiny_backbones, steps=2, checkpoint_every=None)
    result = _run(write_job(tmp_path / "job.json", spec), tmp_path, env={}, nproc=1)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "training.precision is bf16 but this run is on CPU: training in fp32" in result.stderr
    report = json.loads((tmp_path / "output" / "kubetune-metrics.json").read_text())
    assert report["precision"] == "fp32"


def test_sigterm_checkpoint_in_bf16_resumes_to_the_uninterrupted_losses(
    tmp_path: Path, tiny_backbones: dict[str, Path]
) -> None:
    steps = 24
    reference = _run(
        write_job(tmp_path / "a.json", _lm_spec(tmp_path / "a", tiny_backbones, steps=steps, checkpoint_every=None)),
        tmp_path / "a",
        env=BF16,
    )
    assert reference.returncode == 0, reference.stderr[-3000:]
    uninterrupted = _losses(reference.stderr)
    assert sorted(uninterrupted) == list(range(1, steps + 1))

    job = write_job(tmp_path / "b.json", _lm_spec(tmp_path / "b", tiny_backbones, steps=steps, checkpoint_every=1000))
    log = tmp_path / "b1.log"
    first = _start(job, tmp_path / "b", log)
    deadline = time.monotonic() + 600
    try:
        while max(_losses(log.read_text()), default=0) < 5:
            assert first.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no training step within 600 s"
            time.sleep(0.05)
        first.send_signal(signal.SIGTERM)  # what the kubelet sends: finish the step, commit, exit 21
        assert first.wait(timeout=300) == 21, log.read_text()[-3000:]
    finally:
        if first.poll() is None:
            kill_tree(first)
    termination = json.loads((tmp_path / "b" / "termination").read_text())
    committed = int(re.match(r"SIGTERM at step (\d+):", termination["message"]).group(1))  # type: ignore[union-attr]

    resumed = _run(job, tmp_path / "b", env=BF16)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {committed}" in resumed.stderr
    after = _losses(resumed.stderr)
    assert sorted(after) == list(range(committed + 1, steps + 1))
    # Bit-identical: a resume from the bf16 working weights instead of the fp32 master copy, or
    # without the optimizer's moments, changes the losses within a few steps.
    assert after == {s: uninterrupted[s] for s in after}
    report = json.loads((tmp_path / "b" / "output" / "kubetune-metrics.json").read_text())
    assert report["precision"] == "bf16"


def test_sigkill_after_a_checkpoint_resumes_in_bf16(tmp_path: Path, tiny_backbones: dict[str, Path]) -> None:
    # The GPU suite's lost-node test, run here as there (one rank, bf16), so CI runs its code too.
    resumed = sigkill_after_a_checkpoint_then_resume(tmp_path, tiny_backbones["gpt2"], steps=60, every=10, env=BF16)
    assert resumed.termination["reason"] == "Succeeded"
    assert resumed.termination["resumedFrom"] >= resumed.committed >= 10
    assert resumed.termination["step"] == 60
    assert "training in fp32" not in resumed.log + (tmp_path / "first.log").read_text()


@pytest.mark.parametrize(("saved", "strategy"), [("float16", "lora"), ("bfloat16", "full")])
def test_a_half_precision_checkpoint_trains_in_fp32(
    saved: str, strategy: str, tmp_path: Path, tiny_backbones: dict[str, Path]
) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    from tests.support.tiny_models import sentiment_rows

    backbone = tmp_path / "bert-half"
    shutil.copytree(tiny_backbones["bert"], backbone)
    weights = backbone / "model.safetensors"
    save_file({k: v.to(getattr(torch, saved)) for k, v in load_file(str(weights)).items()}, str(weights))
    config = json.loads((backbone / "config.json").read_text())
    (backbone / "config.json").write_text(json.dumps(config | {"dtype": saved}))  # as published half checkpoints say
    spec = {
        "model": {
            "source": f"file://{backbone}",
            "task": "sequence-classification",
            "labels": ["negative", "positive"],
        },
        "dataset": {"train": str(write_jsonl(tmp_path / "train.jsonl", sentiment_rows(64, seed=1))), "maxLength": 32},
        "strategy": {"type": strategy},
        "objective": {"auxiliary": {"type": "mlm", "weight": 0.5}},
        "training": {"maxSteps": 3, "learningRate": 1e-3, "microBatchSize": 8, "precision": "fp32", "logEverySteps": 1},
        "output": {"uri": f"file://{tmp_path / 'output'}"},
    }
    result = _run(write_job(tmp_path / "job.json", spec), tmp_path, env={}, nproc=1)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "output" / "kubetune-metrics.json").read_text())["precision"] == "fp32"
    output = tmp_path / "output"
    published = load_file(str(output / ("adapter_model.safetensors" if strategy == "lora" else "model.safetensors")))
    assert {str(t.dtype) for t in published.values()} == {"torch.float32"}
    assert any("classifier" in name for name in published)


def _lm_spec(root: Path, backbones: dict[str, Path], *, steps: int, checkpoint_every: int | None) -> dict[str, Any]:
    train = write_jsonl(root / "train.jsonl", lm_rows(256, seed=3))
    spec: dict[str, Any] = {
        "model": {"source": f"file://{backbones['gpt2']}", "task": "causal-lm"},
        "dataset": {"train": str(train), "maxLength": 32},
        "strategy": {"type": "full"},
        "objective": {"regularization": {"weightDecay": 0.01}},
        "training": {
            "maxSteps": steps,
            "learningRate": 1e-3,
            "warmupRatio": 0.1,
            "microBatchSize": 4,
            "gradientAccumulationSteps": 2,
            "precision": "bf16",
            "logEverySteps": 1,
            "seed": 5,
        },
        "deepspeed": {"zeroStage": 2},
        "output": {"uri": f"file://{root / 'output'}"},
    }
    if checkpoint_every is not None:
        spec["checkpoint"] = {"uri": f"file://{root / 'ckpt'}", "everySteps": checkpoint_every, "asyncUpload": False}
    return spec


def _env(work: Path, extra: dict[str, str]) -> dict[str, str]:
    return trainer_env(
        KUBETUNE_TERMINATION_LOG=str(work / "termination"), KUBETUNE_WORK_DIR=str(work / "work"), **extra
    )


def _run(job: Path, work: Path, *, env: dict[str, str], nproc: int = 2) -> subprocess.CompletedProcess[str]:
    """The pod command on ``job``; the trainer's log is the result's ``stderr``."""
    return launch(["-m", "kubetune_trainer", "--config", str(job)], env=_env(work, env), nproc=nproc)


def _start(job: Path, work: Path, log: Path) -> subprocess.Popen[bytes]:
    return start(["-m", "kubetune_trainer", "--config", str(job)], env=_env(work, BF16), log=log)


def _losses(text: str) -> dict[int, str]:
    return {int(step): loss for step, loss in STEP_LINE.findall(text)}
