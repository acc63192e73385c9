"""The trainable model and its DeepSpeed engine.

Backbone (with the attention kernel and gradient checkpointing the spec asks
for) → strategy → auxiliary LM head → fused LM loss head → L2-SP anchors →
``deepspeed.initialize`` → optional ``torch.compile``.  Under ZeRO-3 the
model is created inside ``deepspeed.zero.Init`` (an ``HfDeepSpeedConfig``
alive while transformers builds it), so no rank ever holds the full weights.
DeepSpeed moves the model to the rank's device; the L2-SP anchors are moved
there once by the placement.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune_trainer.flops import flops_per_token
from kubetune_trainer.lm_loss import LossHead, install_loss_head
from kubetune_trainer.session import Session, seed_everything
from kubetune_trainer.spec import FineTuneJobSpec, Task
from kubetune_trainer.strategies.base import Prepared


@dataclass
class TrainableModel:
    """The model DeepSpeed will wrap, and what the rest of the run needs to know about it."""

    model: Any
    prepared: Prepared
    loss_head: LossHead | None
    anchors: dict[str, Any] | None  # θ₀ of the L2-SP penalty (host, fp32) — None without L2-SP
    trainable: int
    total: int
    flops_per_token: float
    keepalive: Any = None  # HfDeepSpeedConfig under ZeRO-3: must live until the engine exists


def build_model(
    spec: FineTuneJobSpec, backbone_dir: Path, labels: list[str] | None, *, ds_config: dict[str, Any], total_steps: int
) -> TrainableModel:
    """Load the backbone and apply the strategy, the auxiliary head and the loss head (same weights on every rank)."""
    from kubetune_trainer.model import load_backbone
    from kubetune_trainer.objective import snapshot_anchors
    from kubetune_trainer.strategies import StrategyContext, apply_strategy, count_parameters
    from kubetune_trainer.strategies.peft_methods import new_module_names

    zero_stage = int(ds_config["zero_optimization"]["stage"])
    keepalive = None
    if zero_stage == 3:
        from transformers.integrations.deepspeed import HfDeepSpeedConfig

        keepalive = HfDeepSpeedConfig(ds_config)  # type: ignore[no-untyped-call]
    seed_everything(spec.training.seed)  # same initial weights (heads, adapters) on every rank
    # Everything in the training dtype (DeepSpeed keeps its own fp32 master copy of half-precision weights).
    half = half_precision_dtype(ds_config)
    backbone = load_backbone(spec, backbone_dir, labels, dtype=half)
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
    aux = spec.objective.auxiliary
    if aux is not None and aux.weight > 0:
        from kubetune_trainer.auxiliary import attach

        # The LM head trains with strategies that update pretrained weights, stays frozen with adapters.
        model = attach(
            model,
            backbone_dir,
            aux.type,
            train_head=spec.strategy.definition().trains_backbone,
            dtype=half,
        )
    if half is not None:
        cast_added_parameters(model, half)
    loss_head = None
    if spec.model.task in (Task.CAUSAL_LM, Task.MASKED_LM):
        loss_head = install_loss_head(model, spec.objective.label_smoothing)
    anchors = None
    if spec.objective.regularization.l2sp > 0:
        anchors = snapshot_anchors(model, new_parameter_names=backbone.new_parameter_names)
    trainable, total = count_parameters(model)
    return TrainableModel(
        model=model,
        prepared=prepared,
        loss_head=loss_head,
        anchors=anchors,
        trainable=trainable,
        total=total,
        flops_per_token=flops_per_token(model.named_parameters()),
        keepalive=keepalive,
    )


def start_engine(built: TrainableModel, spec: FineTuneJobSpec, ds_config: dict[str, Any], session: Session) -> Any:
    """``deepspeed.initialize`` with decoupled weight-decay groups; compiled when ``training.compile``."""
    import deepspeed

    from kubetune_trainer.objective import param_groups

    groups = [
        {k: v for k, v in g.items() if k != "names"}
        for g in param_groups(built.model, spec.objective.regularization.weight_decay)
    ]
    engine, _, _, _ = deepspeed.initialize(model=built.model, model_parameters=groups, config=ds_config)
    built.keepalive = None
    if spec.training.compile:
        engine.compile()
    if engine.device != session.placement.device:
        raise RuntimeError(f"DeepSpeed placed the model on {engine.device}, this rank computes on {session.placement}")
    return engine


def engine_precision(engine: Any) -> str:
    """The precision DeepSpeed trains in: ``bf16``, ``fp16`` or ``fp32`` (what the run did, not what was asked)."""
    if engine.bfloat16_enabled():
        return "bf16"
    if engine.fp16_enabled():
        return "fp16"
    return "fp32"


def half_precision_dtype(ds_config: dict[str, Any]) -> Any:
    """``torch.bfloat16``/``torch.float16`` when the DeepSpeed config trains in half precision, else None."""
    import torch

    if ds_config.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if ds_config.get("fp16", {}).get("enabled"):
        return torch.float16
    return None


def cast_added_parameters(model: Any, dtype: Any) -> list[str]:
    """Cast what strategies added after loading (adapters, prompts, PEFT's fp32 upcasts) to ``dtype``.

    The backbone is loaded in the training dtype; strategies add fp32 modules afterwards.  Under
    ZeRO 0-2 DeepSpeed would cast them itself, but under ZeRO-3 it skips its cast (it assumes every
    parameter came from ``deepspeed.zero.Init``): its optimizer then refuses a trainable group that
    mixes dtypes, and a bf16 activation meets an fp32 weight in the adapters' matmuls.  Partitioned
    parameters (``ds_id``) are already in ``dtype`` and are left alone.  Returns the names cast.
    """
    import torch

    cast = []
    for name, param in model.named_parameters():
        if hasattr(param, "ds_id") or not torch.is_floating_point(param) or param.dtype == dtype:
            continue
        param.data = param.data.to(dtype)
        cast.append(name)
    return cast
