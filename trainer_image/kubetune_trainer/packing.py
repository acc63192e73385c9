"""Padding-free packing of causal-LM examples (``dataset.packing``).

Several tokenized examples share one row of at most ``maxLength`` tokens.
Each keeps its own ``position_ids`` (0, 1, 2, … from its first token), which
is how transformers 5 recognizes packed rows: with no ``attention_mask``, a
position that does not follow its predecessor starts a new document, and the
attention mask it builds lets a token see only earlier tokens of its own
document (sdpa and eager through a block-diagonal causal mask; flash
attention through varlen kernels, which need the whole micro-batch flattened
into one row).  It only does so without a KV cache: the trainer calls causal
LMs with ``use_cache=False``.  The first label of every document is ignored, so no loss
term ever predicts one document's first token from the end of another: the
per-document losses are those of unpacked rows.

Packing is done once per dataset (first-fit decreasing, deterministic), and
the packed rows are what the sampler shuffles each epoch, so the number of
batches per epoch — and with it ``totalSteps`` — is known before training.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

from kubetune_trainer.data import IGNORE_INDEX, Example


def pack(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Group example indices into rows of at most ``capacity`` tokens (first-fit decreasing).

    Longest examples first, each into the fullest row that still has room (ties: the
    oldest row); a new row when none has.  Pure and deterministic; rows keep their
    examples in placement order.  Every example must fit on its own.
    """
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    # Rows by their free space: sorted distinct free sizes, and for each size the rows (oldest first).
    free_sizes: list[int] = []
    rows_with_free: dict[int, list[int]] = {}
    for index in order:
        need = lengths[index]
        if need > capacity:
            raise ValueError(f"example {index} has {need} tokens, more than the row capacity {capacity}")
        at = bisect.bisect_left(free_sizes, need)
        if at < len(free_sizes):
            free = free_sizes[at]
            candidates = rows_with_free[free]
            row = candidates.pop(0)
            if not candidates:
                del rows_with_free[free]
                free_sizes.pop(at)
        else:
            row, free = len(rows), capacity
            rows.append([])
        rows[row].append(index)
        left = free - need
        if left > 0:
            if left not in rows_with_free:
                bisect.insort(free_sizes, left)
                rows_with_free[left] = []
            bisect.insort(rows_with_free[left], row)
    return rows


def row_lengths(rows: Sequence[Sequence[int]], lengths: Sequence[int]) -> list[int]:
    """Tokens per packed row."""
    return [sum(lengths[i] for i in row) for row in rows]


def _document_labels(example: Example) -> list[int]:
    # Plain text: every token is a target; prompt/response rows carry their own labels.
    labels = list(example.labels) if isinstance(example.labels, list) else list(example.input_ids)
    labels[0] = IGNORE_INDEX  # predicted from the previous document's last token: never a target
    return labels


def collate_packed(rows: Sequence[Sequence[Example]], *, pad_id: int, flatten: bool) -> dict[str, Any]:
    """Packed rows as model inputs: ``input_ids``, ``position_ids`` and ``labels`` (no ``attention_mask``).

    ``flatten`` puts the whole micro-batch in one row (what flash attention's varlen
    path needs); otherwise rows are padded to the longest, the padding being a
    document of its own whose labels are ignored.
    """
    import torch

    flat_rows: list[tuple[list[int], list[int], list[int]]] = []
    for row in rows:
        ids: list[int] = []
        positions: list[int] = []
        labels: list[int] = []
        for example in row:
            ids += example.input_ids
            positions += range(len(example.input_ids))
            labels += _document_labels(example)
        flat_rows.append((ids, positions, labels))
    if flatten:
        merged: tuple[list[int], list[int], list[int]] = ([], [], [])
        for ids, positions, labels in flat_rows:
            for part, values in zip(merged, (ids, positions, labels), strict=True):
                part.extend(values)
        flat_rows = [merged]
    width = max(len(ids) for ids, _, _ in flat_rows)
    out_ids = torch.full((len(flat_rows), width), pad_id, dtype=torch.long)
    out_positions = torch.zeros((len(flat_rows), width), dtype=torch.long)
    out_labels = torch.full((len(flat_rows), width), IGNORE_INDEX, dtype=torch.long)
    for r, (ids, positions, labels) in enumerate(flat_rows):
        n = len(ids)
        out_ids[r, :n] = torch.tensor(ids)
        out_positions[r, :n] = torch.tensor(positions)
        out_positions[r, n:] = torch.arange(width - n)  # the padding restarts at 0: a document of its own
        out_labels[r, :n] = torch.tensor(labels)
    return {"input_ids": out_ids, "position_ids": out_positions, "labels": out_labels}
