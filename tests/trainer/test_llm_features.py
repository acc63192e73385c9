"""The LLM training settings and failure classes: gradient checkpointing, attention kernels,
torch.compile, out-of-memory and non-finite losses."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from kubetune_trainer.errors import InvalidSpec, OutOfMemory
from kubetune_trainer.loop import _out_of_memory_is_permanent
from kubetune_trainer.model import check_attention, load_backbone
from kubetune_trainer.spec import FineTuneJob
from kubetune_trainer.spec.runtime import ExitCode, is_permanent_failure
from tests.support.tiny_models import lm_rows, write_jsonl
from tests.trainer.conftest import job_document, launch, trainer_env, write_job


def _lm_spec(source: Path, train: Path, **training: Any) -> dict[str, Any]:
    return {
        "model": {"source": f"file://{source}", "task": "causal-lm"},
        "dataset": {"train": str(train), "maxLength": 32},
        "strategy": {"type": "full"},
        "training": {
            "maxSteps": 4,
            "learningRate": 1e-2,
            "microBatchSize": 8,
            "precision": "fp32",
            "logEverySteps": 1,
            "seed": 3,
            **training,
        },
        "objective": {"regularization": {"weightDecay": 0.0, "dropout": 0.0}},
    }


def test_gradient_checkpointing_recomputes_without_changing_loss_or_gradients(
    tmp_path: Path, tiny_backbones: dict[str, Path]
) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", lm_rows(8, seed=1))
    ids = torch.randint(5, 60, (4, 16), generator=torch.Generator().manual_seed(2))
    results = []
    for checkpointing in (False, True):
        job = FineTuneJob.from_manifest(
            job_document(_lm_spec(tiny_backbones["gpt2"], train, gradientCheckpointing=checkpointing))
        )
        model = load_backbone(job.spec, tiny_backbones["gpt2"], None).model.train()
        assert model.is_activation_checkpointing == checkpointing
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        results.append((float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (plain_loss, plain_grads), (recomputed_loss, recomputed_grads) = results
    assert recomputed_loss == pytest.approx(plain_loss, abs=1e-6)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(recomputed_grads[name], grad, rtol=1e-5, atol=1e-6)


def test_the_attention_kernel_reaches_the_model(tmp_path: Path, tiny_backbones: dict[str, Path]) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", lm_rows(8, seed=1))
    for kernel in ("eager", "sdpa"):
        job = FineTuneJob.from_manifest(job_document(_lm_spec(tiny_backbones["gpt2"], train, attention=kernel)))
        model = load_backbone(job.spec, tiny_backbones["gpt2"], None).model
        assert model.config._attn_implementation == kernel


def test_flash_attention_is_rejected_where_it_cannot_run() -> None:
    assert check_attention("sdpa") == "sdpa"
    if torch.cuda.is_available() and transformers.utils.import_utils.is_flash_attn_2_available():
        pytest.skip("flash-attn runs here")
    with pytest.raises(InvalidSpec, match=r"training\.attention flash_attention_2") as raised:
        check_attention("flash_attention_2")
    assert raised.value.exit_code == ExitCode.INVALID_SPEC


def test_out_of_memory_is_permanent_and_names_the_settings_that_help(tmp_path: Path) -> None:
    spec = _lm_spec(Path("/models/llama"), tmp_path / "train.jsonl", microBatchSize=16)
    spec["dataset"] |= {"maxLength": 4096, "packing": True}
    job = FineTuneJob.from_manifest(job_document(spec))
    with pytest.raises(OutOfMemory) as raised, _out_of_memory_is_permanent(job.spec):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    error = raised.value
    assert error.reason == "OutOfMemory"
    assert is_permanent_failure(error.exit_code)
    for named in ("training.microBatchSize 16", "dataset.maxLength 4096", "gradientCheckpointing", "zeroStage"):
        assert named in error.message
    with pytest.raises(ValueError, match="not memory"), _out_of_memory_is_permanent(job.spec):
        raise ValueError("not memory")  # anything else passes through untouched


def test_a_non_finite_loss_fails_permanently_before_any_checkpoint_of_it(
    tmp_path: Path, tiny_backbones: dict[str, Path]
) -> None:
    broken = tmp_path / "nan-gpt2"
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_backbones["gpt2"])
    with torch.no_grad():
        model.transformer.ln_f.weight[0] = float("nan")
    model.save_pretrained(broken)
    transformers.AutoTokenizer.from_pretrained(tiny_backbones["gpt2"]).save_pretrained(broken)
    train = write_jsonl(tmp_path / "train.jsonl", lm_rows(32, seed=1))
    spec = _lm_spec(broken, train) | {"checkpoint": {"uri": f"file://{tmp_path / 'ckpt'}", "everySteps": 1}}
    config = write_job(tmp_path / "job.json", spec)
    termination = tmp_path / "termination-log"
    env = trainer_env(KUBETUNE_TERMINATION_LOG=str(termination), KUBETUNE_WORK_DIR=str(tmp_path / "work"))
    result = launch(["-m", "kubetune_trainer", "--config", str(config)], env=env)
    assert result.returncode == ExitCode.NON_FINITE_LOSS, result.stderr[-3000:]
    message = json.loads(termination.read_text())
    assert message["reason"] == "NonFiniteLoss"
    assert message["message"].startswith("loss is not finite at step 1 ")
    assert "training.learningRate" in message["message"]
    assert not (tmp_path / "ckpt" / "checkpoints" / "LATEST").exists()  # NaN weights never became a checkpoint


def test_a_compiled_run_trains_like_the_eager_one(tmp_path: Path, tiny_backbones: dict[str, Path]) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", lm_rows(32, seed=1))
    losses = {}
    for compiled in (False, True):
        directory = tmp_path / ("compiled" if compiled else "eager")
        spec = _lm_spec(tiny_backbones["gpt2"], train, compile=compiled)
        spec["output"] = {"uri": f"file://{directory / 'output'}"}
        config = write_job(directory / "job.json", spec)
        env = trainer_env(
            KUBETUNE_TERMINATION_LOG=str(directory / "termination-log"), KUBETUNE_WORK_DIR=str(directory / "work")
        )
        result = launch(["-m", "kubetune_trainer", "--config", str(config)], env=env, nproc=1)
        assert result.returncode == 0, result.stderr[-3000:]
        losses[compiled] = [float(v) for v in _step_losses(result.stderr)]
    assert len(losses[True]) == 4
    assert losses[True] == pytest.approx(losses[False], rel=1e-4, abs=1e-5)


def _step_losses(log: str) -> list[str]:
    import re

    return re.findall(r"^step \d+/\d+ epoch [0-9.]+ loss ([0-9.]+)", log, re.M)
