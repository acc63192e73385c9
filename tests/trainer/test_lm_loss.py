"""The fused LM-head cross-entropy: the same loss and gradients as the plain one, without full-vocabulary logits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F  # noqa: N812 (the conventional torch alias)
import transformers
from torch.utils._python_dispatch import TorchDispatchMode

from kubetune_trainer.lm_loss import LossHead, install_loss_head, linear_cross_entropy, loss_targets


def _inputs(n: int, h: int, v: int, dtype: torch.dtype, *, seed: int) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, dtype=dtype, generator=generator, requires_grad=True)
    weight = torch.randn(v, h, dtype=dtype, generator=generator, requires_grad=True)
    bias = torch.randn(v, dtype=dtype, generator=generator, requires_grad=True)
    targets = torch.randint(0, v, (n,), generator=generator)
    targets[::4] = -100  # ignored positions (prompts, padding, document starts)
    return hidden, weight, bias, targets


@pytest.mark.parametrize("chunk", [1, 7, 64])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_equals_cross_entropy_and_its_gradients(chunk: int, smoothing: float) -> None:
    hidden, weight, bias, targets = _inputs(37, 16, 50, torch.float64, seed=chunk)
    reference = F.cross_entropy(hidden @ weight.t() + bias, targets, reduction="sum", label_smoothing=smoothing)
    expected = torch.autograd.grad(3 * reference, (hidden, weight, bias))
    fused = linear_cross_entropy(hidden, weight, targets, bias=bias, label_smoothing=smoothing, chunk=chunk)
    got = torch.autograd.grad(3 * fused, (hidden, weight, bias))
    # The fused loss works in float32 internally (like a bf16 model's upcast logits).
    assert float(fused.detach()) == pytest.approx(float(reference.detach()), rel=1e-6)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_bf16_inputs_stay_close_to_the_fp32_loss() -> None:
    hidden, weight, _, targets = _inputs(64, 32, 300, torch.float32, seed=3)
    reference = F.cross_entropy(hidden @ weight.t(), targets, reduction="sum")
    fused = linear_cross_entropy(hidden.bfloat16(), weight.bfloat16(), targets, chunk=16)
    assert fused.dtype == torch.float32
    assert float(fused.detach()) == pytest.approx(float(reference.detach()), rel=2e-2)


def test_frozen_weight_gets_no_gradient_and_all_ignored_targets_give_zero() -> None:
    hidden, weight, _, targets = _inputs(8, 4, 10, torch.float32, seed=4)
    weight = weight.detach()  # LoRA: the head is frozen
    fused = linear_cross_entropy(hidden, weight, targets)
    (grad_hidden,) = torch.autograd.grad(fused, (hidden,))
    assert grad_hidden.shape == hidden.shape
    nothing = linear_cross_entropy(hidden, weight, torch.full_like(targets, -100))
    assert float(nothing.detach()) == 0.0


class _LargestFloat32(TorchDispatchMode):
    """Records the largest float32 tensor any op produces."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, tuple | list) else (out,):
            if isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32:
                self.largest = max(self.largest, tensor.numel())
        return out


def test_never_builds_full_vocabulary_float32_logits() -> None:
    tokens, hidden_size, vocab, chunk = 256, 8, 4096, 32
    hidden, weight, _, targets = _inputs(tokens, hidden_size, vocab, torch.bfloat16, seed=5)
    with _LargestFloat32() as seen:
        loss = linear_cross_entropy(hidden, weight, targets, chunk=chunk)
        loss.backward()
    assert seen.largest <= max(chunk * vocab, vocab * hidden_size)  # one chunk's logits, or the weight's gradient
    assert seen.largest < tokens * vocab // 4  # the plain loss upcasts all [tokens, vocab] logits


@pytest.mark.parametrize(("backbone", "auto"), [("gpt2", "AutoModelForCausalLM"), ("bert", "AutoModelForMaskedLM")])
def test_loss_head_scores_the_models_own_logits(tiny_backbones: dict[str, Path], backbone: str, auto: str) -> None:
    model = getattr(transformers, auto).from_pretrained(tiny_backbones[backbone]).eval()
    ids = torch.randint(5, 60, (3, 10), generator=torch.Generator().manual_seed(6))
    targets = ids.clone()
    targets[:, ::3] = -100
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    reference = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
    embeddings = model.get_input_embeddings().weight
    tied = model.get_output_embeddings().weight is embeddings
    head = install_loss_head(model, label_smoothing=0.0)
    assert isinstance(head, LossHead)
    assert (model.get_output_embeddings().weight is embeddings) == tied  # tied weights stay tied
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, logits)  # no targets: the logits, unchanged
        with loss_targets(head, targets):
            total, count = model(input_ids=ids).logits
    assert float(total) == pytest.approx(float(reference), rel=1e-5)
    assert int(count) == int((targets != -100).sum())
    assert head.targets is None  # cleared on the way out


def test_a_compiled_model_gets_the_fused_losss_gradients(tiny_backbones: dict[str, Path]) -> None:
    # training.compile compiles the whole model, LossHead included. Traced by torch.compile on torch 2.11
    # (the GPU image's), the gradients the fused loss computes in its forward came back as zeros.
    ids = torch.randint(5, 60, (4, 12), generator=torch.Generator().manual_seed(8))
    targets = torch.cat([ids[:, 1:], torch.full((4, 1), -100)], dim=1)
    gradients = []
    for compiled in (False, True):
        model = transformers.AutoModelForCausalLM.from_pretrained(tiny_backbones["gpt2"])
        head = install_loss_head(model, label_smoothing=0.0)
        assert head is not None
        forward = torch.compile(model, backend="aot_eager") if compiled else model
        with loss_targets(head, targets):
            total, count = forward(input_ids=ids).logits
        (total / count).backward()
        gradients.append({name: p.grad for name, p in model.named_parameters()})
    eager, compiled_grads = gradients
    assert all(g is not None and bool(g.abs().sum() > 0) for g in compiled_grads.values())
    for name, gradient in eager.items():
        torch.testing.assert_close(compiled_grads[name], gradient, rtol=1e-4, atol=1e-6, msg=name)


def test_heads_followed_by_other_operations_keep_the_plain_loss() -> None:
    # Gemma 2 soft-caps its logits after the head: a fused loss there would skip the cap.
    config = transformers.Gemma2Config(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        final_logit_softcapping=30.0,
    )
    model = transformers.Gemma2ForCausalLM(config)
    assert install_loss_head(model, label_smoothing=0.0) is None
    assert isinstance(model.get_output_embeddings(), torch.nn.Linear)
