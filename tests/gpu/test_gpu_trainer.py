"""The trainer on a CUDA GPU in bf16 (marker ``gpu``; ``make gpu-check``).

* every strategy × every task it supports × ZeRO-2 and ZeRO-3 (where it runs under it), plus the
  objective, merged, packed and gradient-checkpointing variants: the CPU suite's matrix
  (``tests/trainer/matrix.py``), one process on one GPU, bf16 — training succeeds, the loss falls,
  frozen weights stay as they were (in bf16), evaluation runs on the GPU, and the published output
  reloads with plain transformers/peft and reproduces the trainer's logits within bf16 rounding;
* a checkpoint, then SIGKILL, then a resume on the GPU that continues from the committed step
  (``tests/trainer/sigkill.py``, which CI runs in bf16 on the CPU too);
* the versions this suite ran with, for the trainer image's pins (``tests/chart/test_dockerfiles.py``).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from tests.support.tiny_models import lm_rows
from tests.trainer.conftest import REPO
from tests.trainer.matrix import ALL_CASES, BF16_LOGITS_ATOL, Case, Matrix, build_matrix, check_case
from tests.trainer.sigkill import sigkill_after_a_checkpoint_then_resume

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def gpu_matrix(tmp_path_factory: pytest.TempPathFactory, tiny_backbones: dict[str, Path]) -> Matrix:
    return build_matrix(tmp_path_factory.mktemp("gpu-matrix"), tiny_backbones, ALL_CASES, nproc=1, precision="bf16")


@pytest.mark.parametrize("case", ALL_CASES, ids=[c.id for c in ALL_CASES])
def test_strategy_matrix_on_the_gpu(gpu_matrix: Matrix, case: Case) -> None:
    check_case(gpu_matrix, case, logits_atol=BF16_LOGITS_ATOL)
    report = json.loads((gpu_matrix.root / case.id / "output" / "kubetune-metrics.json").read_text())
    assert report["device"].startswith("NVIDIA")  # trained on the GPU, not silently on the CPU
    assert report["throughput"]["peakAcceleratorMemoryBytes"] > 0


def test_sigkill_after_a_checkpoint_resumes_on_the_gpu(tmp_path: Path, tiny_backbones: dict[str, Path]) -> None:
    resumed = sigkill_after_a_checkpoint_then_resume(tmp_path, tiny_backbones["gpt2"], steps=400, every=20)
    assert resumed.termination["reason"] == "Succeeded"
    assert resumed.termination["resumedFrom"] >= resumed.committed
    assert resumed.termination["step"] == 400


def test_record_the_versions_this_suite_ran_with() -> None:
    import deepspeed
    import peft
    import torch
    import transformers

    versions = {
        "torch": torch.__version__.split("+")[0],
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "deepspeed": deepspeed.__version__,
        "gpu": torch.cuda.get_device_name(0),
        "python": sys.version.split()[0],
    }
    out = Path(os.environ.get("KUBETUNE_GPU_VERSIONS", REPO / "tests" / "gpu" / "last-run.json"))
    out.write_text(json.dumps(versions, indent=2) + "\n")
    assert versions["cuda"]


def test_a_training_step_never_waits_for_the_gpu_in_kubetune_code(tiny_backbones: dict[str, Path]) -> None:
    # CUDA's sync debug mode warns at every operation that makes the host wait for the device
    # (.item(), blocking copies, data-dependent shapes); none may come from kubetune's own files.
    import warnings

    import torch

    from kubetune_trainer.device import Placement
    from kubetune_trainer.dsconfig import build_deepspeed_config
    from kubetune_trainer.engine import build_model
    from kubetune_trainer.feeder import Feeder
    from kubetune_trainer.losses import Objective
    from kubetune_trainer.model import load_tokenizer
    from kubetune_trainer.session import Session
    from kubetune_trainer.step import TrainStep
    from tests.support.torch_engine import TorchEngine
    from tests.trainer.test_placement import _examples, _feeder, _job

    gpu = Placement(torch.device("cuda", 0))
    job = _job(tiny_backbones["gpt2"], "causal-lm", objective={"regularization": {"l2sp": 0.1}})
    ds_config = build_deepspeed_config(job.spec, world_size=1, cpu=False, total_steps=8)
    built = build_model(job.spec, tiny_backbones["gpt2"], None, ds_config=ds_config, total_steps=8)
    model = built.model.to(gpu.device)
    tokenizer = load_tokenizer(tiny_backbones["gpt2"], "tiny")
    plain = _feeder(job, tokenizer, _examples(job, tokenizer, lm_rows(64, seed=4)), gpu)
    feeder = Feeder(plain.items, plain.sampler, plain.batcher, gpu, prefetch=2)
    objective = Objective(
        job.spec, prefix_positions=0, anchors=gpu.tensors(built.anchors or {}), loss_head=built.loss_head
    )
    session = Session(rank=0, world_size=1, local_rank=0, local_world_size=1, placement=gpu)
    stepper = TrainStep(TorchEngine(model, accumulation=2), objective, feeder, session, accumulation=2)
    position = stepper.run(1, 0, sigterm=False)  # warm-up: allocations, kernel selection
    stepper.settle(all_steps=True)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for step in range(2, 5):
                position = stepper.run(step, position, sigterm=False)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    ours = [w for w in caught if "synchroniz" in str(w.message) and "kubetune_trainer" in w.filename]
    assert not ours, [(w.filename, w.lineno, str(w.message)[:80]) for w in ours]
    feeder.close()
