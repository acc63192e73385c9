"""The training run of one rank: ``run(job) -> ExitCode`` (DESIGN §4), as a short orchestrator.

Order of events: session (device, distributed) → seeds → metrics endpoint →
backbone → data → DeepSpeed config → model + strategy (under ZeRO-3 inside
``zero.Init``) → engine → restore checkpoint → steps (evaluation,
checkpoints, metrics) → final evaluation → publish → termination message.
Each part lives in its own module: :mod:`session` and :mod:`device`,
:mod:`trainingdata` and :mod:`feeder`, :mod:`engine`, :mod:`losses`,
:mod:`step`, :mod:`evaluator`, :mod:`progress` (checkpoints) and
:mod:`reporting` (metrics).

SIGTERM only sets a flag; it travels in the step's all-reduced statistics, so
every rank sees it after the same step, checkpoints, and exits 21 (PREEMPTED).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune_trainer import data as data_mod
from kubetune_trainer.config import spec_hash
from kubetune_trainer.device import is_out_of_memory
from kubetune_trainer.dsconfig import build_deepspeed_config, effective_precision, native_ops
from kubetune_trainer.engine import TrainableModel, build_model, start_engine
from kubetune_trainer.errors import NonFiniteLoss, OutOfMemory, write_termination
from kubetune_trainer.evaluator import Evaluator
from kubetune_trainer.feeder import Feeder, batcher_for
from kubetune_trainer.losses import Objective
from kubetune_trainer.progress import Checkpoints, TrainState, early_stopping_for
from kubetune_trainer.reporting import Reporter
from kubetune_trainer.session import Session, seed_everything, start_session, work_dir
from kubetune_trainer.spec import FineTuneJob, FineTuneJobSpec
from kubetune_trainer.spec.runtime import ENV_CPU_BF16, ExitCode
from kubetune_trainer.step import StepStats, TrainStep

EVAL_SAMPLE_FILE = "eval-sample.safetensors"  # rank 0's first evaluation rows: inputs + logits


class _Sigterm:
    """SIGTERM sets a flag; the loop checkpoints at the end of the step."""

    def __init__(self) -> None:
        self.received = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = True


@contextlib.contextmanager
def _out_of_memory_is_permanent(spec: FineTuneJobSpec) -> Iterator[None]:
    """An accelerator OOM becomes :class:`OutOfMemory` (permanent) with the settings that reduce memory."""
    try:
        yield
    except Exception as error:
        if not is_out_of_memory(error):
            raise
        packing = " packed" if spec.dataset.packing else ""
        raise OutOfMemory(
            f"accelerator out of memory with training.microBatchSize {spec.training.micro_batch_size} and{packing} "
            f"sequences of up to dataset.maxLength {spec.dataset.max_length} tokens "
            f"(deepspeed.zeroStage {spec.deepspeed.zero_stage}, training.gradientCheckpointing "
            f"{str(spec.training.gradient_checkpointing).lower()}); lower training.microBatchSize (raise "
            "gradientAccumulationSteps to keep the batch), enable training.gradientCheckpointing, lower "
            "dataset.maxLength, or use deepspeed.zeroStage 3 / offloadOptimizer: cpu"
        ) from error


def run(job: FineTuneJob) -> ExitCode:
    """Train one rank of the job; returns the process exit code (raises TrainerError on known failures)."""
    spec = job.spec
    sigterm = _Sigterm()
    session = start_session(native_ops=native_ops(spec))
    with _out_of_memory_is_permanent(spec):
        trainer = setup(job, session)
        try:
            code = trainer.train(sigterm)
            if code is None:
                code = trainer.finish()
        finally:
            trainer.feeder.close()
    return code


@dataclass
class Trainer:
    """Everything a running job holds; :func:`setup` builds it."""

    job: FineTuneJob
    session: Session
    work_dir: Path
    metrics: Any
    tokenizer: Any
    built: TrainableModel
    engine: Any
    feeder: Feeder
    stepper: TrainStep
    evaluator: Evaluator | None
    reporter: Reporter
    checkpoints: Checkpoints
    state: TrainState
    total_steps: int
    accumulation: int
    started: float
    data_report: Any = None  # trainingdata.DataReport: examples and drops, for kubetune-metrics.json

    @property
    def spec(self) -> FineTuneJobSpec:
        """The job's spec."""
        return self.job.spec

    def train(self, sigterm: _Sigterm) -> ExitCode | None:
        """Steps until the last one, early stopping or SIGTERM (then the exit code)."""
        state, stepper, every_eval = self.state, self.stepper, self.spec.training.evaluation.every_steps
        while state.step < self.total_steps and not state.stopped_early:
            state.micro = stepper.run(state.step + 1, state.micro, sigterm=sigterm.received)
            state.step += 1
            last = state.step == self.total_steps
            due_eval = (
                self.evaluator is not None
                and not last
                and (
                    (every_eval is not None and state.step % every_eval == 0)
                    or (every_eval is None and state.micro % state.batches_per_epoch < self.accumulation)
                )
            )
            due_checkpoint = self.checkpoints.due(state.step)
            preempted = self._account(stepper.settle(all_steps=due_eval or due_checkpoint or last))
            if preempted:
                self._account(stepper.settle(all_steps=True))
                return self.preempt()
            if due_eval:
                self.evaluate()
            if due_checkpoint:
                self.checkpoints.save(self.engine, state)
        self._account(stepper.settle(all_steps=True))
        return None

    def _account(self, settled: list[StepStats]) -> bool:
        """Report finished steps; raise on a non-finite loss; True when a rank got SIGTERM."""
        for stats in settled:
            if stats.nonfinite:
                self.metrics.nonfinite_loss_total.inc()
                epoch = stats.position / self.state.batches_per_epoch
                raise NonFiniteLoss(
                    f"loss is not finite at step {stats.step} (epoch {epoch:.2f}); "
                    "lower training.learningRate or check the data"
                )
            self.reporter.step(stats)
        return any(stats.sigterm for stats in settled)

    def evaluate(self, *, keep_sample: bool = False) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Evaluate, record the metrics, update early stopping."""
        assert self.evaluator is not None
        results, sample = self.evaluator.run(self.engine, keep_sample=keep_sample)
        self.state.last_eval = results
        self.metrics.record_eval(results)
        shown = " ".join(f"{k} {v:.4f}" for k, v in results.items() if k != "samples")
        self.session.log(("final evaluation " if keep_sample else "evaluation ") + shown)
        if not keep_sample:
            early = self.state.early
            early.update(results)
            if early.should_stop:
                self.session.log(f"early stopping: {early.metric} did not improve for {early.patience} evaluations")
                self.state.stopped_early = True
        return results, sample

    def preempt(self) -> ExitCode:
        """Checkpoint after SIGTERM and say so in the termination message."""
        from kubetune_trainer.checkpoint.manifest import tag_for

        session, step = self.session, self.state.step
        if not self.checkpoints.enabled:
            if session.local_rank == 0:
                message = f"SIGTERM at step {step}: no checkpoint.uri, progress lost"
                write_termination("Preempted", message, ExitCode.RETRYABLE, overwrite=True)
            return ExitCode.RETRYABLE
        began = time.monotonic()
        self.checkpoints.save(self.engine, self.state)
        self.checkpoints.finish()
        session.log(f"SIGTERM: checkpoint {tag_for(step)} saved and committed in {time.monotonic() - began:.1f} s")
        if session.local_rank == 0:
            message = f"SIGTERM at step {step}: checkpoint {tag_for(step)} committed"
            write_termination("Preempted", message, ExitCode.PREEMPTED, overwrite=True, step=step)
        session.barrier()
        return ExitCode.PREEMPTED

    def finish(self) -> ExitCode:
        """Final evaluation, last checkpoint, publish, termination message."""
        from kubetune_trainer.finish import publish_run

        final: dict[str, Any] = {}
        sample = None
        if self.evaluator is not None:
            final, sample = self.evaluate(keep_sample=True)
        if sample is not None:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in sample.items()}, str(self.work_dir / EVAL_SAMPLE_FILE))
        self.checkpoints.save(self.engine, self.state)
        self.checkpoints.finish()
        publish_run(self, {k: v for k, v in final.items() if k != "samples"})
        self.session.barrier()
        return ExitCode.SUCCESS


def _plan(spec: FineTuneJobSpec, batches_per_epoch: int, session: Session) -> tuple[int, int, Any]:
    """(gradient accumulation, total optimizer steps, DeepSpeed config)."""
    cpu_bf16 = os.environ.get(ENV_CPU_BF16) == "1"
    probe = build_deepspeed_config(
        spec, world_size=session.world_size, cpu=session.cpu, cpu_bf16=cpu_bf16, total_steps=1
    )
    accumulation = int(probe["gradient_accumulation_steps"])
    if spec.training.max_steps is not None:
        total_steps = spec.training.max_steps
    else:
        assert spec.training.epochs is not None
        total_steps = max(1, (spec.training.epochs * batches_per_epoch) // accumulation)
    ds_config = build_deepspeed_config(
        spec, world_size=session.world_size, cpu=session.cpu, cpu_bf16=cpu_bf16, total_steps=total_steps
    )
    _, note = effective_precision(spec, cpu=session.cpu, cpu_bf16=cpu_bf16)
    if note:
        session.log(note)
    return accumulation, total_steps, ds_config


@dataclass
class _Inputs:
    """What setup reads before the model exists: the backbone, tokenizer, data and the step plan."""

    backbone_dir: Path
    labels: list[str] | None
    tokenizer: Any
    data: Any  # TrainingData
    sampler: data_mod.LengthGroupedSampler
    accumulation: int
    total_steps: int
    ds_config: dict[str, Any]


def _inputs(spec: FineTuneJobSpec, session: Session, scratch: Path) -> _Inputs:
    from kubetune_trainer.model import load_tokenizer
    from kubetune_trainer.sources import resolve_backbone
    from kubetune_trainer.trainingdata import load_training_data

    backbone_dir = resolve_backbone(
        spec.model.source,
        work_dir=scratch,
        local_rank_zero_first=session.local_rank_zero_first,
        endpoint=spec.checkpoint.endpoint,
        region=spec.checkpoint.region,
        revision=spec.model.revision,
    )
    tokenizer = load_tokenizer(backbone_dir, spec.model.source)
    data = load_training_data(spec, tokenizer, scratch, session)
    sampler = data_mod.LengthGroupedSampler(
        lengths=data.item_lengths,
        micro_batch_size=spec.training.micro_batch_size,
        world_size=session.world_size,
        rank=session.rank,
        seed=spec.training.seed,
    )
    accumulation, total_steps, ds_config = _plan(spec, sampler.batches_per_epoch(), session)
    labels = data_mod.label_names(spec.model)
    return _Inputs(backbone_dir, labels, tokenizer, data, sampler, accumulation, total_steps, ds_config)


def _reporter(
    spec: FineTuneJobSpec, session: Session, metrics: Any, inputs: _Inputs, built: TrainableModel
) -> Reporter:
    from kubetune_trainer.flops import peak_tflops

    accelerated = session.placement.accelerated
    return Reporter(
        metrics=metrics,
        session=session,
        total_steps=inputs.total_steps,
        batches_per_epoch=inputs.sampler.batches_per_epoch(),
        log_every=spec.training.log_every_steps,
        flops_per_token=built.flops_per_token,
        peak_tflops=(
            peak_tflops(session.placement.name(), spec.resources.accelerator_peak_tflops) if accelerated else None
        ),
    )


def setup(job: FineTuneJob, session: Session) -> Trainer:
    """Everything up to the first step: data, model, engine, restored checkpoint."""
    from kubetune_trainer.metrics import TrainerMetrics

    spec, started = job.spec, time.time()
    seed_everything(spec.training.seed)
    scratch = work_dir()
    metrics = TrainerMetrics()
    if session.local_rank == 0:
        metrics.serve()
    inputs = _inputs(spec, session, scratch)
    if inputs.data.report is not None and session.local_rank == 0:
        metrics.record_dropped(inputs.data.report.dropped())
    built = build_model(
        spec, inputs.backbone_dir, inputs.labels, ds_config=inputs.ds_config, total_steps=inputs.total_steps
    )
    metrics.trainable_parameters.set(built.trainable)
    metrics.parameters.set(built.total)
    session.log(f"strategy {spec.strategy.type}: {built.trainable:,} trainable of {built.total:,} parameters")
    engine = start_engine(built, spec, inputs.ds_config, session)
    seed_everything(spec.training.seed + 7919 * session.rank)  # dropout differs per rank, reproducibly
    objective = Objective(
        spec,
        prefix_positions=built.prepared.prefix_positions_in_logits,
        anchors=session.placement.tensors(built.anchors) if built.anchors is not None else None,  # moved once
        loss_head=built.loss_head,
        extra_loss=built.prepared.extra_loss,
    )
    flash = spec.training.attention == "flash_attention_2"
    batcher = batcher_for(spec, inputs.tokenizer, rank=session.rank, flatten_packed=flash)
    prefetch = 2 if session.placement.accelerated else 0
    feeder = Feeder(inputs.data.items, inputs.sampler, batcher, session.placement, prefetch=prefetch)
    state = TrainState(batches_per_epoch=inputs.sampler.batches_per_epoch(), early=early_stopping_for(spec))
    checkpoints = Checkpoints(spec, spec_hash=spec_hash(job), work_dir=scratch, metrics=metrics)
    checkpoints.restore(engine, state, session)
    metrics.record_start(step=state.step, epoch=state.epoch, total_steps=inputs.total_steps)
    validation = inputs.data.validation
    micro = spec.training.micro_batch_size
    evaluator = Evaluator(validation, objective, batcher, session, micro, inputs.labels) if validation else None
    stepper = TrainStep(
        engine, objective, feeder, session, accumulation=inputs.accumulation, hook=built.prepared.step_hook
    )
    return Trainer(
        job,
        session,
        scratch,
        metrics,
        inputs.tokenizer,
        built,
        engine,
        feeder,
        stepper,
        evaluator,
        _reporter(spec, session, metrics, inputs, built),
        checkpoints,
        state,
        inputs.total_steps,
        inputs.accumulation,
        started,
        data_report=inputs.data.report,
    )
