"""Language-model cross-entropy that never materializes full-vocabulary fp32 logits.

A causal LM's logits are ``[tokens, vocab]``: 16 × 1,024 tokens × a 128k
vocabulary is 8.6 GB in fp32 — the upcast most losses do, plus its softmax
and gradient, dwarfs the activations of a 1 B model.  :func:`linear_cross_entropy`
fuses the LM head's matmul with the loss: it walks the tokens in chunks,
computes one chunk's logits (fp32, a few hundred MB at most), its loss and —
when training — the gradients of the hidden states and of the head's weight,
and drops the chunk.  The backward pass only scales those gradients.

:class:`LossHead` puts it where the model's own LM head was, sharing the
head's parameters (tied embeddings stay tied), so the model's forward — and
DeepSpeed's ZeRO-3 hooks, which gather a module's parameters around its
forward — are untouched.  Given targets it returns ``[loss sum, target
count]`` instead of logits; without, the ordinary logits.  It is used only
for architectures whose forward returns the head's output unchanged
(:data:`PLAIN_HEAD_MODEL_TYPES`), never for heads followed by soft-capping
or scaling.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 (the conventional torch alias)
from torch import Tensor, nn

IGNORE_INDEX = -100
# fp32 logits of one chunk stay under this many elements (256 MiB).
CHUNK_ELEMENTS = 1 << 26

# Architectures whose LM forward returns ``lm_head(hidden)`` (or the MLM decoder's output) as the
# logits with nothing applied after it.  Gemma 2/3 soft-cap, Cohere and Granite scale the logits:
# they keep the ordinary loss.
PLAIN_HEAD_MODEL_TYPES = frozenset(
    {
        "llama",
        "mistral",
        "mixtral",
        "qwen2",
        "qwen2_moe",
        "qwen3",
        "qwen3_moe",
        "gpt2",
        "gpt_neox",
        "phi3",
        "olmo2",
        "smollm3",
        "bert",
        "roberta",
        "xlm-roberta",
        "distilbert",
    }
)


def chunk_tokens(vocab_size: int) -> int:
    """Tokens per chunk so that one chunk's fp32 logits stay under :data:`CHUNK_ELEMENTS`."""
    return max(1, CHUNK_ELEMENTS // max(1, vocab_size))


class _LinearCrossEntropy(torch.autograd.Function):
    """Σ cross-entropy(hidden @ weightᵀ + bias, targets) over non-ignored targets, chunk by chunk."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        targets: Tensor,
        label_smoothing: float,
        chunk: int,
    ) -> Tensor:
        want_hidden, want_weight, want_bias = ctx.needs_input_grad[:3]
        vocab = weight.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
        grad_bias = torch.zeros(vocab, dtype=torch.float32, device=weight.device) if want_bias else None
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start : start + chunk]
            t = targets[start : start + chunk]
            valid = t != IGNORE_INDEX
            safe = torch.where(valid, t, torch.zeros_like(t))
            logits = (h @ weight.t()).float()
            if bias is not None:
                logits += bias.float()
            lse = torch.logsumexp(logits, dim=-1)
            nll = lse - logits.gather(1, safe.unsqueeze(1)).squeeze(1)
            if label_smoothing > 0:
                smooth = lse - logits.mean(dim=-1)
                per_token = (1.0 - label_smoothing) * nll + label_smoothing * smooth
            else:
                per_token = nll
            total += torch.where(valid, per_token, torch.zeros_like(per_token)).sum()
            if grad_hidden is None and grad_weight is None and grad_bias is None:
                continue
            # d loss / d logits = softmax - ((1-ε)·onehot + ε/V), zero on ignored rows; computed in place.
            grad = logits.sub_(lse.unsqueeze(1)).exp_()
            grad.scatter_add_(1, safe.unsqueeze(1), torch.full_like(nll, -(1.0 - label_smoothing)).unsqueeze(1))
            if label_smoothing > 0:
                grad.sub_(label_smoothing / vocab)
            grad.mul_(valid.unsqueeze(1))
            low = grad.to(h.dtype)
            if grad_hidden is not None:
                grad_hidden[start : start + chunk] = low @ weight
            if grad_weight is not None:
                grad_weight.add_(low.t() @ h)  # accumulated in fp32 across chunks
            if grad_bias is not None:
                grad_bias += grad.sum(dim=0)
        ctx.save_for_backward(*(g if g is not None else torch.empty(0) for g in (grad_hidden, grad_weight, grad_bias)))
        ctx.present = (grad_hidden is not None, grad_weight is not None, grad_bias is not None)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        saved = ctx.saved_tensors
        has_hidden, has_weight, has_bias = ctx.present
        grad_hidden = saved[0] * grad_output.to(saved[0].dtype) if has_hidden else None
        grad_weight = (saved[1] * grad_output).to(ctx.weight_dtype) if has_weight else None
        grad_bias = (saved[2] * grad_output).to(ctx.weight_dtype) if has_bias else None
        return grad_hidden, grad_weight, grad_bias, None, None, None


# Run eagerly inside a compiled model (a graph break around it): traced by torch.compile on torch 2.11,
# the gradients its forward computes came back as zeros, and a compiled run trained nothing.
_apply_eagerly: Any = torch.compiler.disable(_LinearCrossEntropy.apply)  # type: ignore[no-untyped-call]


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Tensor | None = None,
    label_smoothing: float = 0.0,
    chunk: int | None = None,
) -> Tensor:
    """Σ over non-ignored targets of CE(``hidden @ weightᵀ + bias``, ``targets``) as a float32 scalar.

    ``hidden`` is ``[N, H]``, ``weight`` ``[V, H]``, ``targets`` ``[N]`` (-100 ignored).  Equal to
    ``F.cross_entropy(logits.float(), targets, reduction="sum", label_smoothing=ε)`` without ever
    holding more than ``chunk`` rows of logits; its gradients too.
    """
    if hidden.dim() != 2 or targets.dim() != 1 or hidden.shape[0] != targets.shape[0]:
        raise ValueError(f"hidden [N, H] and targets [N] expected, got {tuple(hidden.shape)}, {tuple(targets.shape)}")
    size = chunk or chunk_tokens(weight.shape[0])
    result: Tensor = _apply_eagerly(hidden, weight, bias, targets, label_smoothing, size)
    return result


class LossHead(nn.Module):
    """An LM head that returns ``[loss sum, target count]`` while targets are set, else logits."""

    def __init__(self, head: nn.Linear, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.weight = head.weight  # the same Parameter: tied input embeddings stay tied
        self.bias = head.bias
        self.label_smoothing = label_smoothing
        self.targets: Tensor | None = None

    @property
    def in_features(self) -> int:
        """Hidden size (nn.Linear's attribute, which some model code reads)."""
        return int(self.weight.shape[1])

    @property
    def out_features(self) -> int:
        """Vocabulary size."""
        return int(self.weight.shape[0])

    def forward(self, hidden: Tensor) -> Tensor:
        """Logits, or ``[Σ loss, count]`` over the targets set by :func:`loss_targets`."""
        if self.targets is None:
            return F.linear(hidden, self.weight, self.bias)
        targets = self.targets.reshape(-1)
        flat = hidden.reshape(-1, hidden.shape[-1])
        if flat.shape[0] != targets.shape[0]:
            raise ValueError(f"{targets.shape[0]} targets for {flat.shape[0]} hidden positions")
        total = linear_cross_entropy(flat, self.weight, targets, bias=self.bias, label_smoothing=self.label_smoothing)
        count = (targets != IGNORE_INDEX).sum().to(torch.float32)
        return torch.stack([total, count])


def _hf_model(model: Any) -> Any:
    # A PeftModel wraps the transformers model; its layers are changed in place.
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def install_loss_head(model: Any, label_smoothing: float) -> LossHead | None:
    """Replace the model's LM head by a :class:`LossHead` when its architecture allows; None otherwise."""
    hf = _hf_model(model)
    config = getattr(hf, "config", None)
    head = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    if (
        config is None
        or getattr(config, "model_type", None) not in PLAIN_HEAD_MODEL_TYPES
        or not isinstance(head, nn.Linear)
    ):
        return None
    replacement = LossHead(head, label_smoothing)
    hf.set_output_embeddings(replacement)
    return replacement


@contextlib.contextmanager
def loss_targets(head: LossHead, targets: Tensor) -> Iterator[None]:
    """While inside, ``head`` returns the loss over ``targets`` (aligned with its input positions)."""
    head.targets = targets
    try:
        yield
    finally:
        head.targets = None
