"""The GPU-only paths of the step pipeline, run on the CPU: the prefetching feeder and the one-step-late statistics."""

from __future__ import annotations

from pathlib import Path

import torch

from kubetune_trainer.device import Placement
from kubetune_trainer.dsconfig import build_deepspeed_config
from kubetune_trainer.engine import build_model
from kubetune_trainer.feeder import Feeder
from kubetune_trainer.losses import Objective
from kubetune_trainer.session import Session
from kubetune_trainer.step import TrainStep
from tests.support.torch_engine import TorchEngine
from tests.trainer.test_placement import _examples, _feeder, _job

CPU = Placement(torch.device("cpu"))


def _tensors_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_prefetching_feeder_gives_the_same_batches_in_order_and_after_a_jump(
    tiny_backbones: dict[str, Path],
) -> None:
    from kubetune_trainer.model import load_tokenizer
    from tests.support.tiny_models import lm_rows

    job = _job(tiny_backbones["bert"], "masked-lm")
    tokenizer = load_tokenizer(tiny_backbones["bert"], "tiny")
    examples = _examples(job, tokenizer, lm_rows(40, seed=2))
    plain = _feeder(job, tokenizer, examples, CPU)
    ahead = Feeder(plain.items, plain.sampler, plain.batcher, CPU, prefetch=3)
    try:
        positions = [*range(7), 12, 13, 3, 4]  # in order, then a jump forward and one back (a resume)
        for position in positions:
            assert _tensors_equal(ahead.batch(position).tensors(), plain.batch(position).tensors()), position
    finally:
        ahead.close()


def test_statistics_come_one_step_late_in_order_and_all_at_a_boundary(tiny_backbones: dict[str, Path]) -> None:
    from kubetune_trainer.model import load_tokenizer
    from tests.support.tiny_models import lm_rows

    job = _job(tiny_backbones["gpt2"], "causal-lm")
    ds_config = build_deepspeed_config(job.spec, world_size=1, cpu=True, total_steps=5)
    built = build_model(job.spec, tiny_backbones["gpt2"], None, ds_config=ds_config, total_steps=5)
    tokenizer = load_tokenizer(tiny_backbones["gpt2"], "tiny")
    feeder = _feeder(job, tokenizer, _examples(job, tokenizer, lm_rows(32, seed=3)), CPU)
    objective = Objective(job.spec, prefix_positions=0, anchors=None, loss_head=built.loss_head)
    session = Session(rank=0, world_size=1, local_rank=0, local_world_size=1, placement=CPU)
    stepper = TrainStep(TorchEngine(built.model), objective, feeder, session, accumulation=1, lag=1)
    position = stepper.run(1, 0, sigterm=False)
    assert stepper.settle() == []  # step 1 stays unread while nothing follows it
    position = stepper.run(2, position, sigterm=True)
    (first,) = stepper.settle()  # reading step 1 after step 2 was queued
    assert (first.step, first.sigterm) == (1, False)
    (second,) = stepper.settle(all_steps=True)  # an evaluation or checkpoint boundary reads everything
    assert (second.step, second.position, second.sigterm) == (2, 2, True)
    assert first.samples == second.samples == job.spec.training.micro_batch_size
    assert second.tokens > 0
    assert all(value > 0 for name, value in first.losses.items() if name in ("total", "task"))
    assert not first.nonfinite
    assert stepper.settle(all_steps=True) == []
