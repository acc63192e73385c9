"""The auxiliary self-supervised loss's model: an LM head sharing the task model's backbone.

``L = L_task + λ·L_aux`` (DESIGN §4.5) needs, next to the task head, a masked-LM
(``mlm``) or causal-LM (``lm``) head on the *same* backbone.  The pretrained
checkpoint's own LM head is loaded (``AutoModelForMaskedLM`` /
``AutoModelForCausalLM``), its backbone is replaced by the task model's — one set of
backbone weights, adapted by whatever the strategy injected (LoRA layers, adapters)
— and its output embeddings are re-tied to the shared input embeddings.  The LM
head stays frozen for parameter-efficient strategies (only ``full`` and
``partial`` train it), so the auxiliary loss adapts the same parameters the task
loss does.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from torch import nn

from kubetune_trainer.errors import InvalidModel


def _hf_model(model: Any) -> Any:
    # A PeftModel wraps the transformers model; adapters are injected in place.
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class TaskWithAuxiliary(nn.Module):
    """The task model and the auxiliary LM model as one module (one DeepSpeed engine)."""

    def __init__(self, task_model: Any, aux_model: Any) -> None:
        super().__init__()
        self.task_model = task_model
        self.aux_model = aux_model

    @property
    def config(self) -> Any:
        return self.task_model.config

    def forward(self, aux_input_ids: Any = None, aux_attention_mask: Any = None, **inputs: Any) -> Any:
        """Task logits, and the auxiliary head's logits when ``aux_input_ids`` is given."""
        out = self.task_model(**inputs)
        aux_logits = None
        if aux_input_ids is not None:
            aux_logits = self.aux_model(input_ids=aux_input_ids, attention_mask=aux_attention_mask).logits
        return SimpleNamespace(logits=out.logits, aux_logits=aux_logits)


def attach(task_model: Any, backbone_dir: Path, kind: str, *, train_head: bool, dtype: Any = None) -> TaskWithAuxiliary:
    """Load the pretrained LM head for ``kind`` (``mlm`` | ``lm``) onto the task model's backbone, in ``dtype``
    (the training precision's; fp32 by default)."""
    import torch
    import transformers

    auto = transformers.AutoModelForMaskedLM if kind == "mlm" else transformers.AutoModelForCausalLM
    try:
        aux = auto.from_pretrained(str(backbone_dir), dtype=dtype or torch.float32)
    except Exception as exc:
        raise InvalidModel(
            f"objective.auxiliary.type {kind}: the backbone has no {'masked' if kind == 'mlm' else 'causal'}-LM head "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    hf_task = _hf_model(task_model)
    prefix = hf_task.base_model_prefix
    if getattr(aux, "base_model_prefix", None) != prefix or not hasattr(hf_task, prefix):
        raise InvalidModel(f"objective.auxiliary: cannot share the {prefix!r} backbone with the LM head")
    setattr(aux, prefix, getattr(hf_task, prefix))
    aux.tie_weights()  # the LM decoder follows the shared (possibly trained) input embeddings
    shared = {id(p) for p in getattr(hf_task, prefix).parameters()}
    for param in aux.parameters():
        if id(param) not in shared:
            param.requires_grad_(train_head)
    return TaskWithAuxiliary(task_model, aux)
