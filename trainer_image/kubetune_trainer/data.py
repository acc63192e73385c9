"""Training data: read, validate, tokenize, batch (DESIGN §4.4).

* :func:`read_records` reads jsonl / csv / parquet into ``(line, row)`` pairs;
  every error names the file and the line or field.
* :func:`encode_records` turns rows into token ids and labels for the task
  (token-classification labels go to the first sub-token of each word; causal-LM
  prompt/response rows put the loss on the response only).
* :class:`LengthGroupedSampler` yields each rank's micro-batches; its position
  (epoch, batch) is what checkpoints save, so a resumed run sees exactly the
  batches an uninterrupted one would.
* :func:`collate` pads a batch dynamically to its longest example.
"""

from __future__ import annotations

import csv
import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune_trainer.errors import InvalidData
from kubetune_trainer.spec import DatasetSpec, ModelSpec, Task

IGNORE_INDEX = -100
Record = tuple[int, dict[str, Any]]  # (line number or row index, row)


@dataclass(frozen=True)
class Example:
    """One tokenized example; ``labels`` is an int (sequence) or per-token list."""

    input_ids: list[int]
    labels: int | list[int] | None
    token_type_ids: list[int] | None = None


# --------------------------------------------------------------------------- reading


def infer_format(name: str, declared: str | None) -> str:
    """The file format: the declared one, else from the extension."""
    if declared:
        return declared
    lowered = name.lower()
    for ext, fmt in ((".jsonl", "jsonl"), (".json", "jsonl"), (".csv", "csv"), (".parquet", "parquet")):
        if lowered.endswith(ext):
            return fmt
    raise InvalidData(f"{name}: cannot infer the format from the extension; set dataset.format")


def read_records(path: Path, *, fmt: str, display: str) -> list[Record]:
    """Rows of a jsonl / csv / parquet file with their line numbers (1-based; csv counts the header).

    ``display`` is the name used in error messages (the URI the user wrote).
    """
    if not path.exists():
        raise InvalidData(f"{display}: file not found")
    if fmt == "jsonl":
        records: list[Record] = []
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as exc:
                    raise InvalidData(f"{display} line {number}: invalid JSON ({exc.args[0]})") from exc
                if not isinstance(row, dict):
                    raise InvalidData(f"{display} line {number}: expected a JSON object")
                records.append((number, row))
        return records
    if fmt == "csv":
        with path.open(encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle)
            return [(number, dict(row)) for number, row in enumerate(reader, start=2)]
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as exc:
            raise InvalidData(f"{display}: not a readable parquet file ({exc})") from exc
        return [(index + 1, row) for index, row in enumerate(table.to_pylist())]
    raise InvalidData(f"{display}: unsupported format {fmt!r}")


def split_validation(records: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Hold out ``fraction`` of ``records`` for validation with a seeded shuffle."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)  # noqa: S311 (seeded split, not security)
    held = max(1, round(len(records) * fraction))
    val = sorted(order[:held])
    train = sorted(order[held:])
    return [records[i] for i in train], [records[i] for i in val]


# --------------------------------------------------------------------------- labels


def label_names(model: ModelSpec) -> list[str] | None:
    """Label names in id order, or None for language models."""
    if model.labels is not None:
        return list(model.labels)
    if model.num_labels is not None:
        return [str(i) for i in range(model.num_labels)]
    return None


def _label_id(value: Any, names: list[str], *, where: str, field: str, explicit: bool) -> int:
    if isinstance(value, str) and value in names:
        return names.index(value)
    if not explicit and isinstance(value, int | str) and not isinstance(value, bool):
        try:
            index = int(value)
        except ValueError:
            index = -1
        if 0 <= index < len(names):
            return index
    allowed = f"model.labels {names}" if explicit else f"0..{len(names) - 1} (model.numLabels)"
    raise InvalidData(f"{where}: {field} value {value!r} is not in {allowed}")


# --------------------------------------------------------------------------- tokenizing


def _field(row: dict[str, Any], name: str, *, where: str, spec_field: str) -> Any:
    value = row.get(name)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise InvalidData(f"{where}: missing field {name!r} ({spec_field})")
    return value


def encode_records(
    records: list[Record], *, tokenizer: Any, model: ModelSpec, dataset: DatasetSpec, display: str
) -> list[Example]:
    """Validate and tokenize rows for the task; raise :class:`InvalidData` naming file, line and field."""
    if not records:
        raise InvalidData(f"{display}: no examples (empty dataset)")
    names = label_names(model)
    explicit = model.labels is not None
    examples: list[Example] = []
    for number, row in records:
        where = f"{display} line {number}"
        examples.append(_encode_one(row, where, tokenizer, model, dataset, names, explicit))
    return examples


def _encode_one(
    row: dict[str, Any],
    where: str,
    tokenizer: Any,
    model: ModelSpec,
    dataset: DatasetSpec,
    names: list[str] | None,
    explicit: bool,
) -> Example:
    max_length = dataset.max_length
    if model.task == Task.SEQUENCE_CLASSIFICATION:
        assert names is not None
        text = str(_field(row, dataset.text_field, where=where, spec_field="dataset.textField"))
        pair = None
        if dataset.text_pair_field:
            pair = str(_field(row, dataset.text_pair_field, where=where, spec_field="dataset.textPairField"))
        if dataset.label_field not in row or row[dataset.label_field] is None:
            raise InvalidData(f"{where}: missing field {dataset.label_field!r} (dataset.labelField)")
        label = _label_id(row[dataset.label_field], names, where=where, field=dataset.label_field, explicit=explicit)
        enc = tokenizer(text, pair, truncation=True, max_length=max_length)
        return Example(list(enc["input_ids"]), label, _token_types(enc))
    if model.task == Task.TOKEN_CLASSIFICATION:
        assert names is not None
        words = _field(row, dataset.text_field, where=where, spec_field="dataset.textField")
        tags = row.get(dataset.label_field)
        if tags is None:
            raise InvalidData(f"{where}: missing field {dataset.label_field!r} (dataset.labelField)")
        if isinstance(words, str):
            words = words.split()
        if isinstance(tags, str):
            tags = tags.split()
        if len(words) != len(tags):
            raise InvalidData(
                f"{where}: {dataset.text_field!r} has {len(words)} words but {dataset.label_field!r} "
                f"has {len(tags)} tags"
            )
        tag_ids = [_label_id(tag, names, where=where, field=dataset.label_field, explicit=explicit) for tag in tags]
        enc = tokenizer([str(w) for w in words], is_split_into_words=True, truncation=True, max_length=max_length)
        labels: list[int] = []
        previous: int | None = None
        for word_id in enc.word_ids():
            # Only the first sub-token of a word carries its tag; the rest and specials are ignored.
            labels.append(IGNORE_INDEX if word_id is None or word_id == previous else tag_ids[word_id])
            previous = word_id
        return Example(list(enc["input_ids"]), labels, _token_types(enc))
    if model.task == Task.CAUSAL_LM and dataset.prompt_field:
        assert dataset.response_field is not None
        prompt = str(_field(row, dataset.prompt_field, where=where, spec_field="dataset.promptField"))
        response = str(_field(row, dataset.response_field, where=where, spec_field="dataset.responseField"))
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        prompt_ids = ([bos] if bos is not None else []) + tokenizer(prompt, add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
        ids = (prompt_ids + response_ids)[:max_length]
        labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_length]
        return Example(ids, labels)
    # causal-lm plain text, masked-lm: labels are derived from the ids at collate time.
    text = str(_field(row, dataset.text_field, where=where, spec_field="dataset.textField"))
    enc = tokenizer(text, truncation=True, max_length=max_length)
    return Example(list(enc["input_ids"]), None, _token_types(enc))


def _token_types(enc: Any) -> list[int] | None:
    value = enc.get("token_type_ids") if hasattr(enc, "get") else None
    return list(value) if value is not None else None


# --------------------------------------------------------------------------- batching


@dataclass
class LengthGroupedSampler:
    """Distributed, length-grouped micro-batches with a resumable position.

    Each epoch shuffles the indices with ``seed + epoch``, wraps them to a
    multiple of ``micro_batch_size × world_size`` (every rank gets the same
    number of batches — collectives stay in step), sorts windows of
    ``group_factor`` global batches by length (similar lengths share a batch,
    so padding is small), shuffles the order of the global batches, and gives
    rank r the r-th slice of each.  Pure: the same arguments give the same
    batches on every run, which is what makes resume exact.
    """

    lengths: Sequence[int]
    micro_batch_size: int
    world_size: int
    rank: int
    seed: int
    shuffle: bool = True
    group_factor: int = 50

    def batches_per_epoch(self) -> int:
        """Micro-batches per rank per epoch."""
        global_batch = self.micro_batch_size * self.world_size
        return max(1, math.ceil(len(self.lengths) / global_batch))

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's micro-batches (lists of example indices) for ``epoch``."""
        n = len(self.lengths)
        global_batch = self.micro_batch_size * self.world_size
        rng = random.Random(self.seed + epoch)  # noqa: S311 (seeded sampler, not security)
        order = list(range(n))
        if self.shuffle:
            rng.shuffle(order)
        total = self.batches_per_epoch() * global_batch
        order = [order[i % n] for i in range(total)]
        if self.shuffle:
            window = global_batch * self.group_factor
            grouped: list[int] = []
            for start in range(0, total, window):
                chunk = order[start : start + window]
                grouped.extend(sorted(chunk, key=lambda i: -self.lengths[i]))
            order = grouped
        globals_ = [order[i : i + global_batch] for i in range(0, total, global_batch)]
        if self.shuffle:
            rng.shuffle(globals_)
        start = self.rank * self.micro_batch_size
        return [g[start : start + self.micro_batch_size] for g in globals_]


def eval_shards(n: int, *, micro_batch_size: int, world_size: int, rank: int) -> list[list[int]]:
    """This rank's evaluation batches: a strided shard, padded so every rank runs as many batches.

    Entries ``-1`` mark padding slots (their outputs are discarded); ZeRO-3
    needs every rank in every forward, so ranks with fewer examples still run.
    """
    mine = list(range(rank, n, world_size))
    per_rank = math.ceil(n / world_size)
    batches = max(1, math.ceil(per_rank / micro_batch_size))
    padded = mine + [-1] * (batches * micro_batch_size - len(mine))
    return [padded[i : i + micro_batch_size] for i in range(0, len(padded), micro_batch_size)]


def collate(examples: Sequence[Example], *, pad_id: int, task: Task) -> dict[str, Any]:
    """Pad a batch to its longest example; returns torch tensors ready for the model."""
    import torch

    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    has_types = all(e.token_type_ids is not None for e in examples)
    types = torch.zeros((len(examples), width), dtype=torch.long)
    token_labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    seq_labels = torch.zeros(len(examples), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        mask[row, :n] = 1
        if has_types and e.token_type_ids is not None:
            types[row, :n] = torch.tensor(e.token_type_ids)
        if isinstance(e.labels, int):
            seq_labels[row] = e.labels
        elif isinstance(e.labels, list):
            token_labels[row, : len(e.labels)] = torch.tensor(e.labels)
        elif task == Task.CAUSAL_LM:
            token_labels[row, :n] = ids[row, :n]
    batch: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
    if has_types:
        batch["token_type_ids"] = types
    if task == Task.SEQUENCE_CLASSIFICATION:
        batch["labels"] = seq_labels
    elif task in (Task.TOKEN_CLASSIFICATION, Task.CAUSAL_LM):
        batch["labels"] = token_labels
    return batch


def count_tokens(batch: dict[str, Any]) -> int:
    """Non-padding tokens in a collated batch."""
    return int(batch["attention_mask"].sum().item())
