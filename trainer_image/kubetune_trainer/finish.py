"""The end of a successful run: publish the model with ``kubetune-metrics.json``, write the termination message."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch

from kubetune_trainer import publish
from kubetune_trainer.config import spec_hash
from kubetune_trainer.engine import engine_precision
from kubetune_trainer.errors import write_termination
from kubetune_trainer.spec.layout import checkpoint_step_uri, default_output_uri

if TYPE_CHECKING:
    from kubetune_trainer.loop import Trainer


def output_uri(trainer: Trainer) -> str | None:
    """Where the model goes: ``output.uri`` (the operator always resolves it), else the layout's default."""
    spec = trainer.spec
    if spec.output.uri:
        return spec.output.uri
    return default_output_uri(spec.checkpoint.uri) if spec.checkpoint.uri else None


def metrics_document(trainer: Trainer, evaluation: dict[str, Any]) -> dict[str, Any]:
    """The content of ``kubetune-metrics.json``."""
    spec, state, built = trainer.spec, trainer.state, trainer.built
    throughput = trainer.reporter.throughput() | {"wallSeconds": time.time() - trainer.started}
    memory = trainer.session.placement.memory()
    if memory:
        throughput["peakAcceleratorMemoryBytes"] = memory["peak"]
    return {
        "evaluation": evaluation,
        "parameters": {"trainable": built.trainable, "total": built.total},
        "steps": state.step,
        "totalSteps": trainer.total_steps,
        "stoppedEarly": state.stopped_early,
        "throughput": throughput,
        "worldSize": trainer.session.world_size,
        "device": trainer.session.placement.name(),
        "cpuThreadsPerRank": torch.get_num_threads(),
        "precision": engine_precision(trainer.engine),
        "strategy": spec.strategy.type,
        "task": spec.model.task.value,
        "specHash": spec_hash(trainer.job),
        "publishedAs": built.prepared.publish_as,
        "data": trainer.data_report.to_json() if trainer.data_report is not None else None,
    }


def publish_run(trainer: Trainer, evaluation: dict[str, Any]) -> None:
    """Save the model on every rank (collective under ZeRO-3); rank 0 uploads it and writes the termination message."""
    spec, session, state = trainer.spec, trainer.session, trainer.state
    publish_dir = trainer.work_dir / "publish"
    publish.save_local(
        trainer.engine,
        trainer.built.prepared,
        trainer.tokenizer,
        directory=publish_dir,
        rank=session.rank,
        zero_stage=spec.deepspeed.zero_stage,
        merge_adapter=spec.output.merge_adapter,
        source=spec.model.source,
    )
    if session.rank != 0:
        return
    destination = output_uri(trainer)
    publish.write_metrics_file(publish_dir, metrics_document(trainer, evaluation))
    if destination:
        publish.upload(publish_dir, destination, endpoint=spec.checkpoint.endpoint, region=spec.checkpoint.region)
    extra: dict[str, Any] = {"step": state.step, "evaluation": evaluation}
    if trainer.data_report is not None:
        report = trainer.data_report.to_json()
        extra["data"] = {"examples": report["examples"], "dropped": report["dropped"]}
    if destination:
        extra["output"] = {"uri": destination}
    committed = trainer.checkpoints.committed_step
    if committed is not None and spec.checkpoint.uri:
        # The step folder: what status.checkpoint.uri means (spec/status.py).
        extra["checkpoint"] = {"uri": checkpoint_step_uri(spec.checkpoint.uri, committed), "step": committed}
    message = f"trained {state.step} steps; published to {destination}"
    if state.resumed_from is not None:
        extra["resumedFrom"] = state.resumed_from
        message += f"; resumed from step {state.resumed_from}"
    if state.fell_back_from is not None:
        extra["checkpointFallback"] = {"from": state.fell_back_from, "to": state.resumed_from}
        message += f" (step {state.fell_back_from} failed verification)"
    write_termination("Succeeded", message, 0, overwrite=True, **extra)
