"""Tokenize every chunk of the job's data over all the pod's cores into a token store.

Chunks go to a pool of worker processes (spawned: the parent holds torch, gloo and
metrics threads that a fork would copy mid-flight), each holding one pickled
:class:`~kubetune_trainer.encoding.Encoder`; the fast tokenizer encodes a chunk's rows
as one batch.  Results are written in chunk order, so the store is the same whatever
the number of workers.  At most a few chunks per worker are in flight, so the parent's
memory stays flat.  Small data (a few chunks) is encoded in-process.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kubetune_trainer.encoding import KEPT, STATUS_REASONS, Encoded, Encoder
from kubetune_trainer.readers import Chunk
from kubetune_trainer.tokenstore import StoreWriter

INLINE_BELOW_CHUNKS = 4
IN_FLIGHT_PER_WORKER = 3


@dataclass
class RoleCounts:
    """What tokenizing one source gave: rows read, examples kept, dropped by reason."""

    rows: int = 0
    examples: int = 0
    tokens: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATUS_REASONS.values(), 0))

    def add(self, block: Encoded) -> None:
        """Count one encoded block."""
        self.rows += len(block.status)
        self.examples += len(block.lengths)
        self.tokens += int(block.lengths.sum())
        codes, counts = np.unique(block.status, return_counts=True)
        for code, count in zip(codes.tolist(), counts.tolist(), strict=True):
            if code != KEPT:
                self.dropped[STATUS_REASONS[code]] += count

    def to_json(self) -> dict[str, Any]:
        """The counts as JSON."""
        return {"rows": self.rows, "examples": self.examples, "tokens": self.tokens, "dropped": dict(self.dropped)}


@dataclass(frozen=True)
class Progress:
    """Where tokenization is: chunks and rows done, of the chunks there are."""

    role: str
    chunks_done: int
    chunks_total: int
    rows: int
    seconds: float


_ENCODER: Encoder | None = None


def _init_worker(encoder: Encoder) -> None:
    global _ENCODER
    # The pool already uses every core; the tokenizer's own threads would only contend.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _ENCODER = encoder


def _encode_chunk(chunk: Chunk) -> Encoded:
    assert _ENCODER is not None
    return _ENCODER.encode(list(chunk.rows()))


def head(block: Encoded, rows: int) -> Encoded:
    """The part of a block that comes from its first ``rows`` rows."""
    if rows >= len(block.status):
        return block
    status = block.status[:rows]
    kept = int(np.count_nonzero(status == KEPT))
    tokens = int(block.lengths[:kept].sum())
    per_token = {"input_ids", "labels", "token_type_ids"}
    cut = {name: (values[:tokens] if name in per_token else values[:kept]) for name, values in block.arrays().items()}
    return Encoded(lengths=block.lengths[:kept], status=status, **cut)


def _results(
    encoder: Encoder, chunks: list[Chunk], workers: int, pool: ProcessPoolExecutor | None
) -> Iterator[Encoded]:
    """Encoded chunks in order (in-process, or through the pool with a bounded window)."""
    if pool is None:
        for chunk in chunks:
            yield encoder.encode(list(chunk.rows()))
        return
    window: deque[Future[Encoded]] = deque()
    pending = iter(chunks)
    try:
        for chunk in pending:
            window.append(pool.submit(_encode_chunk, chunk))
            if len(window) >= workers * IN_FLIGHT_PER_WORKER:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()
    finally:
        for future in window:
            future.cancel()


def tokenize_into(
    writer: StoreWriter,
    encoder: Encoder,
    sources: Iterable[tuple[str, list[Chunk], int | None]],
    *,
    workers: int,
    progress: Callable[[Progress], None] = lambda _: None,
) -> dict[str, RoleCounts]:
    """Encode each ``(part, chunks, row limit)`` into ``writer``; the counts by part.

    InvalidData from a worker names the first bad row in the data's order.
    """
    sources = list(sources)
    total_chunks = sum(len(chunks) for _, chunks, _ in sources)
    pool = None
    if workers > 1 and total_chunks >= INLINE_BELOW_CHUNKS:
        context = multiprocessing.get_context("spawn")
        pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(encoder,))
    counts: dict[str, RoleCounts] = {}
    started = time.monotonic()
    try:
        for part, chunks, limit in sources:
            role = counts.setdefault(part, RoleCounts())
            for done, block in enumerate(_results(encoder, chunks, workers, pool), start=1):
                if limit is not None:
                    block = head(block, limit - role.rows)
                writer.append(part, block)
                role.add(block)
                progress(Progress(part, done, len(chunks), role.rows, time.monotonic() - started))
                if limit is not None and role.rows >= limit:
                    break
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    return counts
