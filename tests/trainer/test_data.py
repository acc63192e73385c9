"""Data reading, validation, tokenization and the resumable sampler (no processes)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kubetune_trainer.data import (
    IGNORE_INDEX,
    LengthGroupedSampler,
    collate,
    encode_records,
    eval_shards,
    read_records,
)
from kubetune_trainer.errors import InvalidData
from kubetune_trainer.spec import DatasetSpec, ModelSpec, Task


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    from tests.support.tiny_models import write_tokenizer

    directory = tmp_path_factory.mktemp("tokenizer")
    write_tokenizer(directory)
    return AutoTokenizer.from_pretrained(str(directory))


def test_token_labels_go_to_the_first_sub_token(tokenizer) -> None:  # type: ignore[no-untyped-def]
    model = ModelSpec(source="file:///m", task=Task.TOKEN_CLASSIFICATION, labels=["O", "B-PER", "B-LOC"])
    dataset = DatasetSpec(train="t.jsonl", text_field="tokens", label_field="tags")
    rows = [(1, {"tokens": ["alice", "visiteds", "paris"], "tags": ["B-PER", "O", "B-LOC"]})]
    (example,) = encode_records(rows, tokenizer=tokenizer, model=model, dataset=dataset, display="t.jsonl")
    words = tokenizer(["alice", "visiteds", "paris"], is_split_into_words=True).word_ids()
    assert len(example.labels) == len(words)
    assert words.count(1) == 2  # "visiteds" is split into two sub-tokens
    expected = []
    previous = None
    for w in words:
        expected.append(IGNORE_INDEX if w is None or w == previous else [1, 0, 2][w])
        previous = w
    assert example.labels == expected


def test_prompt_response_puts_the_loss_on_the_response(tokenizer) -> None:  # type: ignore[no-untyped-def]
    model = ModelSpec(source="file:///m", task=Task.CAUSAL_LM)
    dataset = DatasetSpec(train="t.jsonl", prompt_field="prompt", response_field="response")
    rows = [(1, {"prompt": "the film was", "response": "good"})]
    (example,) = encode_records(rows, tokenizer=tokenizer, model=model, dataset=dataset, display="t.jsonl")
    supervised = [t for t, y in zip(example.input_ids, example.labels, strict=True) if y != IGNORE_INDEX]
    assert tokenizer.decode(supervised) == "good [SEP]"
    assert example.labels[: len(example.labels) - 2] == [IGNORE_INDEX] * (len(example.labels) - 2)


def test_errors_name_file_line_and_field(tmp_path: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    model = ModelSpec(source="file:///m", task=Task.SEQUENCE_CLASSIFICATION, num_labels=2)
    dataset = DatasetSpec(train="t.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": 0}\n{"text": "b", "label": 7}\n')
    records = read_records(bad, fmt="jsonl", display="s3://b/bad.jsonl")
    with pytest.raises(InvalidData, match=r"s3://b/bad.jsonl line 2: label value 7 is not in 0..1"):
        encode_records(records, tokenizer=tokenizer, model=model, dataset=dataset, display="s3://b/bad.jsonl")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "a", "label": 0}\n{"text": \n')
    with pytest.raises(InvalidData, match=r"broken.jsonl line 2: invalid JSON"):
        read_records(broken, fmt="jsonl", display=str(broken))


def test_csv_with_a_utf8_bom_keeps_its_first_column_name(tmp_path: Path) -> None:
    # Excel's "CSV UTF-8" and PowerShell's Export-Csv write a byte-order mark before the header.
    path = tmp_path / "excel.csv"
    path.write_bytes(b"\xef\xbb\xbftext,label\r\ngreat film,1\r\n")
    assert read_records(path, fmt="csv", display="excel.csv") == [(2, {"text": "great film", "label": "1"})]


def test_csv_rows_are_numbered_by_the_line_they_start_on(tmp_path: Path) -> None:
    # A quoted field may hold newlines, and blank lines are skipped: neither may shift the line numbers
    # that error messages name.
    path = tmp_path / "multi.csv"
    path.write_text('text,label\n"two\nlines",1\n\nafter,0\nlast,1\n')
    assert [number for number, _row in read_records(path, fmt="csv", display="multi.csv")] == [2, 5, 6]


def test_parquet_rows_are_read(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["a", "b"], "label": [0, 1]}), path)
    assert read_records(path, fmt="parquet", display="d") == [
        (1, {"text": "a", "label": 0}),
        (2, {"text": "b", "label": 1}),
    ]


def test_sampler_is_deterministic_disjoint_and_length_grouped() -> None:
    lengths = [(i * 7) % 23 + 1 for i in range(100)]
    ranks = [LengthGroupedSampler(lengths, 4, 2, r, seed=3, group_factor=3) for r in (0, 1)]
    assert ranks[0].batches_per_epoch() == ranks[1].batches_per_epoch() == 13
    for epoch in (0, 1):
        a, b = ranks[0].epoch_batches(epoch).tolist(), ranks[1].epoch_batches(epoch).tolist()
        assert a == LengthGroupedSampler(lengths, 4, 2, 0, seed=3, group_factor=3).epoch_batches(epoch).tolist()
        seen = [i for batch in a + b for i in batch]
        assert set(seen) == set(range(100))  # every example, wrapped to fill the last global batch
        # Within a global batch the lengths are close (sorted windows).
        for x, y in zip(a, b, strict=True):
            spread = max(lengths[i] for i in x + y) - min(lengths[i] for i in x + y)
            assert spread <= 22
    assert ranks[0].epoch_batches(0).tolist() != ranks[0].epoch_batches(1).tolist()
    # A million examples: a few bytes each, not a Python object each.
    big = LengthGroupedSampler(np.arange(1_000_000) % 500 + 1, 8, 4, 3, seed=1)
    batches = big.epoch_batches(0)
    assert batches.shape == (31_250, 8)
    assert batches.dtype == np.int64


def test_eval_shards_pad_every_rank_to_the_same_batch_count() -> None:
    shards = [eval_shards(5, micro_batch_size=2, world_size=2, rank=r) for r in (0, 1)]
    assert [len(s) for s in shards] == [2, 2]
    real = sorted(i for s in shards for batch in s for i in batch if i >= 0)
    assert real == [0, 1, 2, 3, 4]


def test_collate_pads_dynamically(tokenizer) -> None:  # type: ignore[no-untyped-def]
    from kubetune_trainer.data import Example

    batch = collate([Example([2, 5, 3], 1), Example([2, 3], 0)], pad_id=0, task=Task.SEQUENCE_CLASSIFICATION)
    assert batch["input_ids"].tolist() == [[2, 5, 3], [2, 3, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [1, 0]
    lm = collate([Example([2, 5, 3], None), Example([2, 3], None)], pad_id=0, task=Task.CAUSAL_LM)
    assert lm["labels"].tolist() == [[2, 5, 3], [2, 3, IGNORE_INDEX]]
    json.dumps(batch["input_ids"].tolist())
