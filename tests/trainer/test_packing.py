"""``dataset.packing``: rows of several documents that behave exactly like the documents alone.

Semantics on real transformers models (tiny Llama with RoPE and grouped-query
attention, tiny GPT-2 with learned positions), with both attention kernels that
run on CPUs: each document's loss in a packed row equals its loss alone (within
1e-5), and no token attends across a document boundary (changing one document
leaves the others' logits untouched).
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from kubetune_trainer.data import IGNORE_INDEX, Example
from kubetune_trainer.packing import collate_packed, pack, row_lengths
from kubetune_trainer.trainingdata import arrange
from tests.support.tiny_models import tiny_llama, vocab_size


@given(st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=200), st.integers(64, 200))
@settings(max_examples=200, deadline=None)
def test_pack_places_every_example_once_within_capacity(lengths: list[int], capacity: int) -> None:
    rows = pack(lengths, capacity)
    placed = sorted(i for row in rows for i in row)
    assert placed == list(range(len(lengths)))
    assert all(0 < total <= capacity for total in row_lengths(rows, lengths))
    # First-fit decreasing wastes little: at most one row is less than half full.
    assert sum(1 for total in row_lengths(rows, lengths) if total <= capacity // 2) <= 1
    assert pack(lengths, capacity) == rows  # deterministic


def test_pack_rejects_an_example_longer_than_a_row() -> None:
    with pytest.raises(ValueError, match="more than the row capacity"):
        pack([3, 9], 8)


def test_collate_packed_restarts_positions_and_ignores_each_documents_first_label() -> None:
    a, b = Example([5, 6, 7], None), Example([8, 9], [IGNORE_INDEX, 9])  # b: a prompt/response row
    batch = collate_packed([[a, b], [Example([4], None)]], pad_id=0, flatten=False)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [4, 0, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 0, 1, 2, 3]]  # padding: its own document
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9], [-100, -100, -100, -100, -100]]
    assert "attention_mask" not in batch  # boundaries come from the positions
    flat = collate_packed([[a, b], [Example([4], None)]], pad_id=0, flatten=True)
    assert flat["input_ids"].tolist() == [[5, 6, 7, 8, 9, 4]]
    assert flat["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0]]


def test_arrange_packs_rows_and_reports_their_lengths() -> None:
    examples = [Example(list(range(1, n + 1)), None) for n in (5, 3, 6, 2, 4)]
    data = arrange(examples, [], packing=True, max_length=8)
    assert sorted(len(e.input_ids) for row in data.items for e in row) == [2, 3, 4, 5, 6]
    assert data.item_lengths == [sum(len(e.input_ids) for e in row) for row in data.items]
    assert all(length <= 8 for length in data.item_lengths)
    plain = arrange(examples, [], packing=False, max_length=8)
    assert plain.items == examples


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("llama") / "llama")


def _documents(seed: int) -> list[Example]:
    rng = random.Random(seed)  # noqa: S311 (test data, not security)
    return [Example([rng.randrange(5, vocab_size()) for _ in range(rng.randint(2, 11))], None) for _ in range(9)]


def _per_document_losses(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> list[float]:
    """Summed next-token loss of each document, in order, from one forward of ``batch``."""
    with torch.no_grad():
        logits = model(
            input_ids=batch["input_ids"], position_ids=batch.get("position_ids"), use_cache=False
        ).logits.double()
    losses: list[float] = []
    for row in range(logits.shape[0]):
        positions = batch["position_ids"][row].tolist() if "position_ids" in batch else None
        labels = batch["labels"][row]
        token_losses = torch.nn.functional.cross_entropy(
            logits[row, :-1], labels[1:], ignore_index=IGNORE_INDEX, reduction="none"
        )
        starts = [i for i, p in enumerate(positions) if p == 0] if positions else [0]
        ends = [*starts[1:], len(labels)]
        for start, end in zip(starts, ends, strict=True):
            if bool((labels[start:end] != IGNORE_INDEX).any()):
                # token_losses[t] scores labels[t + 1]: the document's targets are start+1 .. end-1
                losses.append(float(token_losses[start : end - 1].sum()))
    return losses


def _alone(model: torch.nn.Module, documents: list[Example]) -> list[float]:
    losses = []
    for doc in documents:
        ids = torch.tensor([doc.input_ids])
        with torch.no_grad():
            logits = model(input_ids=ids).logits.double()
        losses.append(float(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")))
    return losses


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("backbone", ["llama", "gpt2"])
@pytest.mark.parametrize("flatten", [False, True], ids=["rows", "flattened"])
def test_packed_rows_give_each_document_its_unpacked_loss(
    request: pytest.FixtureRequest,
    tiny_backbones: dict[str, Path],
    backbone: str,
    attention: str,
    flatten: bool,
) -> None:
    path = request.getfixturevalue("llama") if backbone == "llama" else tiny_backbones["gpt2"]
    model = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation=attention).eval()
    documents = _documents(seed=11)
    rows = pack([len(d.input_ids) for d in documents], 24)
    assert any(len(row) > 1 for row in rows)  # the test packs for real
    packed_documents = [[documents[i] for i in row] for row in rows]
    batch = collate_packed(packed_documents, pad_id=0, flatten=flatten)
    order = [i for row in rows for i in row]
    alone = _alone(model, documents)
    packed = _per_document_losses(model, batch)
    assert len(packed) == len(documents)
    for got, index in zip(packed, order, strict=True):
        assert got == pytest.approx(alone[index], abs=1e-5, rel=1e-5)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_no_token_attends_across_a_document_boundary(llama: Path, attention: str) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(llama, attn_implementation=attention).eval()
    first, second = Example([11, 12, 13, 14], None), Example([21, 22, 23], None)
    changed_first = Example([31, 32, 33, 34], None)
    outputs = []
    for head in (first, changed_first):
        batch = collate_packed([[head, second]], pad_id=0, flatten=False)
        with torch.no_grad():
            outputs.append(
                model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
            )
    before, after = outputs
    assert not torch.allclose(before[0, :4], after[0, :4])  # the first document's own logits changed
    torch.testing.assert_close(before[0, 4:], after[0, 4:], rtol=0, atol=1e-6)  # the second's did not
