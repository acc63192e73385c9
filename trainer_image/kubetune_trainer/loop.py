"""The training loop: ``run(job) -> ExitCode`` for one rank (DESIGN §4).

Order of events: init distributed → seeds → metrics endpoint → backbone →
data → DeepSpeed config → model + strategy (under ZeRO-3 inside
``zero.Init``) → engine → restore checkpoint → steps (evaluation,
checkpoints, metrics) → final evaluation → publish → termination message.

SIGTERM only sets a flag; the step in progress finishes, every rank agrees on
the flag through the per-micro-step all-reduce, a checkpoint is committed and
the process exits 21 (PREEMPTED).
"""

from __future__ import annotations

import math
import os
import random
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from kubetune_trainer import data as data_mod
from kubetune_trainer.config import spec_hash
from kubetune_trainer.errors import InvalidData, InvalidSpec, NonFiniteLoss, StorageUnavailable, write_termination
from kubetune_trainer.spec import FineTuneJob, FineTuneJobSpec, StrategyType, Task
from kubetune_trainer.spec.runtime import DEFAULT_WORK_DIR, ENV_WORK_DIR, ExitCode

LANGUAGE_MODELS = (Task.CAUSAL_LM, Task.MASKED_LM)
EVAL_SAMPLE_FILE = "eval-sample.safetensors"  # first evaluation batch of rank 0: inputs + logits


@dataclass
class Dist:
    """This process's place in the job."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    cpu: bool

    def barrier(self) -> None:
        """Wait for every rank."""
        import torch.distributed as dist

        if dist.is_initialized() and self.world_size > 1:
            dist.barrier()


@dataclass
class Progress:
    """Where training stands; what a checkpoint's client state carries."""

    step: int = 0
    micro: int = 0  # micro-batches consumed since the start (the sampler position)
    early: dict[str, Any] = field(default_factory=dict)
    last_checkpoint_step: int | None = None
    last_eval: dict[str, Any] = field(default_factory=dict)
    resumed_from: int | None = None  # the checkpoint step this run started from
    fell_back_from: int | None = None  # a newer checkpoint that failed verification


class _Sigterm:
    """SIGTERM sets a flag; the loop checkpoints at the end of the step."""

    def __init__(self) -> None:
        self.received = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = True


def _log(dist: Dist, message: str) -> None:
    if dist.rank == 0:
        print(f"kubetune: {message}", file=sys.stderr, flush=True)


def _init_distributed() -> Dist:
    import deepspeed
    import torch

    cpu = not torch.cuda.is_available()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    dist = Dist(
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        local_rank=int(os.environ["LOCAL_RANK"]),
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
        cpu=cpu,
    )
    if not cpu:
        torch.cuda.set_device(dist.local_rank)
    else:
        # Share the node's cores between its ranks instead of oversubscribing them.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, dist.local_world_size)))
    deepspeed.init_distributed(dist_backend="gloo" if cpu else "nccl", verbose=False)
    # One concise line per interval from rank 0 (our own); library chatter (load
    # reports, DeepSpeed info) only when something is wrong.
    import transformers

    transformers.logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    transformers.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    import logging

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    return dist


def _seed(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _work_dir() -> Path:
    path = Path(os.environ.get(ENV_WORK_DIR, DEFAULT_WORK_DIR))
    try:
        path.mkdir(parents=True, exist_ok=True)
        # A uniquely named probe: the node's ranks share this directory and start together,
        # so a fixed name could be unlinked by one rank while another probes it.
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError:
        path = Path(tempfile.gettempdir()) / "kubetune-work"
        path.mkdir(parents=True, exist_ok=True)
    return path


def _validate_supported(spec: FineTuneJobSpec) -> None:
    if spec.strategy.type == StrategyType.ADALORA and spec.deepspeed.zero_stage == 3:
        raise InvalidSpec(
            "strategy.type adalora needs full parameters and gradients on every rank for its budget "
            "update; use deepspeed.zeroStage 0, 1 or 2"
        )


# --------------------------------------------------------------------------- data


def _fetch_data(uri: str, spec: FineTuneJobSpec, work_dir: Path, dist: Dist) -> Path:
    """A local path for a dataset URI (s3:// is downloaded once per node)."""
    from kubetune_trainer.sources import cache_dir_for, local_path

    path = local_path(uri)
    if path is not None:
        return path
    if uri.startswith("hf://"):
        raise InvalidSpec(f"dataset {uri}: hf:// datasets are not supported by this trainer build; use a file")
    target = cache_dir_for(uri, work_dir) / uri.rsplit("/", 1)[-1]
    error: Exception | None = None
    if dist.local_rank == 0:
        try:
            from kubetune_trainer import storage

            parent, _, name = uri.rpartition("/")
            store = storage.open_store(parent, endpoint=spec.checkpoint.endpoint, region=spec.checkpoint.region)
            if not store.exists(name):
                raise InvalidData(f"{uri}: file not found")
            store.get_file(name, target)
        except storage.StorageUnavailable as exc:
            error = StorageUnavailable(f"{uri}: object storage unavailable ({exc})")
        except Exception as exc:
            error = exc
    dist.barrier()
    if error is not None:
        raise error
    return target


def _load_data(
    spec: FineTuneJobSpec, tokenizer: Any, work_dir: Path, dist: Dist
) -> tuple[list[data_mod.Example], list[data_mod.Example]]:
    ds = spec.dataset

    def read(uri: str) -> list[data_mod.Record]:
        path = _fetch_data(uri, spec, work_dir, dist)
        fmt = data_mod.infer_format(uri, ds.format.value if ds.format else None)
        return data_mod.read_records(path, fmt=fmt, display=uri)

    train_records = read(ds.train)
    if ds.max_train_samples:
        train_records = train_records[: ds.max_train_samples]
    if ds.validation:
        val_records = read(ds.validation)
        val_display = ds.validation
    elif ds.validation_split:
        if not train_records:
            raise InvalidData(f"{ds.train}: no examples (empty dataset)")
        train_records, val_records = data_mod.split_validation(train_records, ds.validation_split, spec.training.seed)
        val_display = ds.train
    else:
        val_records, val_display = [], ""
    if ds.max_eval_samples:
        val_records = val_records[: ds.max_eval_samples]

    def encode() -> tuple[list[data_mod.Example], list[data_mod.Example]]:
        train = data_mod.encode_records(
            train_records, tokenizer=tokenizer, model=spec.model, dataset=ds, display=ds.train
        )
        val = (
            data_mod.encode_records(val_records, tokenizer=tokenizer, model=spec.model, dataset=ds, display=val_display)
            if val_display
            else []
        )
        return train, val

    # Local rank 0 tokenizes first and caches; the node's other ranks load the cache.
    # A rank that finds no cache (rank 0 failed on bad data) tokenizes itself and
    # raises the same named error.
    import hashlib
    import pickle

    digest = hashlib.sha256(repr((spec.model.to_wire(), ds.to_wire(), spec.training.seed)).encode())
    for records in (train_records, val_records):
        for number, row in records:
            digest.update(repr((number, row)).encode())
    key = digest.hexdigest()[:20]
    cache = work_dir / "tokenized" / f"{key}.pkl"
    if dist.local_rank == 0:
        try:
            encoded = encode()
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(f".tmp{os.getpid()}")
            tmp.write_bytes(pickle.dumps(encoded))
            tmp.replace(cache)
        finally:
            dist.barrier()
        return encoded
    dist.barrier()
    if cache.exists():
        # written by this node's rank 0 moments ago
        cached: tuple[list[data_mod.Example], list[data_mod.Example]] = pickle.loads(cache.read_bytes())  # noqa: S301
        return cached
    return encode()


# --------------------------------------------------------------------------- losses


class Objective:
    """Computes the loss components of one micro-batch for the configured task."""

    def __init__(self, spec: FineTuneJobSpec, prepared: Any, tokenizer: Any, anchors: dict[str, Any] | None) -> None:
        self.spec = spec
        self.task = spec.model.task
        self.prepared = prepared
        self.tokenizer = tokenizer
        self.anchors = anchors
        self.adalora = spec.strategy.type == StrategyType.ADALORA
        self.orth_weight = spec.strategy.settings().orth_reg_weight if self.adalora else 0.0  # type: ignore[union-attr]

    def model_inputs(self, batch: dict[str, Any], generator: Any) -> tuple[dict[str, Any], Any]:
        """(inputs for the model, labels for the task loss)."""
        from kubetune_trainer.objective import mask_tokens

        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
        if self.task == Task.MASKED_LM:
            ids = batch["input_ids"]
            special = (batch["attention_mask"] == 0) | self._special(ids)
            masked, labels = mask_tokens(
                ids,
                mask_token_id=self.tokenizer.mask_token_id,
                vocab_size=len(self.tokenizer),
                special_mask=special,
                probability=0.15,
                generator=generator,
            )
            inputs["input_ids"] = masked
            return cast(dict[str, Any], inputs), labels
        return cast(dict[str, Any], inputs), batch["labels"]

    def auxiliary_inputs(self, batch: dict[str, Any], generator: Any) -> tuple[dict[str, Any], Any]:
        """Inputs for the auxiliary LM head and their labels (none when there is no auxiliary loss)."""
        from kubetune_trainer.objective import causal_lm_labels, mask_tokens

        aux = self.spec.objective.auxiliary
        if aux is None or aux.weight <= 0:
            return {}, None
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if aux.type == "mlm":
            masked, labels = mask_tokens(
                ids,
                mask_token_id=self.tokenizer.mask_token_id,
                vocab_size=len(self.tokenizer),
                special_mask=(mask == 0) | self._special(ids),
                probability=aux.mask_probability,
                generator=generator,
            )
            return {"aux_input_ids": masked, "aux_attention_mask": mask}, labels
        return {"aux_input_ids": ids, "aux_attention_mask": mask}, causal_lm_labels(ids, mask)

    def _special(self, ids: Any) -> Any:
        import torch

        specials = torch.tensor(sorted(set(self.tokenizer.all_special_ids)), dtype=ids.dtype)
        return torch.isin(ids, specials)

    def task_logits_labels(self, logits: Any, labels: Any) -> tuple[Any, Any]:
        """Align logits and labels (causal-LM shift, prompt-tuning virtual positions)."""
        from kubetune_trainer.objective import shift_for_causal_lm

        if self.task == Task.CAUSAL_LM:
            logits = logits[:, self.prepared.prefix_positions_in_logits :, :]
            return shift_for_causal_lm(logits, labels)
        return logits, labels

    def losses(self, model: Any, logits: Any, labels: Any, aux_logits: Any = None, aux_labels: Any = None) -> Any:
        """The :class:`LossBreakdown` of one micro-batch."""
        import dataclasses

        from kubetune_trainer.objective import combine_losses, l2sp_penalty, shift_for_causal_lm, task_loss

        logits, labels = self.task_logits_labels(logits, labels)
        task = task_loss(logits, labels, label_smoothing=self.spec.objective.label_smoothing)
        l2sp = l2sp_penalty(model.named_parameters(), self.anchors) if self.anchors else None
        auxiliary = None
        aux = self.spec.objective.auxiliary
        if aux is not None and aux.weight > 0 and aux_logits is not None:
            if aux.type == "lm":
                aux_logits, aux_labels = shift_for_causal_lm(aux_logits, aux_labels)
            auxiliary = task_loss(aux_logits, aux_labels, label_smoothing=0.0)
        breakdown = combine_losses(
            task,
            auxiliary=auxiliary,
            aux_weight=aux.weight if (aux is not None and auxiliary is not None) else 0.0,
            l2sp=l2sp,
            l2sp_weight=self.spec.objective.regularization.l2sp,
        )
        if self.adalora and self.orth_weight > 0:
            breakdown = dataclasses.replace(breakdown, total=breakdown.total + self.orth_weight * _orth_reg(model))
        return breakdown


def _orth_reg(model: Any) -> Any:
    # AdaLoRA's orthogonality regularizer, as PeftModel adds it when the model
    # computes the loss itself (peft/tuners/adalora/model.py); we compute the
    # task loss ourselves, so it is added here.
    import torch

    total = None
    count = 0
    for name, p in model.named_parameters():
        if ("lora_A" in name or "lora_B" in name) and p.requires_grad and p.numel() > 0:
            cov = p @ p.T if "lora_A" in name else p.T @ p
            eye = torch.eye(*cov.size(), out=torch.empty_like(cov))
            term = torch.norm(cov - eye, p="fro")
            total = term if total is None else total + term
            count += 1
    return total / count if total is not None else torch.zeros(())


# --------------------------------------------------------------------------- evaluation


def evaluate(
    engine: Any,
    objective: Objective,
    examples: list[data_mod.Example],
    spec: FineTuneJobSpec,
    labels: list[str] | None,
    dist: Dist,
    pad_id: int,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Evaluate on the validation set across all ranks; returns (metrics, rank-0 sample of inputs+logits)."""
    import torch
    import torch.distributed as tdist

    from kubetune_trainer import evaluation

    task = spec.model.task
    shards = data_mod.eval_shards(
        len(examples), micro_batch_size=spec.training.micro_batch_size, world_size=dist.world_size, rank=dist.rank
    )
    seq_preds: list[tuple[int, int, int]] = []  # (index, prediction, label)
    tok_preds: list[tuple[int, list[int], list[int]]] = []
    loss_sum = 0.0
    loss_count = 0
    sample: dict[str, Any] | None = None
    engine.eval()
    with torch.no_grad():
        for batch_number, indices in enumerate(shards):
            real = [i for i in indices if i >= 0]
            use = real or [0]  # padding batch: run (ZeRO-3 needs every rank), discard
            batch = data_mod.collate([examples[i] for i in use], pad_id=pad_id, task=task)
            generator = torch.Generator().manual_seed(spec.training.seed * 1_000_003 + batch_number * 101 + dist.rank)
            inputs, target = objective.model_inputs(batch, generator)
            logits = engine(**inputs).logits
            if sample is None and dist.rank == 0:
                sample = {k: v.clone() for k, v in inputs.items()} | {
                    "logits": logits.detach().float().clone(),
                    "kubetune_labels": target.clone(),  # what the logits are scored against (masked-LM: masked ids)
                }
            if not real:
                continue
            aligned_logits, aligned = objective.task_logits_labels(logits, target)
            flat = aligned_logits.reshape(-1, aligned_logits.shape[-1]).float()
            flat_labels = aligned.reshape(-1)
            valid = flat_labels != data_mod.IGNORE_INDEX
            if bool(valid.any()):
                loss_sum += float(
                    torch.nn.functional.cross_entropy(flat[valid], flat_labels[valid], reduction="sum").item()
                )
                loss_count += int(valid.sum().item())
            if task == Task.SEQUENCE_CLASSIFICATION:
                for i, p, y in zip(real, aligned_logits.argmax(-1).tolist(), aligned.tolist(), strict=False):
                    seq_preds.append((i, p, y))
            elif task == Task.TOKEN_CLASSIFICATION:
                argmax = aligned_logits.argmax(-1)
                for row, i in enumerate(real):
                    keep = aligned[row] != data_mod.IGNORE_INDEX
                    tok_preds.append((i, argmax[row][keep].tolist(), aligned[row][keep].tolist()))
    engine.train()
    gathered: list[Any] = [None] * dist.world_size
    tdist.all_gather_object(gathered, (seq_preds, tok_preds, loss_sum, loss_count))
    all_seq = sorted({i: (p, y) for part in gathered for i, p, y in part[0]}.items())
    all_tok = sorted({i: (p, y) for part in gathered for i, p, y in part[1]}.items())
    total_loss = sum(part[2] for part in gathered)
    total_count = sum(part[3] for part in gathered)
    results: dict[str, Any] = {"loss": total_loss / max(total_count, 1)}
    if task == Task.SEQUENCE_CLASSIFICATION:
        assert labels is not None
        results |= evaluation.classification_metrics(
            [p for _, (p, _) in all_seq], [y for _, (_, y) in all_seq], len(labels)
        )
    elif task == Task.TOKEN_CLASSIFICATION:
        assert labels is not None
        results |= evaluation.token_metrics(
            [[labels[t] for t in p] for _, (p, _) in all_tok], [[labels[t] for t in y] for _, (_, y) in all_tok]
        )
    else:
        results = evaluation.language_model_metrics(total_loss, total_count)
    results["samples"] = len(examples)
    return results, sample


# --------------------------------------------------------------------------- the run


def _total_steps(spec: FineTuneJobSpec, batches_per_epoch: int, accumulation: int) -> int:
    if spec.training.max_steps is not None:
        return spec.training.max_steps
    assert spec.training.epochs is not None
    return max(1, (spec.training.epochs * batches_per_epoch) // accumulation)


def run(job: FineTuneJob) -> ExitCode:
    """Train one rank of the job; returns the process exit code (raises TrainerError on known failures)."""
    import torch
    import torch.distributed as tdist

    from kubetune_trainer import evaluation
    from kubetune_trainer.dsconfig import build_deepspeed_config, effective_precision
    from kubetune_trainer.metrics import TrainerMetrics
    from kubetune_trainer.model import load_backbone, load_tokenizer
    from kubetune_trainer.objective import param_groups, snapshot_anchors
    from kubetune_trainer.sources import resolve_backbone
    from kubetune_trainer.strategies import StrategyContext, apply_strategy, count_parameters
    from kubetune_trainer.strategies.peft_methods import new_module_names

    spec = job.spec
    _validate_supported(spec)
    sigterm = _Sigterm()
    dist = _init_distributed()
    _seed(spec.training.seed)
    work_dir = _work_dir()
    metrics = TrainerMetrics()
    if dist.local_rank == 0:
        metrics.serve()
    started = time.time()

    backbone_dir = resolve_backbone(
        spec.model.source,
        work_dir=work_dir,
        local_rank=dist.local_rank,
        barrier=dist.barrier,
        endpoint=spec.checkpoint.endpoint,
        region=spec.checkpoint.region,
        revision=spec.model.revision,
    )
    labels = data_mod.label_names(spec.model)
    tokenizer = load_tokenizer(backbone_dir, spec.model.source)
    train, val = _load_data(spec, tokenizer, work_dir, dist)

    sampler = data_mod.LengthGroupedSampler(
        lengths=[len(e.input_ids) for e in train],
        micro_batch_size=spec.training.micro_batch_size,
        world_size=dist.world_size,
        rank=dist.rank,
        seed=spec.training.seed,
    )
    probe = build_deepspeed_config(spec, world_size=dist.world_size, cpu=dist.cpu, total_steps=1)
    accumulation = int(probe["gradient_accumulation_steps"])
    batches_per_epoch = sampler.batches_per_epoch()
    total_steps = _total_steps(spec, batches_per_epoch, accumulation)
    ds_config = build_deepspeed_config(spec, world_size=dist.world_size, cpu=dist.cpu, total_steps=total_steps)
    _, note = effective_precision(spec, cpu=dist.cpu)
    if note:
        _log(dist, note)
    zero_stage = int(ds_config["zero_optimization"]["stage"])

    import deepspeed

    hf_ds_config = None
    if zero_stage == 3:
        from transformers.integrations.deepspeed import HfDeepSpeedConfig

        # Must stay referenced until the model exists: transformers then builds it under zero.Init.
        hf_ds_config = HfDeepSpeedConfig(ds_config)  # type: ignore[no-untyped-call]
    _seed(spec.training.seed)  # same initial weights (heads, adapters) on every rank
    backbone = load_backbone(spec, backbone_dir, labels)
    prepared = apply_strategy(
        backbone.model,
        spec.strategy,
        StrategyContext(
            task=spec.model.task,
            backbone_path=str(backbone_dir),
            total_steps=total_steps,
            zero_stage=zero_stage,
            new_modules=new_module_names(backbone.new_parameter_names),
        ),
    )
    model = prepared.model
    aux_spec = spec.objective.auxiliary
    if aux_spec is not None and aux_spec.weight > 0:
        from kubetune_trainer.auxiliary import attach

        model = attach(
            model,
            backbone_dir,
            aux_spec.type,
            train_head=spec.strategy.type in (StrategyType.FULL, StrategyType.PARTIAL),
        )
    trainable, total = count_parameters(model)
    metrics.trainable_parameters.set(trainable)
    metrics.parameters.set(total)
    metrics.total_steps.set(total_steps)
    _log(dist, f"strategy {spec.strategy.type.value}: {trainable:,} trainable of {total:,} parameters")
    l2sp_weight = spec.objective.regularization.l2sp
    anchors = snapshot_anchors(model, new_parameter_names=backbone.new_parameter_names) if l2sp_weight > 0 else None
    groups = [
        {k: v for k, v in g.items() if k != "names"}
        for g in param_groups(model, spec.objective.regularization.weight_decay)
    ]
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config)
    del hf_ds_config
    _seed(spec.training.seed + 7919 * dist.rank)  # dropout differs per rank, reproducibly
    objective = Objective(spec, prepared, tokenizer, anchors)

    progress = Progress()
    early = evaluation.EarlyStopping(
        metric=(spec.training.evaluation.metric.value if spec.training.evaluation.metric else None)
        or evaluation.default_metric(spec.model.task in LANGUAGE_MODELS),
        patience=spec.training.evaluation.early_stopping_patience,
    )
    manager = None
    if spec.checkpoint.uri:
        from kubetune_trainer.checkpoint import CheckpointManager
        from kubetune_trainer.storage import open_store

        manager = CheckpointManager(
            spec.checkpoint.uri,
            store=open_store(spec.checkpoint.uri, endpoint=spec.checkpoint.endpoint, region=spec.checkpoint.region),
            work_dir=work_dir / "checkpoints",
            keep_last=spec.checkpoint.keep_last,
            async_upload=spec.checkpoint.async_upload,
            spec_hash=spec_hash(job),
            metrics=metrics,
        )
        restored = manager.restore(engine)
        if restored is not None:
            state = restored.client_state
            progress.step = int(state["step"])
            progress.micro = int(state["micro"])
            early.load(state.get("early_stopping", {}))
            progress.last_eval = dict(state.get("last_eval", {}))
            progress.last_checkpoint_step = progress.step
            progress.resumed_from = progress.step
            progress.fell_back_from = restored.fell_back_from
            _log(dist, f"resumed from {restored.uri} at step {progress.step}")
            if restored.fell_back_from is not None:
                _log(
                    dist,
                    f"checkpoint step-{restored.fell_back_from:08d} failed verification; "
                    f"fell back to step-{progress.step:08d}",
                )

    def client_state() -> dict[str, Any]:
        return {
            "step": progress.step,
            "micro": progress.micro,
            "epoch": progress.micro // batches_per_epoch,
            "sampler": {"epoch": progress.micro // batches_per_epoch, "batch": progress.micro % batches_per_epoch},
            "early_stopping": early.state(),
            "best_metric": early.best,
            "last_eval": progress.last_eval,
        }

    def checkpoint() -> None:
        if manager is not None and progress.last_checkpoint_step != progress.step:
            manager.save(engine, progress.step, client_state())
            progress.last_checkpoint_step = progress.step

    pad_id = tokenizer.pad_token_id
    epoch_cache: dict[int, list[list[int]]] = {}
    every_eval = spec.training.evaluation.every_steps
    log_every = spec.training.log_every_steps
    window_samples = window_tokens = 0
    window_start = time.time()
    stopped_early = False
    total_samples = 0
    train_seconds = 0.0

    while progress.step < total_steps:
        step_start = time.time()
        sums = torch.zeros(8, dtype=torch.float64)  # total, task, aux, l2sp, samples, tokens, nonfinite, sigterm
        grads_for_adalora: dict[str, Any] | None = None
        for _ in range(accumulation):
            epoch, index = divmod(progress.micro, batches_per_epoch)
            if epoch not in epoch_cache:
                epoch_cache.clear()
                epoch_cache[epoch] = sampler.epoch_batches(epoch)
            batch = data_mod.collate([train[i] for i in epoch_cache[epoch][index]], pad_id=pad_id, task=spec.model.task)
            generator = torch.Generator().manual_seed(spec.training.seed * 1_000_003 + progress.micro * 101 + dist.rank)
            inputs, target = objective.model_inputs(batch, generator)
            aux_inputs, aux_target = objective.auxiliary_inputs(batch, generator)
            outputs = engine(**inputs, **aux_inputs)
            breakdown = objective.losses(
                engine.module, outputs.logits, target, getattr(outputs, "aux_logits", None), aux_target
            )
            values = breakdown.as_floats()
            flags = torch.tensor(
                [
                    values["total"],
                    values["task"],
                    values["auxiliary"],
                    values["l2sp"],
                    float(len(batch["input_ids"])),
                    float(data_mod.count_tokens(batch)),
                    0.0 if math.isfinite(values["total"]) else 1.0,
                    1.0 if sigterm.received else 0.0,
                ],
                dtype=torch.float64,
            )
            tdist.all_reduce(flags)
            if flags[6] > 0:
                metrics.nonfinite_loss_total.inc()
                raise NonFiniteLoss(
                    f"loss is not finite at step {progress.step + 1} (epoch {epoch}, batch {index}); "
                    "lower training.learningRate or check the data"
                )
            sums += flags
            engine.backward(breakdown.total)
            if objective.adalora and engine.is_gradient_accumulation_boundary():
                grads_for_adalora = _full_lora_grads(engine.module)
            engine.step()
            progress.micro += 1
        progress.step += 1
        if grads_for_adalora is not None:
            _adalora_update(engine.module, grads_for_adalora, progress.step)
        seconds = time.time() - step_start
        train_seconds += seconds
        world = float(dist.world_size * accumulation)
        losses = {
            "total": float(sums[0]) / world,
            "task": float(sums[1]) / world,
            "auxiliary": float(sums[2]) / world,
            "l2sp": float(sums[3]) / world,
        }
        samples, tokens = int(sums[4]), int(sums[5])
        total_samples += samples
        lr = float(engine.get_lr()[0])
        grad_norm = engine.get_global_grad_norm()
        metrics.record_step(
            step=progress.step,
            epoch=progress.micro / batches_per_epoch,
            losses=losses,
            learning_rate=lr,
            grad_norm=float(grad_norm) if grad_norm is not None else None,
            samples=samples,
            tokens=tokens,
            seconds=seconds,
            total_steps=total_steps,
        )
        window_samples += samples
        window_tokens += tokens
        if dist.rank == 0 and (progress.step % log_every == 0 or progress.step == total_steps):
            elapsed = max(time.time() - window_start, 1e-9)
            print(
                f"step {progress.step}/{total_steps} epoch {progress.micro / batches_per_epoch:.2f} "
                f"loss {losses['total']:.4f} (task {losses['task']:.4f} aux {losses['auxiliary']:.4f} "
                f"l2sp {losses['l2sp']:.4f}) lr {lr:.3g} {window_samples / elapsed:.1f} samples/s "
                f"{window_tokens / elapsed:.0f} tokens/s",
                file=sys.stderr,
                flush=True,
            )
            window_samples = window_tokens = 0
            window_start = time.time()
        if sums[7] > 0:
            return _preempt(dist, manager, checkpoint, progress)
        due_eval = (every_eval is not None and progress.step % every_eval == 0) or (
            every_eval is None and progress.micro % batches_per_epoch < accumulation
        )
        if val and due_eval and progress.step < total_steps:
            results, _ = evaluate(engine, objective, val, spec, labels, dist, pad_id)
            progress.last_eval = results
            metrics.record_eval(results)
            early.update(results)
            _log(dist, "evaluation " + " ".join(f"{k} {v:.4f}" for k, v in results.items() if k != "samples"))
            if early.should_stop:
                _log(dist, f"early stopping: {early.metric} did not improve for {early.patience} evaluations")
                stopped_early = True
        if spec.checkpoint.uri and progress.step % spec.checkpoint.every_steps == 0:
            checkpoint()
        if stopped_early:
            break

    final: dict[str, Any] = {}
    sample = None
    if val:
        final, sample = evaluate(engine, objective, val, spec, labels, dist, pad_id)
        metrics.record_eval(final)
        _log(dist, "final evaluation " + " ".join(f"{k} {v:.4f}" for k, v in final.items() if k != "samples"))
        progress.last_eval = final
    if sample is not None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sample.items()}, str(work_dir / EVAL_SAMPLE_FILE))
    checkpoint()
    if manager is not None:
        manager.finish()

    evaluation_doc = {k: v for k, v in final.items() if k != "samples"}
    output_uri = spec.output.uri or (f"{spec.checkpoint.uri.rstrip('/')}/output" if spec.checkpoint.uri else None)
    from kubetune_trainer import publish

    publish_dir = work_dir / "publish"
    publish.save_local(
        engine,
        prepared,
        tokenizer,
        directory=publish_dir,
        rank=dist.rank,
        zero_stage=zero_stage,
        merge_adapter=spec.output.merge_adapter,
        source=spec.model.source,
    )
    if dist.rank == 0:
        publish.write_metrics_file(
            publish_dir,
            {
                "evaluation": evaluation_doc,
                "parameters": {"trainable": trainable, "total": total},
                "steps": progress.step,
                "totalSteps": total_steps,
                "stoppedEarly": stopped_early,
                "throughput": {
                    "samplesPerSecond": total_samples / train_seconds if train_seconds else 0.0,
                    "trainSeconds": train_seconds,
                    "wallSeconds": time.time() - started,
                },
                "worldSize": dist.world_size,
                "strategy": spec.strategy.type.value,
                "task": spec.model.task.value,
                "specHash": spec_hash(job),
                "publishedAs": prepared.publish_as,
            },
        )
        if output_uri:
            publish.upload(publish_dir, output_uri, endpoint=spec.checkpoint.endpoint, region=spec.checkpoint.region)
        extra: dict[str, Any] = {"step": progress.step, "evaluation": evaluation_doc}
        if output_uri:
            extra["output"] = {"uri": output_uri}
        if manager is not None and manager.committed_step is not None:
            extra["checkpoint"] = {"uri": spec.checkpoint.uri, "step": manager.committed_step}
        message = f"trained {progress.step} steps; published to {output_uri}"
        if progress.resumed_from is not None:
            extra["resumedFrom"] = progress.resumed_from
            message += f"; resumed from step {progress.resumed_from}"
        if progress.fell_back_from is not None:
            extra["checkpointFallback"] = {"from": progress.fell_back_from, "to": progress.resumed_from}
            message += f" (step {progress.fell_back_from} failed verification)"
        write_termination("Succeeded", message, 0, overwrite=True, **extra)
    dist.barrier()
    return ExitCode.SUCCESS


def _preempt(dist: Dist, manager: Any, checkpoint: Any, progress: Progress) -> ExitCode:
    """Checkpoint after SIGTERM and say so in the termination message."""
    if manager is None:
        if dist.local_rank == 0:
            write_termination(
                "Preempted",
                f"SIGTERM at step {progress.step}: no checkpoint.uri, progress lost",
                ExitCode.RETRYABLE,
                overwrite=True,
            )
        return ExitCode.RETRYABLE
    started = time.monotonic()
    checkpoint()
    manager.finish()
    _log(
        dist, f"SIGTERM: checkpoint step-{progress.step:08d} saved and committed in {time.monotonic() - started:.1f} s"
    )
    if dist.local_rank == 0:
        write_termination(
            "Preempted",
            f"SIGTERM at step {progress.step}: checkpoint step-{progress.step:08d} committed",
            ExitCode.PREEMPTED,
            overwrite=True,
            step=progress.step,
        )
    dist.barrier()
    return ExitCode.PREEMPTED


def _full_lora_grads(model: Any) -> dict[str, Any]:
    """Full gradients of the AdaLoRA parameters (DeepSpeed keeps them in its own partitions)."""
    from deepspeed.utils import safe_get_full_grad

    grads: dict[str, Any] = {}
    for name, param in model.named_parameters():
        if "lora_" in name and param.requires_grad:
            grad = safe_get_full_grad(param)
            if grad is not None:
                grads[name] = grad.detach().clone()
    return grads


def _adalora_update(model: Any, grads: dict[str, Any], step: int) -> None:
    """AdaLoRA's budget update for this step; pruned ranks are written back to DeepSpeed's fp32 master copy.

    PEFT reads ``p.grad`` and masks ``lora_E`` in place; DeepSpeed has already
    cleared the grads and would overwrite the in-place mask from its master
    weights at the next step, so the grads are put back for the call and the
    masked values are pushed into the optimizer's copy afterwards.
    """
    import torch
    from deepspeed.utils import safe_set_full_fp32_param

    named = dict(model.named_parameters())
    for name, grad in grads.items():
        named[name].grad = grad
    model.base_model.update_and_allocate(step)
    for name in grads:
        named[name].grad = None
    with torch.no_grad():
        for name, param in named.items():
            if "lora_E" in name and param.requires_grad:
                safe_set_full_fp32_param(param, param.data.clone())
