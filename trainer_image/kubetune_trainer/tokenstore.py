"""The token store: tokenized examples as flat, memory-mapped numpy arrays (one folder, written once).

Layout of a store folder::

    meta.json                        what the store holds (parts, views, counts, arrays and dtypes)
    <part>.<array>.bin               raw little-endian arrays of a part ("train", "validation")
    <part>.offsets.bin               int64, examples + 1: example i is [offsets[i], offsets[i+1])
    <view>.index.bin                 int64, optional: the examples of a view (a validationSplit)
    train.packed_offsets.bin         int64, optional: packed rows of the train view ...
    train.packed_members.bin         int64            ... as example indices of that view

Readers map the per-example index (``numpy.memmap``: offsets, a few bytes per example) and
read each example's tokens with a positional read when a batch needs it, building
:class:`~kubetune_trainer.data.Example` objects one at a time: a rank's resident memory for
data does not grow with the dataset.  The page cache holds the bytes, shared by the node's
ranks.  (Mapping the token arrays too would count every page a rank ever touched, and the
kernel's read-around, in its resident memory.)
"""

from __future__ import annotations

import contextlib
import json
import operator
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import numpy as np

from kubetune_trainer.data import Example
from kubetune_trainer.encoding import Encoded

META = "meta.json"
FORMAT_VERSION = 1
DTYPES = {"input_ids": "<i4", "labels": "<i4", "seq_labels": "<i8", "token_type_ids": "i1", "offsets": "<i8"}


class StoreWriter:
    """Appends encoded blocks to the parts of a new store folder."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._handles: dict[str, Any] = {}
        self._arrays: dict[str, set[str]] = {}
        self._examples: dict[str, int] = {}
        self._tokens: dict[str, int] = {}

    def _handle(self, part: str, array: str) -> Any:
        name = f"{part}.{array}"
        if name not in self._handles:
            self._handles[name] = (self.directory / f"{name}.bin").open("wb")
            if array == "offsets":
                self._handles[name].write(np.zeros(1, dtype=DTYPES["offsets"]).tobytes())
        return self._handles[name]

    def append(self, part: str, block: Encoded) -> None:
        """Add a block's kept examples to ``part``."""
        arrays = block.arrays()
        known = self._arrays.setdefault(part, set(arrays))
        if set(arrays) != known:
            raise ValueError(f"inconsistent arrays for {part}: {sorted(arrays)} after {sorted(known)}")
        start = self._tokens.get(part, 0)
        self._handle(part, "offsets").write((start + np.cumsum(block.lengths, dtype=np.int64)).astype("<i8").tobytes())
        for name, values in arrays.items():
            self._handle(part, name).write(np.ascontiguousarray(values, dtype=DTYPES[name]).tobytes())
        self._examples[part] = self._examples.get(part, 0) + len(block.lengths)
        self._tokens[part] = start + int(block.lengths.sum())

    def ensure_part(self, part: str, arrays: Sequence[str]) -> None:
        """Create ``part`` even when no example reached it (so readers find empty arrays)."""
        self._arrays.setdefault(part, set(arrays))
        self._handle(part, "offsets")
        for name in arrays:
            self._handle(part, name)

    def lengths(self, part: str) -> np.ndarray:
        """Tokens per example of ``part`` as written so far."""
        self._handle(part, "offsets").flush()
        return np.diff(np.fromfile(self.directory / f"{part}.offsets.bin", dtype=DTYPES["offsets"]))

    def write_array(self, name: str, values: np.ndarray) -> None:
        """A whole auxiliary array (a view's index, packed rows)."""
        np.ascontiguousarray(values, dtype="<i8").tofile(self.directory / f"{name}.bin")

    def close(self, meta: dict[str, Any]) -> None:
        """Flush every file and write ``meta.json`` (last: a store with a meta file is complete)."""
        for handle in self._handles.values():
            handle.close()
        parts = {
            part: {
                "examples": self._examples.get(part, 0),
                "tokens": self._tokens.get(part, 0),
                "arrays": sorted(names),
            }
            for part, names in self._arrays.items()
        }
        body = {"format": FORMAT_VERSION, "parts": parts, **meta}
        (self.directory / META).write_text(json.dumps(body, indent=1, sort_keys=True))


def _map(path: Path, dtype: str) -> np.ndarray:
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


class Part:
    """One part's examples by index.

    The per-example index (offsets, sequence labels) is mapped; the per-token arrays are read
    with positional reads (``os.pread``), so the bytes of the examples a rank has read stay in
    the node's page cache and never count in the rank's resident memory, however many it reads.
    """

    def __init__(self, directory: Path, part: str, arrays: Sequence[str]) -> None:
        self.offsets = _map(directory / f"{part}.offsets.bin", DTYPES["offsets"])
        self.per_example = {
            name: _map(directory / f"{part}.{name}.bin", DTYPES[name]) for name in arrays if name == "seq_labels"
        }
        self.per_token = {name: directory / f"{part}.{name}.bin" for name in arrays if name != "seq_labels"}
        self._fds: dict[str, int] = {}

    def __len__(self) -> int:
        return max(0, len(self.offsets) - 1)

    def lengths(self) -> np.ndarray:
        """Tokens per example (int64)."""
        return np.diff(self.offsets)

    def _read(self, name: str, start: int, stop: int) -> list[int]:
        fd = self._fds.get(name)
        if fd is None:
            fd = self._fds[name] = os.open(self.per_token[name], os.O_RDONLY)
        dtype = np.dtype(DTYPES[name])
        data = os.pread(fd, (stop - start) * dtype.itemsize, start * dtype.itemsize)
        values: list[int] = np.frombuffer(data, dtype=dtype).tolist()
        return values

    def example(self, index: int) -> Example:
        """Example ``index``, read from the store."""
        start, stop = int(self.offsets[index]), int(self.offsets[index + 1])
        labels: int | list[int] | None = None
        if "seq_labels" in self.per_example:
            labels = int(self.per_example["seq_labels"][index])
        elif "labels" in self.per_token:
            labels = self._read("labels", start, stop)
        types = self._read("token_type_ids", start, stop) if "token_type_ids" in self.per_token else None
        return Example(self._read("input_ids", start, stop), labels, types)

    def __del__(self) -> None:
        for fd in getattr(self, "_fds", {}).values():
            with contextlib.suppress(OSError):
                os.close(fd)


class ExampleView(Sequence[Example]):
    """A sequence of examples of a part, optionally through an index (lazy: nothing is held)."""

    def __init__(self, part: Part, index: np.ndarray | None = None) -> None:
        self.part = part
        self._index = index

    def __len__(self) -> int:
        return len(self._index) if self._index is not None else len(self.part)

    @overload
    def __getitem__(self, position: int) -> Example: ...
    @overload
    def __getitem__(self, position: slice) -> list[Example]: ...
    def __getitem__(self, position: int | slice) -> Example | list[Example]:
        if isinstance(position, slice):
            return [self[i] for i in range(*position.indices(len(self)))]
        i = operator.index(position)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(position)
        return self.part.example(int(self._index[i]) if self._index is not None else i)

    def __iter__(self) -> Iterator[Example]:
        for i in range(len(self)):
            yield self[i]

    def lengths(self) -> np.ndarray:
        """Tokens per example of the view."""
        lengths = self.part.lengths()
        return lengths[self._index] if self._index is not None else lengths


class PackedView(Sequence[list[Example]]):
    """Packed rows (lists of examples) over a view, from the stored packing."""

    def __init__(self, examples: ExampleView, offsets: np.ndarray, members: np.ndarray) -> None:
        self.examples = examples
        self.offsets = offsets
        self.members = members

    def __len__(self) -> int:
        return max(0, len(self.offsets) - 1)

    @overload
    def __getitem__(self, position: int) -> list[Example]: ...
    @overload
    def __getitem__(self, position: slice) -> list[list[Example]]: ...
    def __getitem__(self, position: int | slice) -> list[Example] | list[list[Example]]:
        if isinstance(position, slice):
            return [self[i] for i in range(*position.indices(len(self)))]
        i = operator.index(position)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(position)
        start, stop = int(self.offsets[i]), int(self.offsets[i + 1])
        return [self.examples[int(m)] for m in self.members[start:stop]]

    def lengths(self) -> np.ndarray:
        """Tokens per packed row."""
        per_example = self.examples.lengths()
        sums = np.add.reduceat(per_example[self.members], self.offsets[:-1]) if len(self.members) else per_example[:0]
        return np.asarray(sums, dtype=np.int64)


@dataclass
class TokenStore:
    """An opened store folder."""

    directory: Path
    meta: dict[str, Any]

    @classmethod
    def open(cls, directory: Path) -> TokenStore:
        """Open a complete store (its ``meta.json`` exists)."""
        meta = json.loads((directory / META).read_text())
        if meta.get("format") != FORMAT_VERSION:
            raise ValueError(f"{directory}: token store format {meta.get('format')}, expected {FORMAT_VERSION}")
        return cls(directory, meta)

    def view(self, name: str) -> ExampleView:
        """The examples of view ``name`` ("train" or "validation"); empty when the store has none."""
        spec = self.meta["views"].get(name)
        if spec is None:
            return ExampleView(_EmptyPart())
        part = Part(self.directory, spec["part"], self.meta["parts"][spec["part"]]["arrays"])
        index = _map(self.directory / f"{name}.index.bin", "<i8") if spec.get("index") else None
        return ExampleView(part, index)

    def packed(self, name: str) -> PackedView | None:
        """The packed rows of view ``name``, when the store was packed."""
        if not self.meta["views"].get(name, {}).get("packed"):
            return None
        return PackedView(
            self.view(name),
            _map(self.directory / f"{name}.packed_offsets.bin", "<i8"),
            _map(self.directory / f"{name}.packed_members.bin", "<i8"),
        )


class _EmptyPart(Part):
    def __init__(self) -> None:
        self.offsets = np.zeros(1, dtype="<i8")
        self.per_example, self.per_token, self._fds = {}, {}, {}
