"""Build the task model from a local Hugging Face backbone (DESIGN §4.3).

Under ZeRO-3 the caller keeps an ``HfDeepSpeedConfig`` alive while this runs,
so transformers creates the weights inside ``deepspeed.zero.Init`` and each
rank only ever holds its partition.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune_trainer.errors import InvalidModel, InvalidSpec
from kubetune_trainer.objective import apply_dropout_override
from kubetune_trainer.spec import FineTuneJobSpec, Task


@dataclass
class Backbone:
    """The task model plus what the rest of the trainer needs to know about it."""

    model: Any
    tokenizer: Any
    new_parameter_names: list[str]  # freshly initialized (the task head): no pretrained value


def _auto_class(task: Task) -> Any:
    import transformers

    return {
        Task.SEQUENCE_CLASSIFICATION: transformers.AutoModelForSequenceClassification,
        Task.TOKEN_CLASSIFICATION: transformers.AutoModelForTokenClassification,
        Task.CAUSAL_LM: transformers.AutoModelForCausalLM,
        Task.MASKED_LM: transformers.AutoModelForMaskedLM,
    }[task]


def load_tokenizer(path: Path, source: str) -> Any:
    """The backbone's tokenizer, with a padding token (causal LMs often lack one)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:
        raise InvalidModel(f"model.source {source}: cannot load the tokenizer ({exc})") from exc
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise InvalidModel(f"model.source {source}: the tokenizer has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_backbone(spec: FineTuneJobSpec, path: Path, labels: list[str] | None, *, dtype: Any = None) -> Backbone:
    """Load the pretrained model with the task's head, the dropout override and the label names.

    Every parameter, pretrained or new, comes in ``dtype`` (the training precision's; fp32 by
    default).  transformers 5 otherwise loads a checkpoint in the dtype it was saved in while new
    heads start in fp32: an fp16/bf16 checkpoint then fails at the first matmul of an fp32 run.
    """
    import torch
    from transformers import AutoConfig

    source = spec.model.source
    tokenizer = load_tokenizer(path, source)
    try:
        config = AutoConfig.from_pretrained(str(path))
    except Exception as exc:
        raise InvalidModel(f"model.source {source}: not a Hugging Face model directory ({exc})") from exc
    if labels is not None:
        config.num_labels = len(labels)
        config.id2label = dict(enumerate(labels))
        config.label2id = {name: i for i, name in enumerate(labels)}
    apply_dropout_override(config, spec.objective.regularization.dropout)
    if getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = tokenizer.pad_token_id
    attention = check_attention(spec.training.attention)
    try:
        model, info = _auto_class(spec.model.task).from_pretrained(
            str(path),
            config=config,
            output_loading_info=True,
            attn_implementation=attention,
            dtype=dtype or torch.float32,
        )
    except ValueError as exc:
        if attention in str(exc):
            raise InvalidSpec(
                f"training.attention {attention}: model.source {source} does not support it ({exc}); use sdpa or eager"
            ) from exc
        raise InvalidModel(
            f"model.source {source}: no {spec.model.task.value} head for this architecture ({exc})"
        ) from exc
    except Exception as exc:
        raise InvalidModel(f"model.source {source}: cannot load the weights ({exc})") from exc
    if spec.training.gradient_checkpointing:
        enable_gradient_checkpointing(model, source)
    return Backbone(model=model, tokenizer=tokenizer, new_parameter_names=list(info.get("missing_keys", [])))


def check_attention(attention: str) -> str:
    """``training.attention`` if this image and machine can run it; :class:`InvalidSpec` naming the field otherwise."""
    if attention == "flash_attention_2":
        import torch
        from transformers.utils.import_utils import is_flash_attn_2_available

        if not torch.cuda.is_available():
            raise InvalidSpec("training.attention flash_attention_2 needs a GPU; this worker has none (use sdpa)")
        if not is_flash_attn_2_available():
            raise InvalidSpec(
                "training.attention flash_attention_2: the flash-attn package is not installed in the trainer "
                "image (or does not fit its CUDA/torch); use sdpa, or an image with flash-attn"
            )
    return attention


def enable_gradient_checkpointing(model: Any, source: str) -> None:
    """Recompute each layer's activations in backward (non-reentrant: works with frozen inputs, PEFT and ZeRO)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise InvalidSpec(
            f"training.gradientCheckpointing: model.source {source} ({type(model).__name__}) does not support it"
        )
    # transformers 5.2x renamed it (activation_*); earlier 5.x releases only have the gradient_* name.
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
