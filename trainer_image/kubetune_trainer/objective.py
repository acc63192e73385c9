"""The training objective as pure functions of tensors (DESIGN §4.5).

    L = L_task + λ_aux · L_aux + λ_l2sp · Σ‖θ − θ₀‖²

plus decoupled weight decay (through optimizer parameter groups, applied by
DeepSpeed's AdamW) and an optional dropout override on the model config.

Everything here is deterministic given its inputs (random masking takes an
explicit ``torch.Generator``), has no I/O and knows nothing about DeepSpeed's
engine, so each piece is unit-tested against hand computations.

ZeRO-3 and L2-SP: under ZeRO-3 a parameter outside ``forward`` is an empty
placeholder (``ds_tensor`` holds only the local shard), so a penalty over full
θ would silently be zero.  The spec rejects ``l2sp > 0`` with ``zeroStage: 3``
(rule on ``objective.regularization.l2sp`` in ``spec/jobspec.py``); as a second
line of defence :func:`snapshot_anchors` and :func:`l2sp_penalty` raise on
partitioned parameters instead of returning a wrong number.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Collection, Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 (the conventional torch alias)
from torch import Tensor, nn

IGNORE_INDEX = -100

# Substrings of parameter names that strategies add on top of the backbone
# (PEFT tuners, bottleneck adapters).  Those parameters have no pretrained
# value, so L2-SP must not anchor them.
ADDED_PARAMETER_MARKERS: tuple[str, ...] = (
    "lora_",
    "ia3_",
    "prompt_encoder",
    "prefix_encoder",
    "prompt_embeddings",
    "adapter",
    "ranknum",
)

# Config fields transformers models use for dropout probabilities.  Only the
# ones a config actually has are changed (see apply_dropout_override).
DROPOUT_CONFIG_FIELDS: tuple[str, ...] = (
    "hidden_dropout_prob",  # BERT family
    "attention_probs_dropout_prob",
    "classifier_dropout",
    "dropout",  # DistilBERT, BART, ...
    "attention_dropout",
    "activation_dropout",
    "seq_classif_dropout",
    "qa_dropout",
    "hidden_dropout",  # BLOOM, Falcon
    "resid_pdrop",  # GPT-2 family
    "embd_pdrop",
    "attn_pdrop",
    "summary_first_dropout",
    "dropout_rate",  # T5
    "classifier_dropout_prob",
    "pooler_dropout",
    "cls_dropout",
)


# --------------------------------------------------------------------------- weight decay


def _is_norm_module(module: nn.Module) -> bool:
    # LayerNorm/GroupNorm/BatchNorm/RMSNorm from torch, plus every
    # architecture's own norm class (LlamaRMSNorm, T5LayerNorm, ...), which
    # transformers names "...Norm".
    if isinstance(module, nn.LayerNorm | nn.GroupNorm | nn.modules.batchnorm._NormBase | nn.RMSNorm):
        return True
    return "norm" in type(module).__name__.lower()


def no_decay_parameter_names(model: nn.Module) -> set[str]:
    """Names of parameters that get no weight decay: biases and norm weights.

    A parameter is exempt when its name ends in ``bias`` or it belongs
    directly to a normalization module (LayerNorm, RMSNorm, GroupNorm,
    BatchNorm or any class whose name contains ``Norm``), which also covers
    embedding norms such as BERT's ``embeddings.LayerNorm.weight``.
    """
    exempt: set[str] = set()
    for module_name, module in model.named_modules():
        is_norm = _is_norm_module(module)
        for param_name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            if is_norm or param_name.endswith("bias"):
                exempt.add(full)
    return exempt


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Optimizer parameter groups for decoupled weight decay.

    Only trainable parameters (``requires_grad``) are included.  Biases and
    norm weights go to a group with ``weight_decay = 0``; everything else gets
    ``weight_decay``.  Empty groups are dropped (ZeRO stages 1-2 fail on an
    empty group).  Each group also carries ``names`` (the parameter names in
    the same order) for logging and tests; DeepSpeed and torch optimizers
    ignore unknown group keys.
    """
    if weight_decay < 0:
        raise ValueError(f"objective.regularization.weightDecay must be >= 0, got {weight_decay}")
    exempt = no_decay_parameter_names(model)
    decay: list[tuple[str, nn.Parameter]] = []
    no_decay: list[tuple[str, nn.Parameter]] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if name in exempt else decay).append((name, param))
    groups: list[dict[str, Any]] = []
    for members, wd in ((decay, weight_decay), (no_decay, 0.0)):
        if members:
            groups.append({"params": [p for _, p in members], "weight_decay": wd, "names": [n for n, _ in members]})
    return groups


# --------------------------------------------------------------------------- task loss


def task_loss(logits: Tensor, labels: Tensor, *, label_smoothing: float, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Mean cross-entropy with label smoothing over the non-ignored targets.

    ``logits`` is ``[B, C]`` with ``labels`` ``[B]`` (sequence classification)
    or ``[B, T, V]`` with ``labels`` ``[B, T]`` (token classification, masked
    and causal LM; for causal LM the caller passes already shifted logits and
    labels).  Computed in float32 for stability under bf16/fp16.  When every
    target is ignored (e.g. a batch whose responses were all truncated) the
    loss is an exact zero that is still connected to the graph, not NaN.
    """
    if logits.dim() < 2:
        raise ValueError(f"logits must be [B, C] or [B, T, V], got shape {tuple(logits.shape)}")
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match logits shape {tuple(logits.shape)}")
    flat_logits = logits.reshape(-1, logits.shape[-1]).float()
    flat_labels = labels.reshape(-1).long()
    # Sum / count equals cross_entropy's "mean" over non-ignored targets, is 0
    # (not NaN) when there are none, and needs no device-to-host sync.
    summed = F.cross_entropy(
        flat_logits, flat_labels, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction="sum"
    )
    count = (flat_labels != ignore_index).sum().clamp(min=1)
    return summed / count


# --------------------------------------------------------------------------- auxiliary self-supervision


def mask_tokens(
    input_ids: Tensor,
    *,
    mask_token_id: int,
    vocab_size: int,
    special_mask: Tensor,
    probability: float,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor]:
    """BERT-style masking for a masked-LM loss: returns ``(masked_ids, mlm_labels)``.

    Each position not in ``special_mask`` (True = special token or padding,
    never masked) is selected with ``probability``.  Of the selected
    positions 80 % become ``mask_token_id``, 10 % a uniformly random token id
    in ``[0, vocab_size)`` and 10 % keep their token.  ``mlm_labels`` holds
    the original id at selected positions and ``-100`` elsewhere.  The input
    is not modified.  Random draws come from ``generator`` (on the tensor's
    device) so masking is reproducible per rank and step.
    """
    if not 0.0 < probability < 1.0:
        raise ValueError(f"objective.auxiliary.maskProbability must be in (0, 1), got {probability}")
    if special_mask.shape != input_ids.shape:
        raise ValueError(f"special_mask shape {tuple(special_mask.shape)} != input_ids {tuple(input_ids.shape)}")
    device = input_ids.device
    shape = input_ids.shape
    select_p = torch.full(shape, probability, device=device)
    selected = torch.bernoulli(select_p, generator=generator).bool() & ~special_mask.bool()
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))

    # One uniform draw per position decides mask / random / keep: [0, .8) mask,
    # [.8, .9) random token, [.9, 1) unchanged.
    u = torch.rand(shape, generator=generator, device=device)
    to_mask = selected & (u < 0.8)
    to_random = selected & (u >= 0.8) & (u < 0.9)
    random_ids = torch.randint(0, vocab_size, shape, generator=generator, device=device, dtype=input_ids.dtype)
    masked = input_ids.clone()
    masked[to_mask] = mask_token_id
    masked[to_random] = random_ids[to_random]
    return masked, labels


def causal_lm_labels(input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
    """Labels for a causal-LM loss: the input ids, with padding set to ``-100``.

    Not shifted: ``labels[:, 1:]`` are the targets of ``logits[:, :-1]``, and
    the caller (or a transformers model given ``labels``) does the shift.
    """
    labels = input_ids.clone()
    if attention_mask is not None:
        labels[attention_mask == 0] = IGNORE_INDEX
    return labels


def shift_for_causal_lm(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Align next-token targets: ``(logits[:, :-1], labels[:, 1:])``."""
    return logits[:, :-1, :], labels[:, 1:]


# --------------------------------------------------------------------------- L2-SP


def _is_zero3_partitioned(param: Tensor) -> bool:
    # DeepSpeed ZeRO-3 tags its parameters with ds_id/ds_tensor; outside
    # forward their .data is an empty placeholder.
    return hasattr(param, "ds_tensor") or hasattr(param, "ds_id")


def _is_added_by_strategy(name: str) -> bool:
    return any(marker in name for marker in ADDED_PARAMETER_MARKERS)


_PEFT_WRAPPER_SEGMENT = re.compile(r"\.(modules_to_save\.[^.]+|original_module)(?=\.)")


def _canonical_name(name: str) -> str:
    # PEFT renames "classifier.weight" to
    # "base_model.model.classifier.modules_to_save.default.weight" (the
    # trained copy) and "...classifier.original_module.weight".
    name = name.removeprefix("base_model.model.")
    return _PEFT_WRAPPER_SEGMENT.sub("", name)


def _matches(name: str, names: Collection[str]) -> bool:
    # Names from the backbone's loading info match after PEFT's renaming is
    # undone, exactly or as a dotted suffix (task models nest the backbone).
    canonical = _canonical_name(name)
    return canonical in names or any(canonical.endswith("." + n) for n in names)


def snapshot_anchors(model: nn.Module, *, new_parameter_names: Collection[str] = ()) -> dict[str, Tensor]:
    """Detached copies θ₀ of the trainable parameters that came from the pretrained backbone.

    Call this after the strategy is applied and before the first optimizer
    step.  Excluded, because they have no pretrained value:

    * parameters named in ``new_parameter_names`` — pass the backbone's newly
      initialized weights, e.g. ``loading_info["missing_keys"]`` from
      ``AutoModel...from_pretrained(..., output_loading_info=True)`` (the
      fresh classification head); names are compared after undoing PEFT's
      renaming (``base_model.model.`` prefix, ``modules_to_save.<adapter>``
      and ``original_module`` segments) and also match as a dotted suffix;
    * parameters a strategy added (names containing one of
      :data:`ADDED_PARAMETER_MARKERS`: LoRA/AdaLoRA/IA3 weights, prompt and
      prefix encoders, bottleneck adapters);
    * frozen parameters (they cannot move, so their penalty is always 0).

    Raises ``ValueError`` on ZeRO-3-partitioned parameters (see module docs).
    """
    anchors: dict[str, Tensor] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad or _is_added_by_strategy(name) or _matches(name, new_parameter_names):
            continue
        if _is_zero3_partitioned(param):
            raise ValueError(
                f"L2-SP cannot anchor ZeRO-3-partitioned parameter {name!r}; "
                "objective.regularization.l2sp needs deepspeed.zeroStage 0, 1 or 2"
            )
        anchors[name] = param.detach().clone()
    return anchors


def l2sp_penalty(named_params: Iterable[tuple[str, Tensor]], anchors: Mapping[str, Tensor]) -> Tensor:
    """Σ‖θ − θ₀‖² over the parameters whose names are in ``anchors`` (float32 scalar).

    ``named_params`` is typically ``model.named_parameters()``; parameters not
    in ``anchors`` are ignored.  Differentiable in θ: its gradient
    2(θ − θ₀) points away from θ₀, so descent moves θ toward the
    pretrained weights.  Raises on ZeRO-3-partitioned parameters.
    """
    total: Tensor | None = None
    device: torch.device | None = None
    for name, param in named_params:
        device = device or param.device
        anchor = anchors.get(name)
        if anchor is None:
            continue
        if _is_zero3_partitioned(param):
            raise ValueError(f"L2-SP over ZeRO-3-partitioned parameter {name!r} is not supported (use zeroStage <= 2)")
        if param.shape != anchor.shape:
            raise ValueError(
                f"L2-SP anchor for {name!r} has shape {tuple(anchor.shape)}, the parameter {tuple(param.shape)}"
            )
        term = (param.float() - anchor.to(device=param.device, dtype=torch.float32)).pow(2).sum()
        total = term if total is None else total + term
    if total is None:  # on the parameters' device: a host zero would be copied over at every step
        return torch.zeros((), dtype=torch.float32, device=device)
    return total


# --------------------------------------------------------------------------- combination


@dataclasses.dataclass(frozen=True)
class LossBreakdown:
    """The objective and its components, each reported separately.

    ``total`` is what is back-propagated: ``task + aux_weight·auxiliary +
    l2sp_weight·l2sp``.  ``auxiliary`` and ``l2sp`` are the *unweighted*
    terms (0 when absent), so a dashboard shows the same quantity whatever
    λ is.
    """

    total: Tensor
    task: Tensor
    auxiliary: Tensor
    l2sp: Tensor

    def as_floats(self) -> dict[str, float]:
        """``{"total", "task", "auxiliary", "l2sp"}`` as Python floats (for logs and metrics)."""
        return {f.name: float(getattr(self, f.name).detach().float().item()) for f in dataclasses.fields(self)}


def combine_losses(
    task: Tensor,
    *,
    auxiliary: Tensor | None = None,
    aux_weight: float = 0.0,
    l2sp: Tensor | None = None,
    l2sp_weight: float = 0.0,
) -> LossBreakdown:
    """L = task + aux_weight·auxiliary + l2sp_weight·l2sp.

    A term with weight 0 is not added at all, so ``total`` is then exactly
    ``task`` (bit for bit), whether or not the term was computed.  A positive
    weight without its term is a programming error and raises.
    """
    if aux_weight < 0 or l2sp_weight < 0:
        raise ValueError(f"loss weights must be >= 0 (aux_weight={aux_weight}, l2sp_weight={l2sp_weight})")
    if aux_weight > 0 and auxiliary is None:
        raise ValueError("aux_weight > 0 but no auxiliary loss was given")
    if l2sp_weight > 0 and l2sp is None:
        raise ValueError("l2sp_weight > 0 but no L2-SP penalty was given")
    total = task
    if aux_weight > 0 and auxiliary is not None:
        total = total + aux_weight * auxiliary
    if l2sp_weight > 0 and l2sp is not None:
        total = total + l2sp_weight * l2sp.to(task.device)
    zero = torch.zeros((), dtype=task.dtype, device=task.device)
    return LossBreakdown(
        total=total,
        task=task.detach(),
        auxiliary=auxiliary.detach() if auxiliary is not None else zero,
        l2sp=l2sp.detach() if l2sp is not None else zero,
    )


# --------------------------------------------------------------------------- dropout


def apply_dropout_override(model_config: Any, p: float | None) -> list[str]:
    """Set every dropout probability field the transformers config has to ``p``.

    Call on the config before the model is built (dropout modules read it at
    construction).  Every field of :data:`DROPOUT_CONFIG_FIELDS` the config
    has is set, including ``classifier_dropout`` when it is ``None`` (which
    would otherwise inherit the hidden dropout), so the head uses ``p`` too.
    Returns the names of the fields set; ``p=None`` changes nothing.
    """
    if p is None:
        return []
    if not 0.0 <= p < 1.0:
        raise ValueError(f"objective.regularization.dropout must be in [0, 1), got {p}")
    changed: list[str] = []
    for field in DROPOUT_CONFIG_FIELDS:
        if hasattr(model_config, field):
            setattr(model_config, field, p)
            changed.append(field)
    return changed
