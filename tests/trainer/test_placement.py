"""Device placement: every tensor a training step touches lives on the model's device.

The first GPU run died at the first forward pass because batches never left the
CPU; nothing caught it because CI has no GPU.  These tests put the model on
``torch.device("meta")`` — a device other than the one batches are collated on,
available on any machine — and run the trainer's own feeder, objective, fused
LM loss, L2-SP anchors and training step against it.  A tensor left on the host
anywhere in that path raises "... is not on the expected device meta" (or the
CPU/meta mixing error), which is the H200's "index is on cpu, different from
other tensors on cuda:0" in another form.  ``test_a_batch_left_on_the_host_is_caught``
shows the guard fails on exactly that mistake.

GPT-2 with eager attention is the model: its forward and backward run on meta
end to end (sdpa and BERT's masking read tensor values, which meta cannot).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from kubetune_trainer import data as data_mod
from kubetune_trainer.device import Placement
from kubetune_trainer.dsconfig import build_deepspeed_config
from kubetune_trainer.engine import build_model
from kubetune_trainer.feeder import Batcher, Feeder, batcher_for, eval_batches
from kubetune_trainer.lm_loss import LossHead
from kubetune_trainer.losses import Objective
from kubetune_trainer.model import load_tokenizer
from kubetune_trainer.session import Session
from kubetune_trainer.spec import FineTuneJob
from kubetune_trainer.step import TrainStep
from kubetune_trainer.trainingdata import arrange
from tests.support.tiny_models import lm_rows, sentiment_rows
from tests.support.torch_engine import TorchEngine
from tests.trainer.conftest import job_document

META = Placement(torch.device("meta"))


def _job(source: Path, task: str, **extra: Any) -> FineTuneJob:
    spec: dict[str, Any] = {
        "model": {"source": f"file://{source}", "task": task},
        "dataset": {"train": "train.jsonl", "maxLength": 32},
        "strategy": {"type": "full"},
        "training": {"maxSteps": 4, "microBatchSize": 4, "attention": "eager"},
    }
    if task == "sequence-classification":
        spec["model"]["labels"] = ["negative", "positive"]
    for key, value in extra.items():
        spec[key] = {**spec.get(key, {}), **value}
    return FineTuneJob.from_manifest(job_document(spec))


def _examples(job: FineTuneJob, tokenizer: Any, rows: list[dict[str, Any]]) -> list[data_mod.Example]:
    records = list(enumerate(rows, start=1))
    return data_mod.encode_records(
        records, tokenizer=tokenizer, model=job.spec.model, dataset=job.spec.dataset, display="train.jsonl"
    )


def _feeder(job: FineTuneJob, tokenizer: Any, examples: list[data_mod.Example], placement: Placement) -> Feeder:
    data = arrange(examples, [], packing=job.spec.dataset.packing, max_length=job.spec.dataset.max_length)
    sampler = data_mod.LengthGroupedSampler(
        lengths=data.item_lengths, micro_batch_size=job.spec.training.micro_batch_size, world_size=1, rank=0, seed=1
    )
    return Feeder(data.items, sampler, batcher_for(job.spec, tokenizer, rank=0, flatten_packed=False), placement)


def _devices(tensors: dict[str, Any]) -> dict[str, str]:
    return {name: str(t.device) for name, t in tensors.items() if isinstance(t, torch.Tensor)}


@pytest.mark.parametrize(
    ("backbone", "task", "extra"),
    [
        ("bert", "sequence-classification", {"objective": {"auxiliary": {"type": "mlm", "weight": 0.5}}}),
        ("bert", "masked-lm", {}),
        ("gpt2", "causal-lm", {}),
        ("gpt2", "causal-lm", {"dataset": {"packing": True}}),
    ],
    ids=["classification-with-mlm-auxiliary", "masked-lm", "causal-lm", "causal-lm-packed"],
)
def test_feeder_builds_every_tensor_on_the_rank_device(
    tiny_backbones: dict[str, Path], backbone: str, task: str, extra: dict[str, Any]
) -> None:
    job = _job(tiny_backbones[backbone], task, **extra)
    tokenizer = load_tokenizer(tiny_backbones[backbone], "tiny")
    rows = sentiment_rows(16, seed=3) if task == "sequence-classification" else lm_rows(16, seed=3)
    examples = _examples(job, tokenizer, rows)
    feeder = _feeder(job, tokenizer, examples, META)
    for position in range(feeder.batches_per_epoch + 1):  # across an epoch boundary
        batch = feeder.batch(position)
        devices = _devices(batch.tensors())
        assert devices
        assert set(devices.values()) == {"meta"}, devices
        assert batch.samples > 0  # counted on the host, before the move
        assert batch.tokens > 0
    for _, batch in eval_batches(examples, feeder.batcher, META, micro_batch_size=4, rank=0, world_size=1):
        assert set(_devices(batch.tensors()).values()) == {"meta"}


def test_masks_are_drawn_on_the_host_the_same_for_every_device(tiny_backbones: dict[str, Path]) -> None:
    # Masked-LM masks come from a CPU generator seeded by (seed, position, rank): a run resumed
    # on another device sees the batches an uninterrupted one would.
    job = _job(tiny_backbones["bert"], "masked-lm")
    tokenizer = load_tokenizer(tiny_backbones["bert"], "tiny")
    batcher: Batcher = batcher_for(job.spec, tokenizer, rank=0, flatten_packed=False)
    examples = _examples(job, tokenizer, lm_rows(8, seed=4))
    first, again = batcher.build(examples[:4], 7), batcher.build(examples[:4], 7)
    assert torch.equal(first.inputs["input_ids"], again.inputs["input_ids"])
    assert torch.equal(first.labels, again.labels)
    assert bool((first.labels != data_mod.IGNORE_INDEX).any())  # something was masked
    other = batcher.build(examples[:4], 8)
    assert not torch.equal(first.labels, other.labels)  # another position draws other masks


def _meta_step_parts(
    tiny_backbones: dict[str, Path], strategy: dict[str, Any], objective: dict[str, Any]
) -> tuple[FineTuneJob, Any, Any, Objective, Feeder]:
    job = _job(tiny_backbones["gpt2"], "causal-lm", strategy=strategy, objective=objective)
    ds_config = build_deepspeed_config(job.spec, world_size=1, cpu=True, total_steps=4)
    built = build_model(job.spec, tiny_backbones["gpt2"], None, ds_config=ds_config, total_steps=4)
    assert isinstance(built.loss_head, LossHead)  # the fused LM loss is part of what runs on meta
    model = built.model.to("meta")
    engine = TorchEngine(model, accumulation=2)
    objective_ = Objective(
        job.spec,
        prefix_positions=built.prepared.prefix_positions_in_logits,
        anchors=META.tensors(built.anchors) if built.anchors is not None else None,
        loss_head=built.loss_head,
        extra_loss=built.prepared.extra_loss,
    )
    tokenizer = load_tokenizer(tiny_backbones["gpt2"], "tiny")
    feeder = _feeder(job, tokenizer, _examples(job, tokenizer, lm_rows(16, seed=5)), META)
    return job, built, engine, objective_, feeder


@pytest.mark.parametrize(
    ("strategy", "objective"),
    [
        ({"type": "full"}, {"regularization": {"l2sp": 0.1}}),
        ({"type": "lora", "lora": {"r": 2}}, {"labelSmoothing": 0.1}),
    ],
    ids=["full-l2sp", "lora-label-smoothing"],
)
def test_a_training_step_runs_with_the_model_on_another_device(
    tiny_backbones: dict[str, Path], strategy: dict[str, Any], objective: dict[str, Any]
) -> None:
    _, built, engine, objective_, feeder = _meta_step_parts(tiny_backbones, strategy, objective)
    if built.anchors is not None:
        assert objective_.anchors is not None
        assert {str(a.device) for a in objective_.anchors.values()} == {"meta"}  # moved once, kept there
    session = Session(rank=0, world_size=1, local_rank=0, local_world_size=1, placement=META)
    stepper = TrainStep(engine, objective_, feeder, session, accumulation=2, hook=built.prepared.step_hook)
    position = stepper.run(1, 0, sigterm=False)
    assert position == 2
    (flight,) = stepper._in_flight  # the step's statistics wait on the device, unread
    assert flight.vector.device.type == "meta"
    assert engine.micro_steps == 2


def test_evaluation_forward_runs_on_the_model_device(tiny_backbones: dict[str, Path]) -> None:
    _, _, engine, objective_, feeder = _meta_step_parts(tiny_backbones, {"type": "full"}, {})
    examples = [e for item in feeder.items for e in ([item] if isinstance(item, data_mod.Example) else item)]
    with torch.no_grad():
        for _, batch in eval_batches(examples, feeder.batcher, META, micro_batch_size=4, rank=0, world_size=1):
            output, _ = objective_.run_task(engine, batch, label_smoothing=0.0)
            assert output.loss_sum.device.type == "meta"


def test_a_batch_left_on_the_host_is_caught(tiny_backbones: dict[str, Path]) -> None:
    # The bug of the first GPU run: a batch collated on the host and never moved.
    _, _, engine, objective_, feeder = _meta_step_parts(tiny_backbones, {"type": "full"}, {})
    host_batch = feeder.batcher.build([feeder.items[0], feeder.items[1]], 0)
    assert _devices(host_batch.tensors())["input_ids"] == "cpu"
    with pytest.raises((RuntimeError, NotImplementedError), match=r"(?i)device|meta"):
        objective_.losses(engine, host_batch)
