"""Training data: examples, batches and the resumable sampler (DESIGN §4.4).

* :class:`Example` is one tokenized example (the token store builds them lazily);
* :func:`encode_records` tokenizes rows in memory (:mod:`~kubetune_trainer.encoding` does the work;
  the trainer itself goes through :mod:`~kubetune_trainer.trainingdata` and the token store);
* :class:`LengthGroupedSampler` yields each rank's micro-batches; its position
  (epoch, batch) is what checkpoints save, so a resumed run sees exactly the
  batches an uninterrupted one would.
* :func:`collate` pads a batch dynamically to its longest example.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kubetune_trainer.encoding import IGNORE_INDEX, label_names
from kubetune_trainer.errors import InvalidData
from kubetune_trainer.readers import format_of, read_records
from kubetune_trainer.spec import DatasetSpec, ModelSpec, Task

__all__ = [
    "IGNORE_INDEX",
    "Example",
    "LengthGroupedSampler",
    "collate",
    "count_tokens",
    "encode_records",
    "eval_shards",
    "infer_format",
    "label_names",
    "read_records",
]

Record = tuple[int, dict[str, Any]]  # (line number or row index, row)


@dataclass(frozen=True)
class Example:
    """One tokenized example; ``labels`` is an int (sequence) or per-token list."""

    input_ids: list[int]
    labels: int | list[int] | None
    token_type_ids: list[int] | None = None


# --------------------------------------------------------------------------- reading and encoding


def infer_format(name: str, declared: str | None) -> str:
    """The file format: the declared one, else from the extension."""
    fmt = format_of(name, declared)
    if fmt is None:
        raise InvalidData(f"{name}: cannot infer the format from the extension; set dataset.format")
    return fmt


def encode_records(
    records: list[Record], *, tokenizer: Any, model: ModelSpec, dataset: DatasetSpec, display: str
) -> list[Example]:
    """Validate and tokenize rows in memory (small data and tests); the trainer goes through the token store.

    Examples left without a trainable token after truncation are dropped; InvalidData names file, line and field.
    """
    from kubetune_trainer import chat
    from kubetune_trainer.encoding import Encoder, mode_for

    if not records:
        raise InvalidData(f"{display}: no examples (empty dataset)")
    mode = mode_for(model, dataset, records[0][1])
    template = chat.resolve_template(tokenizer, dataset.chat_template, model.source) if mode == "chat" else None
    block = Encoder(tokenizer, model, dataset, mode, template).encode(
        [(f"{display} line {number}", row) for number, row in records]
    )
    bounds = np.concatenate([[0], np.cumsum(block.lengths)])
    examples = []
    for i in range(len(block.lengths)):
        start, stop = int(bounds[i]), int(bounds[i + 1])
        labels: int | list[int] | None = None
        if block.seq_labels is not None:
            labels = int(block.seq_labels[i])
        elif block.labels is not None:
            labels = block.labels[start:stop].tolist()
        types = block.token_type_ids[start:stop].tolist() if block.token_type_ids is not None else None
        examples.append(Example(block.input_ids[start:stop].tolist(), labels, types))
    return examples


# --------------------------------------------------------------------------- batching


@dataclass
class LengthGroupedSampler:
    """Distributed, length-grouped micro-batches with a resumable position.

    Each epoch permutes the indices with a generator seeded by ``seed + epoch``, wraps them
    to a multiple of ``micro_batch_size × world_size`` (every rank gets the same number of
    batches — collectives stay in step), sorts windows of ``group_factor`` global batches by
    length, longest first (similar lengths share a batch, so padding is small), permutes the
    order of the global batches, and gives rank r the r-th slice of each.  Pure and in numpy
    (memory of a few bytes per example, whatever the dataset's size): the same arguments
    give the same batches on every run, which is what makes resume exact.
    """

    lengths: Sequence[int] | np.ndarray
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

    def epoch_batches(self, epoch: int) -> np.ndarray:
        """This rank's micro-batches for ``epoch``: a (batches × micro-batch size) array of example indices."""
        n = len(self.lengths)
        global_batch = self.micro_batch_size * self.world_size
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        total = self.batches_per_epoch() * global_batch
        order = order[np.arange(total) % n]
        if self.shuffle:
            lengths = np.asarray(self.lengths, dtype=np.int64)[order]
            window = np.arange(total) // (global_batch * self.group_factor)
            order = order[np.lexsort((-lengths, window))]  # by window, then longest first (stable)
        globals_ = order.reshape(-1, global_batch)
        if self.shuffle:
            globals_ = globals_[rng.permutation(len(globals_))]
        start = self.rank * self.micro_batch_size
        return globals_[:, start : start + self.micro_batch_size]


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
