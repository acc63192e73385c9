"""The objective's pure functions against hand computations on small tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from kubetune_trainer.objective import (
    IGNORE_INDEX,
    LossBreakdown,
    apply_dropout_override,
    causal_lm_labels,
    combine_losses,
    l2sp_penalty,
    mask_tokens,
    no_decay_parameter_names,
    param_groups,
    shift_for_causal_lm,
    snapshot_anchors,
    task_loss,
)

# --------------------------------------------------------------------------- task loss


def _hand_cross_entropy(logits: list[list[float]], labels: list[int], smoothing: float) -> float:
    # Mean over non-ignored rows of -(1-ε)·log p_y - ε/C·Σ_c log p_c.
    total, count = 0.0, 0
    for row, y in zip(logits, labels, strict=True):
        if y == IGNORE_INDEX:
            continue
        log_z = math.log(sum(math.exp(v) for v in row))
        log_p = [v - log_z for v in row]
        c = len(row)
        total += -(1 - smoothing) * log_p[y] - smoothing / c * sum(log_p)
        count += 1
    return total / count


def test_task_loss_sequence_classification_equals_hand_computation() -> None:
    logits = [[2.0, -1.0, 0.5], [0.0, 0.0, 0.0], [-3.0, 1.0, 2.0]]
    labels = [0, 2, 1]
    got = task_loss(torch.tensor(logits), torch.tensor(labels), label_smoothing=0.0)
    assert got.item() == pytest.approx(_hand_cross_entropy(logits, labels, 0.0), rel=1e-6)


def test_task_loss_label_smoothing_equals_hand_computation_and_torch() -> None:
    logits = [[2.0, -1.0, 0.5], [0.3, 0.1, -0.2]]
    labels = [0, 2]
    got = task_loss(torch.tensor(logits), torch.tensor(labels), label_smoothing=0.1)
    assert got.item() == pytest.approx(_hand_cross_entropy(logits, labels, 0.1), rel=1e-6)
    reference = F.cross_entropy(torch.tensor(logits), torch.tensor(labels), label_smoothing=0.1)
    assert got.item() == pytest.approx(reference.item(), rel=1e-6)


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 4),
    length=st.integers(1, 5),
    vocab=st.integers(2, 7),
    smoothing=st.floats(0.0, 0.9),
    seed=st.integers(0, 2**16),
)
def test_task_loss_tokens_matches_torch_cross_entropy_with_ignored_positions(
    batch: int, length: int, vocab: int, smoothing: float, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, length, vocab, generator=g)
    labels = torch.randint(0, vocab, (batch, length), generator=g)
    labels[torch.rand(batch, length, generator=g) < 0.3] = IGNORE_INDEX
    labels[0, 0] = 0  # at least one target
    got = task_loss(logits, labels, label_smoothing=smoothing)
    expected = F.cross_entropy(
        logits.reshape(-1, vocab), labels.reshape(-1), ignore_index=IGNORE_INDEX, label_smoothing=smoothing
    )
    assert got.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)


def test_task_loss_ignores_positions_like_a_hand_computation() -> None:
    logits = [[1.0, 2.0], [5.0, -5.0], [0.0, 1.0]]
    labels = [1, IGNORE_INDEX, 0]
    got = task_loss(torch.tensor(logits).unsqueeze(0), torch.tensor(labels).unsqueeze(0), label_smoothing=0.2)
    assert got.item() == pytest.approx(_hand_cross_entropy(logits, labels, 0.2), rel=1e-6)


def test_task_loss_all_ignored_is_zero_and_differentiable() -> None:
    logits = torch.randn(2, 3, 4, requires_grad=True)
    loss = task_loss(logits, torch.full((2, 3), IGNORE_INDEX), label_smoothing=0.0)
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad is not None
    assert torch.count_nonzero(logits.grad) == 0


def test_task_loss_bf16_logits_are_computed_in_float32() -> None:
    logits = torch.tensor([[3.0, -2.0, 0.25]], dtype=torch.bfloat16)
    got = task_loss(logits, torch.tensor([1]), label_smoothing=0.0)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(_hand_cross_entropy([[3.0, -2.0, 0.25]], [1], 0.0), rel=1e-6)


def test_task_loss_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="does not match"):
        task_loss(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long), label_smoothing=0.0)


def test_causal_lm_shift_pairs_each_position_with_the_next_token() -> None:
    ids = torch.tensor([[5, 6, 7, 0]])
    labels = causal_lm_labels(ids, torch.tensor([[1, 1, 1, 0]]))
    assert labels.tolist() == [[5, 6, 7, IGNORE_INDEX]]
    logits = torch.randn(1, 4, 9)
    shifted_logits, shifted_labels = shift_for_causal_lm(logits, labels)
    assert shifted_labels.tolist() == [[6, 7, IGNORE_INDEX]]
    assert torch.equal(shifted_logits, logits[:, :3])
    # The loss only counts the two real next tokens.
    log_p = torch.log_softmax(logits[0], -1)
    hand = -(log_p[0, 6] + log_p[1, 7]) / 2
    assert task_loss(shifted_logits, shifted_labels, label_smoothing=0.0).item() == pytest.approx(hand.item(), rel=1e-6)


def test_causal_lm_labels_do_not_modify_the_input() -> None:
    ids = torch.tensor([[1, 2, 3]])
    causal_lm_labels(ids, torch.tensor([[1, 0, 0]]))
    assert ids.tolist() == [[1, 2, 3]]
    assert causal_lm_labels(ids, None).tolist() == [[1, 2, 3]]


# --------------------------------------------------------------------------- masking


def test_mask_tokens_80_10_10_and_labels() -> None:
    g = torch.Generator().manual_seed(0)
    vocab, mask_id = 1000, 3
    ids = torch.randint(10, vocab, (64, 128), generator=g)
    special = torch.zeros_like(ids, dtype=torch.bool)
    special[:, 0] = True  # [CLS]
    special[:, -8:] = True  # padding
    masked, labels = mask_tokens(
        ids, mask_token_id=mask_id, vocab_size=vocab, special_mask=special, probability=0.15, generator=g
    )
    selected = labels != IGNORE_INDEX
    # Labels hold the original ids exactly at the selected positions.
    assert torch.equal(labels[selected], ids[selected])
    # Special tokens and padding are never selected, never changed.
    assert not selected[special].any()
    assert torch.equal(masked[special], ids[special])
    # Unselected positions are unchanged.
    assert torch.equal(masked[~selected], ids[~selected])
    n = int(selected.sum())
    eligible = int((~special).sum())
    assert n / eligible == pytest.approx(0.15, abs=0.01)
    became_mask = int((masked[selected] == mask_id).sum())
    kept = int((masked[selected] == ids[selected]).sum())
    # ~80 % masked, ~10 % kept (+ random draws that hit the same id: 1/1000), ~10 % random.
    assert became_mask / n == pytest.approx(0.8, abs=0.03)
    assert kept / n == pytest.approx(0.1, abs=0.03)
    assert (n - became_mask - kept) / n == pytest.approx(0.1, abs=0.03)
    assert int(masked.max()) < vocab


def test_mask_tokens_is_reproducible_and_leaves_input_alone() -> None:
    ids = torch.arange(200).reshape(4, 50) % 97 + 5
    before = ids.clone()
    special = torch.zeros_like(ids, dtype=torch.bool)
    a = mask_tokens(
        ids,
        mask_token_id=1,
        vocab_size=100,
        special_mask=special,
        probability=0.3,
        generator=torch.Generator().manual_seed(7),
    )
    b = mask_tokens(
        ids,
        mask_token_id=1,
        vocab_size=100,
        special_mask=special,
        probability=0.3,
        generator=torch.Generator().manual_seed(7),
    )
    assert torch.equal(a[0], b[0])
    assert torch.equal(a[1], b[1])
    assert torch.equal(ids, before)


def test_mask_tokens_rejects_bad_probability() -> None:
    ids = torch.ones(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="maskProbability"):
        mask_tokens(
            ids,
            mask_token_id=1,
            vocab_size=10,
            special_mask=torch.zeros_like(ids, dtype=torch.bool),
            probability=1.0,
            generator=None,
        )


# --------------------------------------------------------------------------- L2-SP


class _Backbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(3, 2)
        self.norm = nn.LayerNorm(2)
        self.classifier = nn.Linear(2, 2)


def test_l2sp_penalty_equals_hand_sum_of_squares() -> None:
    theta = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([[0.5, -1.0], [3.0, 0.0]])}
    anchors = {"a": torch.tensor([0.0, 1.0]), "b": torch.tensor([[0.5, 0.0], [1.0, 0.0]])}
    # (1² + 1²) + (0² + 1² + 2² + 0²) = 2 + 5
    assert l2sp_penalty(theta.items(), anchors).item() == pytest.approx(7.0)
    # Names not anchored do not count.
    assert l2sp_penalty([*theta.items(), ("c", torch.ones(3))], anchors).item() == pytest.approx(7.0)
    assert l2sp_penalty(theta.items(), {}).item() == 0.0


def test_l2sp_gradient_points_away_from_pretrained_so_descent_moves_toward_it() -> None:
    model = _Backbone()
    anchors = snapshot_anchors(model, new_parameter_names={"classifier.weight", "classifier.bias"})
    assert set(anchors) == {"encoder.weight", "encoder.bias", "norm.weight", "norm.bias"}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    penalty = l2sp_penalty(model.named_parameters(), anchors)
    penalty.backward()
    params = dict(model.named_parameters())
    for name, anchor in anchors.items():
        p = params[name]
        assert p.grad is not None
        # ∇ = 2(θ − θ₀): −∇ points from θ toward θ₀.
        torch.testing.assert_close(p.grad, 2 * (p.detach() - anchor))
    assert params["classifier.weight"].grad is None

    distance_before = math.sqrt(penalty.item())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(5):
        optimizer.zero_grad()
        l2sp_penalty(model.named_parameters(), anchors).backward()
        optimizer.step()
    distance_after = math.sqrt(l2sp_penalty(model.named_parameters(), anchors).item())
    # Each step scales θ − θ₀ by (1 − 2·lr) = 0.8.
    assert distance_after == pytest.approx(distance_before * 0.8**5, rel=1e-4)


def test_l2sp_under_adamw_moves_parameters_toward_anchor() -> None:
    model = _Backbone()
    anchors = snapshot_anchors(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    before = l2sp_penalty(model.named_parameters(), anchors).item()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.0)
    for _ in range(3):
        optimizer.zero_grad()
        l2sp_penalty(model.named_parameters(), anchors).backward()
        optimizer.step()
    assert l2sp_penalty(model.named_parameters(), anchors).item() < before


def test_snapshot_anchors_are_detached_copies_of_trainable_pretrained_weights() -> None:
    model = _Backbone()
    model.norm.weight.requires_grad_(False)
    anchors = snapshot_anchors(model, new_parameter_names=["classifier.weight", "classifier.bias"])
    assert "norm.weight" not in anchors  # frozen: it cannot move
    assert not any(a.requires_grad for a in anchors.values())
    before = anchors["encoder.weight"].clone()
    with torch.no_grad():
        model.encoder.weight.add_(1.0)
    assert torch.equal(anchors["encoder.weight"], before)


def test_snapshot_anchors_skip_strategy_parameters_and_match_peft_prefixed_names() -> None:
    from peft import LoraConfig, get_peft_model

    base = nn.Sequential()
    base.add_module("encoder", nn.Linear(4, 4))
    base.add_module("classifier", nn.Linear(4, 2))
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["encoder"], modules_to_save=["classifier"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable)
    anchors = snapshot_anchors(model, new_parameter_names={"classifier.weight", "classifier.bias"})
    # LoRA matrices are new, the classifier is new (also in its modules_to_save copy): nothing pretrained trains.
    assert anchors == {}


def test_l2sp_rejects_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="shape"):
        l2sp_penalty([("w", torch.zeros(2))], {"w": torch.zeros(3)})


def test_l2sp_rejects_zero3_partitioned_parameters() -> None:
    p = nn.Parameter(torch.zeros(0))
    p.ds_id = 0  # how DeepSpeed ZeRO-3 marks a partitioned parameter
    with pytest.raises(ValueError, match="ZeRO-3"):
        l2sp_penalty([("w", p)], {"w": torch.zeros(0)})


# --------------------------------------------------------------------------- combination


def test_lambda_zero_reduces_to_plain_cross_entropy() -> None:
    logits = torch.tensor([[1.0, -0.5], [0.2, 0.7]])
    labels = torch.tensor([1, 0])
    task = task_loss(logits, labels, label_smoothing=0.0)
    breakdown = combine_losses(task, auxiliary=torch.tensor(3.0), aux_weight=0.0, l2sp=torch.tensor(9.0))
    assert torch.equal(breakdown.total, F.cross_entropy(logits, labels))
    assert breakdown.auxiliary.item() == 3.0  # still reported
    assert breakdown.l2sp.item() == 9.0


def test_combine_losses_weights_each_component_and_reports_them_unweighted() -> None:
    task = torch.tensor(0.5, requires_grad=True)
    aux = torch.tensor(2.0, requires_grad=True)
    reg = torch.tensor(4.0, requires_grad=True)
    b = combine_losses(task, auxiliary=aux, aux_weight=0.1, l2sp=reg, l2sp_weight=0.01)
    assert b.total.item() == pytest.approx(0.5 + 0.1 * 2.0 + 0.01 * 4.0)
    assert b.as_floats() == pytest.approx({"total": 0.74, "task": 0.5, "auxiliary": 2.0, "l2sp": 4.0})
    b.total.backward()
    assert aux.grad.item() == pytest.approx(0.1)
    assert reg.grad.item() == pytest.approx(0.01)
    assert task.grad.item() == pytest.approx(1.0)
    assert not b.task.requires_grad


def test_combine_losses_absent_terms_are_zero_and_breakdown_is_frozen() -> None:
    b = combine_losses(torch.tensor(1.25))
    assert b.as_floats() == {"total": 1.25, "task": 1.25, "auxiliary": 0.0, "l2sp": 0.0}
    with pytest.raises(AttributeError):
        b.total = torch.tensor(0.0)  # type: ignore[misc]
    assert isinstance(b, LossBreakdown)


def test_combine_losses_rejects_weight_without_term() -> None:
    with pytest.raises(ValueError, match="auxiliary"):
        combine_losses(torch.tensor(1.0), aux_weight=0.5)
    with pytest.raises(ValueError, match="L2-SP"):
        combine_losses(torch.tensor(1.0), l2sp_weight=0.5)


# --------------------------------------------------------------------------- weight decay groups


def _tiny_bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=100, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, num_labels=3
    )
    return BertForSequenceClassification(config)


def test_param_groups_bert_no_decay_on_biases_and_layernorms() -> None:
    model = _tiny_bert()
    groups = param_groups(model, 0.01)
    decay = next(g for g in groups if g["weight_decay"] == 0.01)
    no_decay = next(g for g in groups if g["weight_decay"] == 0.0)
    assert all(n.endswith("bias") or "LayerNorm" in n for n in no_decay["names"])
    assert "bert.embeddings.LayerNorm.weight" in no_decay["names"]
    assert "bert.encoder.layer.0.attention.output.LayerNorm.weight" in no_decay["names"]
    assert "classifier.bias" in no_decay["names"]
    assert "bert.embeddings.word_embeddings.weight" in decay["names"]
    assert "classifier.weight" in decay["names"]
    assert not any(n.endswith("bias") or "LayerNorm" in n for n in decay["names"])
    # Every trainable parameter exactly once, params aligned with names.
    named = dict(model.named_parameters())
    listed = decay["names"] + no_decay["names"]
    assert sorted(listed) == sorted(named)
    for g in groups:
        assert all(p is named[n] for p, n in zip(g["params"], g["names"], strict=True))


def test_param_groups_rms_norm_and_custom_norm_classes() -> None:
    class LlamaLikeRMSNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(4))

    model = nn.Module()
    model.proj = nn.Linear(4, 4, bias=False)
    model.rms = nn.RMSNorm(4)
    model.custom = LlamaLikeRMSNorm()
    assert no_decay_parameter_names(model) == {"rms.weight", "custom.weight"}


def test_param_groups_only_trainable_and_no_empty_groups() -> None:
    model = _tiny_bert()
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("classifier.weight"))
    groups = param_groups(model, 0.1)
    assert len(groups) == 1
    assert groups[0]["names"] == ["classifier.weight"]
    assert groups[0]["weight_decay"] == 0.1


@settings(max_examples=30, deadline=None)
@given(
    layers=st.lists(
        st.tuples(st.sampled_from(["linear", "linear_nobias", "layernorm", "rmsnorm", "embedding"]), st.booleans()),
        min_size=1,
        max_size=6,
    ),
    wd=st.floats(0.0, 1.0),
)
def test_param_groups_property_partition(layers: list[tuple[str, bool]], wd: float) -> None:
    model = nn.Sequential()
    for i, (kind, trainable) in enumerate(layers):
        module = {
            "linear": lambda: nn.Linear(3, 3),
            "linear_nobias": lambda: nn.Linear(3, 3, bias=False),
            "layernorm": lambda: nn.LayerNorm(3),
            "rmsnorm": lambda: nn.RMSNorm(3),
            "embedding": lambda: nn.Embedding(5, 3),
        }[kind]()
        module.requires_grad_(trainable)
        model.add_module(f"m{i}_{kind}", module)
    groups = param_groups(model, wd)
    named = dict(model.named_parameters())
    seen = [n for g in groups for n in g["names"]]
    assert len(seen) == len(set(seen))
    assert set(seen) == {n for n, p in named.items() if p.requires_grad}
    assert all(g["params"] for g in groups)
    for g in groups:
        for n in g["names"]:
            exempt = n.endswith("bias") or "norm" in n
            assert g["weight_decay"] == (0.0 if exempt else wd)


def test_param_groups_rejects_negative_decay() -> None:
    with pytest.raises(ValueError, match="weightDecay"):
        param_groups(nn.Linear(2, 2), -0.1)


def test_adamw_with_param_groups_does_not_decay_biases() -> None:
    # With zero gradients AdamW changes a parameter only through weight decay.
    model = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(param_groups(model, 0.5), lr=0.1)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    after = dict(model.named_parameters())
    torch.testing.assert_close(after["0.weight"].detach(), before["0.weight"] * (1 - 0.1 * 0.5))
    for name in ("0.bias", "1.weight", "1.bias"):
        assert torch.equal(after[name].detach(), before[name])


# --------------------------------------------------------------------------- dropout


def test_apply_dropout_override_sets_existing_fields_and_model_uses_them() -> None:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
    changed = apply_dropout_override(config, 0.3)
    assert {"hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout"} <= set(changed)
    assert "resid_pdrop" not in changed  # a GPT-2 field BERT does not have
    assert config.hidden_dropout_prob == 0.3
    assert config.attention_probs_dropout_prob == 0.3
    assert config.classifier_dropout == 0.3
    model = BertForSequenceClassification(config)
    probs = {m.p for m in model.modules() if isinstance(m, nn.Dropout)}
    assert probs == {0.3}


def test_apply_dropout_override_gpt2_fields_and_none_is_a_no_op() -> None:
    from transformers import GPT2Config

    config = GPT2Config(n_layer=1, n_embd=8, n_head=2)
    original = config.resid_pdrop
    assert apply_dropout_override(config, None) == []
    assert config.resid_pdrop == original
    changed = apply_dropout_override(config, 0.0)
    assert {"resid_pdrop", "embd_pdrop", "attn_pdrop"} <= set(changed)
    assert config.attn_pdrop == 0.0
    with pytest.raises(ValueError, match="dropout"):
        apply_dropout_override(config, 1.0)
