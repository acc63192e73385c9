"""Model FLOPs per token by strategy, accelerator peaks, and the MFU the trainer reports."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from kubetune_trainer.device import Placement
from kubetune_trainer.flops import PEAK_BF16_TFLOPS, flops_per_token, peak_tflops, utilization
from kubetune_trainer.metrics import TrainerMetrics
from kubetune_trainer.reporting import Reporter
from kubetune_trainer.session import Session
from kubetune_trainer.spec import PartialConfig, Task
from kubetune_trainer.step import StepStats
from kubetune_trainer.strategies import partial
from kubetune_trainer.strategies.base import StrategyContext


def _gpt2(tiny_backbones: dict[str, Path]) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(tiny_backbones["gpt2"])


def _unique_numel(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields tied weights once


def test_full_fine_tuning_is_six_flops_per_parameter(tiny_backbones: dict[str, Path]) -> None:
    model = _gpt2(tiny_backbones)
    assert flops_per_token(model.named_parameters()) == 6 * _unique_numel(model)


def test_lora_skips_the_frozen_weight_gradients(tiny_backbones: dict[str, Path]) -> None:
    import peft

    model = peft.get_peft_model(_gpt2(tiny_backbones), peft.LoraConfig(r=2, target_modules=["c_attn"]))
    total = _unique_numel(model)
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    named = list(model.named_parameters())
    first = next(i for i, (_, p) in enumerate(named) if p.requires_grad)
    backward = sum(p.numel() for _, p in named[first:])
    assert flops_per_token(model.named_parameters()) == 2 * total + 2 * backward + 2 * lora
    # About 4N on a real model; below it here, where the (frozen, never back-propagated) embeddings are large.
    assert 3 * total < flops_per_token(model.named_parameters()) < 5 * total


def test_partial_backpropagates_only_through_the_top_layers(tiny_backbones: dict[str, Path]) -> None:
    model = _gpt2(tiny_backbones)
    ctx = StrategyContext(task=Task.CAUSAL_LM, backbone_path="", total_steps=1, zero_stage=2)
    partial.apply(model, PartialConfig(trainable_layers=1), ctx)
    total = _unique_numel(model)
    assert 2 * total < flops_per_token(model.named_parameters()) < 5 * total


def test_prompt_tuning_backpropagates_through_the_whole_model(tiny_backbones: dict[str, Path]) -> None:
    import peft

    model = peft.get_peft_model(
        _gpt2(tiny_backbones), peft.PromptTuningConfig(task_type=peft.TaskType.CAUSAL_LM, num_virtual_tokens=4)
    )
    total = _unique_numel(model)
    prompt = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert flops_per_token(model.named_parameters()) == 2 * total + 2 * total + 2 * prompt


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H200", 989.0),
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA L40S", 362.0),
        ("NVIDIA L4", 121.0),
        ("NVIDIA GH200 480GB", 989.0),
        ("Some Future Accelerator", None),
    ],
)
def test_peak_of_known_accelerators(name: str, peak: float | None) -> None:
    assert peak_tflops(name) == peak
    assert peak_tflops(name, override=123.0) == 123.0  # resources.acceleratorPeakTflops wins


def test_the_table_lists_dense_bf16_peaks() -> None:
    assert all(50 < value < 5000 for value in PEAK_BF16_TFLOPS.values())


def test_mfu_is_achieved_model_flops_over_the_peak() -> None:
    # The HF Trainer reference: 52.9k tokens/s of a 1.1 B model on an H200 is 35 % MFU.
    assert utilization(52_900, 6 * 1.1e9, 989.0) == pytest.approx(0.353, abs=1e-3)
    assert utilization(52_900, 6 * 1.1e9, None) is None


def test_reporter_sets_the_mfu_gauge_and_the_run_figures() -> None:
    metrics = TrainerMetrics()
    session = Session(rank=1, world_size=2, local_rank=1, local_world_size=2, placement=Placement(torch.device("cpu")))
    reporter = Reporter(
        metrics=metrics,
        session=session,
        total_steps=10,
        batches_per_epoch=5,
        log_every=1,
        flops_per_token=6e9,
        peak_tflops=1000.0,
    )
    stats = StepStats(
        step=1,
        position=1,
        losses={"total": 1.0, "task": 1.0, "auxiliary": 0.0, "l2sp": 0.0},
        samples=64,
        tokens=200_000,
        nonfinite=False,
        sigterm=False,
        learning_rate=1e-4,
        grad_norm=1.0,
        seconds=2.0,
    )
    reporter.step(stats)
    expected = 200_000 / 2.0 / 2 * 6e9 / 1e15  # per device: 50k tokens/s × 6 GFLOP / 1 PFLOP/s
    assert metrics.model_flops_utilization._value.get() == pytest.approx(expected)
    figures = reporter.throughput()
    assert figures["tokensPerSecond"] == pytest.approx(100_000)
    assert figures["modelFlopsUtilization"] == pytest.approx(expected)


def test_steady_state_of_a_resumed_attempt_leaves_out_its_own_warm_up() -> None:
    # An attempt that resumed at step 60 of 100 warms up again (allocator, compilation, caches): its first
    # steps are slow, and "steadyState" (what benchmarks/gpu_llm.py reports) must not count them.
    session = Session(rank=1, world_size=1, local_rank=1, local_world_size=1, placement=Placement(torch.device("cpu")))
    reporter = Reporter(
        metrics=TrainerMetrics(),
        session=session,
        total_steps=100,
        batches_per_epoch=50,
        log_every=1000,
        flops_per_token=6e9,
        peak_tflops=None,
    )
    for step in range(61, 101):
        seconds = 10.0 if step <= 65 else 1.0  # the attempt's first five steps warm up
        losses = {"total": 1.0, "task": 1.0, "auxiliary": 0.0, "l2sp": 0.0}
        reporter.step(StepStats(step, step, losses, 8, 1000, False, False, 1e-4, 1.0, seconds))
    steady = reporter.throughput()["steadyState"]
    assert steady["afterSteps"] == reporter.warmup_steps
    assert steady["tokensPerSecond"] == pytest.approx(1000.0)
