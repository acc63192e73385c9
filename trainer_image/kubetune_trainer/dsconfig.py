"""The DeepSpeed configuration generated from a FineTuneJob spec (DESIGN §4.6).

:func:`build_deepspeed_config` is pure: the same spec, world size, device kind
and step count always give the same dict (golden files in
``tests/trainer/golden/`` pin it).  Keys follow DeepSpeed 0.19
(``runtime/config.py``, ``runtime/zero/config.py``, ``runtime/lr_schedules.py``,
``runtime/precision_config.py``); every generated variant is checked against
``deepspeed.runtime.config.DeepSpeedConfig`` in the tests.

Things DeepSpeed does that the mapping works around (see the scheduler code):

* ``WarmupLR``/``WarmupDecayLR``/``WarmupCosineLR`` reject
  ``warmup_num_steps = 0`` and silently raise anything below 2 to 2, and
  their default warm-up curve is logarithmic.  We ask for a linear curve
  when warming up, and emulate "no warm-up" per scheduler so that the run
  starts at the peak learning rate (see :func:`_scheduler`).
* DeepSpeed's ``AdamW`` type means its ``FusedAdam``, a C++/CUDA op compiled
  at start-up; ``torch_adam: true`` selects ``torch.optim.AdamW`` instead
  (same update rule), and ``fused: true`` (passed through to torch) its
  fused CPU/CUDA kernel.  With ZeRO-Offload DeepSpeed insists on its own
  ``DeepSpeedCPUAdam``, so ``torch_adam`` is not set then.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

from kubetune_trainer.nativeops import CPU_ADAM, SHARED_MEMORY_COMM
from kubetune_trainer.spec import FineTuneJobSpec

# DeepSpeed prints a line every steps_per_print steps; the trainer logs itself.
STEPS_PER_PRINT = 1_000_000_000
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
# DeepSpeed raises warm-ups shorter than this to this length.
_DS_MIN_WARMUP = 2
_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def effective_precision(spec: FineTuneJobSpec, *, cpu: bool, cpu_bf16: bool = False) -> tuple[str, str | None]:
    """The precision a run actually uses, and a one-line note when it differs from the spec.

    CPU runs train in fp32 (most CPUs have no fast half-precision kernels);
    ``cpu_bf16`` (``KUBETUNE_CPU_BF16=1``) keeps a requested bf16, so the
    half-precision code path GPUs run is exercised without a GPU.  The
    trainer logs the note once on rank 0.
    """
    requested = spec.training.precision
    if cpu and requested == "bf16" and cpu_bf16:
        return "bf16", None
    if cpu and requested != "fp32":
        return "fp32", f"training.precision is {requested} but this run is on CPU: training in fp32"
    return requested, None


def warmup_steps(spec: FineTuneJobSpec, total_steps: int) -> int:
    """Warm-up length in optimizer steps: ``ceil(warmupRatio × total_steps)`` (as Hugging Face does)."""
    return math.ceil(spec.training.warmup_ratio * total_steps)


def _scheduler(spec: FineTuneJobSpec, total_steps: int) -> dict[str, Any]:
    lr = spec.training.learning_rate
    warmup = warmup_steps(spec, total_steps)
    kind = spec.training.scheduler
    if warmup >= _DS_MIN_WARMUP:
        # DeepSpeed's convention: the scheduler is created at iteration -1
        # (lr = warm-up start) and stepped after each optimizer step, so step
        # k runs at f(k-1): the warm-up ends one step later than Hugging
        # Face's (which runs step k at f(k)).
        if kind == "constant":
            params: dict[str, Any] = {"warmup_min_lr": 0.0, "warmup_max_lr": lr}
            return {"type": "WarmupLR", "params": {**params, "warmup_num_steps": warmup, "warmup_type": "linear"}}
        if kind == "cosine":
            return {
                "type": "WarmupCosineLR",
                "params": {
                    "total_num_steps": total_steps,
                    "warmup_min_ratio": 0.0,
                    "warmup_num_steps": warmup,
                    "cos_min_ratio": 0.0,
                    "warmup_type": "linear",
                },
            }
        return {
            "type": "WarmupDecayLR",
            "params": {
                "total_num_steps": total_steps,
                "warmup_min_lr": 0.0,
                "warmup_max_lr": lr,
                "warmup_num_steps": warmup,
                "warmup_type": "linear",
            },
        }
    # No warm-up requested, but DeepSpeed warms up at least 2 steps (and
    # rejects 0).  Starting the scheduler at iteration 0 skips its initial
    # lr update, so step 0 runs at the optimizer's lr (the peak) and step k
    # at f(k); each curve is then chosen to be flat at the peak over the
    # forced 2 warm-up steps.  (Before the first step the scheduler's
    # get_last_lr() is unset; read engine.get_lr().)
    start = {"warmup_num_steps": _DS_MIN_WARMUP, "last_batch_iteration": 0}
    if kind == "constant":
        return {
            "type": "WarmupLR",
            "params": {"warmup_min_lr": lr, "warmup_max_lr": lr, "warmup_type": "linear", **start},
        }
    if kind == "cosine":
        return {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": total_steps,
                "warmup_min_ratio": 1.0,
                "cos_min_ratio": 0.0,
                "warmup_type": "linear",
                **start,
            },
        }
    # linear: warmup_min_lr is also where the decay ends, so it stays 0; the
    # "log" curve over 2 steps is 0 at iteration 0 (not run: step 0 uses the
    # optimizer's lr) and the peak at iteration 1, then linear decay.
    return {
        "type": "WarmupDecayLR",
        "params": {
            "total_num_steps": total_steps,
            "warmup_min_lr": 0.0,
            "warmup_max_lr": lr,
            "warmup_type": "log",
            **start,
        },
    }


def _zero(spec: FineTuneJobSpec, *, cpu: bool) -> dict[str, Any]:
    ds = spec.deepspeed
    zero: dict[str, Any] = {
        "stage": ds.zero_stage,
        "contiguous_gradients": True,
        # Overlapping reduction with backward needs a separate CUDA stream;
        # with gloo on CPU it only adds copies.
        "overlap_comm": not cpu,
        "reduce_scatter": True,
        "reduce_bucket_size": 50_000_000,
        "allgather_bucket_size": 50_000_000,
    }
    if ds.offload_optimizer == "cpu":
        # Pinned memory needs an accelerator to pin for.
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": not cpu}
    if ds.offload_params == "cpu":
        zero["offload_param"] = {"device": "cpu", "pin_memory": not cpu}
    if ds.zero_stage == 3:
        zero.update(
            {
                # Publishing and evaluation gather full weights on save; without
                # this, saved PEFT adapters come out empty (DeepSpeed #7900).
                "stage3_gather_16bit_weights_on_model_save": True,
                "stage3_prefetch_bucket_size": 50_000_000,
                "stage3_param_persistence_threshold": 100_000,
                "stage3_max_live_parameters": 1_000_000_000,
                "stage3_max_reuse_distance": 1_000_000_000,
                "sub_group_size": 1_000_000_000,
            }
        )
    return zero


def native_ops(spec: FineTuneJobSpec) -> tuple[str, ...]:
    """The DeepSpeed op builders a job's ranks load (names for
    :func:`kubetune_trainer.nativeops.load_native_ops`, pure): the CPU ranks' shared-memory all-reduce,
    which the accelerator skips where it has none, and ``DeepSpeedCPUAdam`` when ZeRO-Offload moves the
    optimizer off the device (``offloadOptimizer``, or ``offload_optimizer`` in the raw config)."""
    raw_zero = spec.deepspeed.config.get("zero_optimization")
    zero = deep_merge(_zero(spec, cpu=True), raw_zero if isinstance(raw_zero, Mapping) else {})
    offload = zero.get("offload_optimizer")
    offloaded = isinstance(offload, Mapping) and offload.get("device") in ("cpu", "nvme")
    return (SHARED_MEMORY_COMM, CPU_ADAM) if offloaded else (SHARED_MEMORY_COMM,)


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``override`` merged into a copy of ``base``: nested dicts merge, everything else replaces."""
    merged = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _merge_user(config: dict[str, Any], user: Mapping[str, Any]) -> dict[str, Any]:
    user = dict(user)
    # A different optimizer or scheduler type takes the user's block whole:
    # our AdamW/Warmup* params would be invalid for another type.
    for block in ("optimizer", "scheduler"):
        theirs = user.get(block)
        if isinstance(theirs, Mapping) and "type" in theirs and theirs["type"] != config[block]["type"]:
            config[block] = copy.deepcopy(dict(theirs))
            del user[block]
    return deep_merge(config, user)


def _resolve_batch(
    config: dict[str, Any], user: Mapping[str, Any], *, world_size: int, micro: int, accumulation: int
) -> None:
    # The user may override any of the three batch keys; keep the triple
    # consistent (train = micro × accumulation × world) so DeepSpeed accepts
    # it and the trainer can read all three back.
    given = {k: user[k] for k in _BATCH_KEYS if k in user}
    micro = int(given.get("train_micro_batch_size_per_gpu", micro))
    if "train_batch_size" in given:
        train = int(given["train_batch_size"])
        if "gradient_accumulation_steps" in given:
            accumulation = int(given["gradient_accumulation_steps"])
        elif train % (micro * world_size) == 0:
            accumulation = train // (micro * world_size)
        if train != micro * accumulation * world_size:
            raise ValueError(
                f"spec.deepspeed.config.train_batch_size {train} must equal train_micro_batch_size_per_gpu {micro}"
                f" × gradient_accumulation_steps {accumulation} × world size {world_size}"
            )
    else:
        accumulation = int(given.get("gradient_accumulation_steps", accumulation))
    config["train_micro_batch_size_per_gpu"] = micro
    config["gradient_accumulation_steps"] = accumulation
    config["train_batch_size"] = micro * accumulation * world_size


def build_deepspeed_config(
    spec: FineTuneJobSpec, *, world_size: int, cpu: bool, total_steps: int, cpu_bf16: bool = False
) -> dict[str, Any]:
    """The DeepSpeed config dict for ``spec`` on ``world_size`` ranks (pure).

    ``total_steps`` is the number of optimizer steps of the whole run (for
    the scheduler).  ``cpu`` forces fp32 unless ``cpu_bf16`` (see
    :func:`effective_precision`) and picks CPU-friendly settings.  ``spec.deepspeed.config`` is merged
    last (nested dicts merge; a different optimizer/scheduler ``type``
    replaces the block).  Weight decay in the optimizer block is only the
    default: :func:`kubetune_trainer.objective.param_groups` gives each group
    its own value, so biases and norms are never decayed.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    training = spec.training
    precision, _ = effective_precision(spec, cpu=cpu, cpu_bf16=cpu_bf16)
    optimizer_params: dict[str, Any] = {
        "lr": training.learning_rate,
        "betas": list(ADAM_BETAS),
        "eps": ADAM_EPS,
        "weight_decay": spec.objective.regularization.weight_decay,
    }
    if spec.deepspeed.offload_optimizer != "cpu":
        # torch's fused AdamW (what the HF Trainer's adamw_torch_fused runs): on CPU torch
        # otherwise uses the per-tensor for-loop implementation, which took a quarter of each
        # step for MiniLM (py-spy; the fused kernel is ~5x faster); on GPUs DeepSpeed's own
        # FusedAdam is a C++/CUDA op built at start-up (a minute of nvcc where the image did not
        # prebuild it) for the same multi-tensor update.
        optimizer_params["torch_adam"] = True
        optimizer_params["fused"] = True
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": training.micro_batch_size,
        "gradient_accumulation_steps": training.gradient_accumulation_steps,
        "train_batch_size": training.micro_batch_size * training.gradient_accumulation_steps * world_size,
        "gradient_clipping": training.max_grad_norm,
        "optimizer": {"type": "AdamW", "params": optimizer_params},
        "scheduler": _scheduler(spec, total_steps),
        "zero_optimization": _zero(spec, cpu=cpu),
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "steps_per_print": STEPS_PER_PRINT,
        "wall_clock_breakdown": False,
    }
    if precision == "fp16":
        # Dynamic loss scaling (loss_scale 0) starting at 2^16.
        config["fp16"].update(
            {
                "loss_scale": 0,
                "initial_scale_power": 16,
                "loss_scale_window": 1000,
                "hysteresis": 2,
                "min_loss_scale": 1,
            }
        )
    user = spec.deepspeed.config
    if user:
        config = _merge_user(config, user)
    _resolve_batch(
        config,
        user,
        world_size=world_size,
        micro=training.micro_batch_size,
        accumulation=training.gradient_accumulation_steps,
    )
    return config
