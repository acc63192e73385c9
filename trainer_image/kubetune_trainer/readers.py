"""Rows of local data, cut into chunks that tokenizing processes read on their own.

A chunk is a small picklable description of a part of one file (or of a ``datasets``
Arrow table): a worker process reads its rows itself, so the parent never holds the
data.  Chunks keep the source's order; every row comes with where it is
(``FILE line N`` for jsonl and csv, ``FILE row N`` for parquet and Arrow) for the
error messages.

* jsonl: byte ranges of about :data:`CHUNK_BYTES` cut at line ends (one pass over the file);
* csv: parsed in the parent (quoted fields may hold newlines), cut every :data:`CHUNK_ROWS` rows;
* parquet: row groups, or slices of a large one;
* Arrow (Hugging Face datasets, ``save_to_disk`` folders): row ranges of the memory-mapped table.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune_trainer.errors import InvalidData

CHUNK_BYTES = 1 << 20
CHUNK_ROWS = 2000
FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}
Row = tuple[str, dict[str, Any]]


def format_of(name: str, declared: str | None) -> str | None:
    """The file format: the declared one, else from the extension (None when it has no known one)."""
    if declared:
        return declared
    lowered = name.lower()
    for ext, fmt in FORMATS.items():
        if lowered.endswith(ext):
            return fmt
    return None


@dataclass(frozen=True)
class JsonlChunk:
    """Lines ``[start, end)`` (bytes) of a jsonl file; its first line is number ``first_line``."""

    path: Path
    display: str
    start: int
    end: int
    first_line: int

    def rows(self) -> Iterator[Row]:
        """The JSON objects of the chunk (blank lines skipped)."""
        with self.path.open("rb") as handle:
            handle.seek(self.start)
            data = handle.read(self.end - self.start)
        for number, line in enumerate(data.split(b"\n"), start=self.first_line):
            if not line.strip():
                continue
            where = f"{self.display} line {number}"
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise InvalidData(f"{where}: invalid JSON ({exc.args[0]})") from exc
            if not isinstance(row, dict):
                raise InvalidData(f"{where}: expected a JSON object")
            yield where, row


@dataclass(frozen=True)
class RowsChunk:
    """Rows already parsed (csv), with their line numbers."""

    display: str
    records: tuple[tuple[int, dict[str, Any]], ...]

    def rows(self) -> Iterator[Row]:
        """The rows of the chunk."""
        for number, row in self.records:
            yield f"{self.display} line {number}", row


@dataclass(frozen=True)
class ParquetChunk:
    """Rows ``[start, stop)`` of row group ``group`` of a parquet file; its first row has number ``first_row``."""

    path: Path
    display: str
    group: int
    start: int
    stop: int
    first_row: int

    def rows(self) -> Iterator[Row]:
        """The rows of the chunk."""
        import pyarrow.parquet as pq

        try:
            table = pq.ParquetFile(self.path).read_row_group(self.group)
        except Exception as exc:
            raise InvalidData(f"{self.display}: not a readable parquet file ({exc})") from exc
        for offset, row in enumerate(table.slice(self.start, self.stop - self.start).to_pylist()):
            yield f"{self.display} row {self.first_row + offset}", row


@dataclass(frozen=True)
class ArrowChunk:
    """Rows ``[start, stop)`` of a ``datasets.Dataset`` (pickled by reference to its memory-mapped files)."""

    dataset: Any
    display: str
    start: int
    stop: int

    def rows(self) -> Iterator[Row]:
        """The rows of the chunk."""
        table = self.dataset.with_format("arrow")[self.start : self.stop]
        for offset, row in enumerate(table.to_pylist()):
            yield f"{self.display} row {self.start + offset + 1}", row


Chunk = JsonlChunk | RowsChunk | ParquetChunk | ArrowChunk


def file_chunks(path: Path, fmt: str, display: str) -> list[Chunk]:
    """The chunks of one local file; InvalidData naming it when it is missing or unreadable."""
    if not path.is_file():
        raise InvalidData(f"{display}: file not found")
    if fmt == "jsonl":
        return _jsonl_chunks(path, display)
    if fmt == "csv":
        return _csv_chunks(path, display)
    if fmt == "parquet":
        return _parquet_chunks(path, display)
    raise InvalidData(f"{display}: unsupported format {fmt!r}")


def _jsonl_chunks(path: Path, display: str) -> list[Chunk]:
    """Byte ranges of about CHUNK_BYTES ending at line ends; lines counted in C (``bytes.count``)."""
    chunks: list[Chunk] = []
    start, first = 0, 1
    with path.open("rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        while size - start > CHUNK_BYTES:
            handle.seek(start + CHUNK_BYTES)
            end = start + CHUNK_BYTES + len(handle.readline())  # to the end of the line under the cut
            if end >= size:
                break
            handle.seek(start)
            chunks.append(JsonlChunk(path, display, start, end, first))
            first += handle.read(end - start).count(b"\n")
            start = end
    if size > start:
        chunks.append(JsonlChunk(path, display, start, size, first))
    return chunks


def _csv_records(handle: Iterator[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """The rows of a csv file, each with the number of the line it starts on.

    A quoted field may span lines and blank lines are skipped, so rows and lines do not correspond:
    the lines the reader consumes are numbered as it reads them.
    """
    consumed: list[tuple[int, str]] = []  # (line number, line) read since the previous row

    def lines() -> Iterator[str]:
        for number, line in enumerate(handle, start=1):
            consumed.append((number, line))
            yield line

    reader = csv.DictReader(lines())
    _ = reader.fieldnames  # reads the header line
    consumed.clear()
    for row in reader:
        number = next((n for n, line in consumed if line.strip("\r\n")), consumed[0][0] if consumed else 0)
        consumed.clear()
        yield number, dict(row)


def _csv_chunks(path: Path, display: str) -> list[Chunk]:
    chunks: list[Chunk] = []
    batch: list[tuple[int, dict[str, Any]]] = []
    # utf-8-sig: a byte-order mark (Excel's "CSV UTF-8") is not part of the first column's name.
    with path.open(encoding="utf-8-sig", newline="") as handle:
        for number, row in _csv_records(handle):
            batch.append((number, row))
            if len(batch) >= CHUNK_ROWS:
                chunks.append(RowsChunk(display, tuple(batch)))
                batch = []
    if batch:
        chunks.append(RowsChunk(display, tuple(batch)))
    return chunks


def _parquet_chunks(path: Path, display: str) -> list[Chunk]:
    import pyarrow.parquet as pq

    try:
        metadata = pq.ParquetFile(path).metadata
    except Exception as exc:
        raise InvalidData(f"{display}: not a readable parquet file ({exc})") from exc
    chunks: list[Chunk] = []
    first = 1
    for group in range(metadata.num_row_groups):
        rows = metadata.row_group(group).num_rows
        # A large row group is read by several workers, each taking its slice.
        for start in range(0, rows, CHUNK_ROWS * 4):
            stop = min(rows, start + CHUNK_ROWS * 4)
            chunks.append(ParquetChunk(path, display, group, start, stop, first + start))
        first += rows
    return chunks


def arrow_chunks(dataset: Any, display: str) -> list[Chunk]:
    """Row ranges of a ``datasets.Dataset``."""
    total = len(dataset)
    return [ArrowChunk(dataset, display, s, min(total, s + CHUNK_ROWS)) for s in range(0, total, CHUNK_ROWS)]


def first_row(chunks: list[Chunk]) -> dict[str, Any] | None:
    """The first row of the first chunk that has one (to tell chat data from plain text)."""
    for chunk in chunks:
        for _, row in chunk.rows():
            return row
    return None


def read_records(path: Path, *, fmt: str, display: str) -> list[tuple[int, dict[str, Any]]]:
    """Every row of a file with its line (or row) number: for small files and tests."""
    out = []
    for chunk in file_chunks(path, fmt, display):
        for where, row in chunk.rows():
            out.append((int(where.rsplit(" ", 1)[1]), row))
    return out
