"""The storage interface every backend implements, its errors, and helpers shared by the backends.

A :class:`Store` holds objects under one root prefix; keys are relative to that
root and always use ``/``.  A backend that cannot reach its store after all
retries raises :class:`~kubetune_trainer.errors.StorageUnavailable` (the trainer's
retryable failure); any other failure that retrying will not fix raises
:class:`StorageError`; a missing object raises ``FileNotFoundError``.
"""

from __future__ import annotations

import builtins
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from kubetune_trainer.errors import StorageUnavailable

MiB = 1024 * 1024
# Marks temporary files of writes in progress: never listed, removed by abort_incomplete_uploads.
LOCAL_TMP_MARK = ".kubetune-tmp-"

__all__ = [
    "LOCAL_TMP_MARK",
    "MiB",
    "ObjectInfo",
    "StorageError",
    "StorageUnavailable",
    "Store",
    "Upload",
    "check_key",
    "describe",
    "join_key",
    "total_size",
    "upload_tree",
    "walk_files",
]


class StorageError(Exception):
    """A storage operation failed for a reason retrying will not fix (missing bucket, access denied, bad URI)."""


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object: its key relative to the store root, and its size in bytes.

    ``version`` changes whenever the content does (S3: the ETag; local files: the modification time in
    nanoseconds); listings fill it, it is left out of comparisons.
    """

    key: str
    size: int
    version: str = field(default="", compare=False)


class Upload(Protocol):
    """Files being uploaded under one prefix; a file added starts transferring at once."""

    def add(self, local: Path, rel: str) -> None:
        """Start uploading ``local`` to ``<prefix>/<rel>``."""
        ...

    def finish(self) -> builtins.list[ObjectInfo]:
        """Wait for every file (failed ones are retried with backoff); the objects written.

        Raises StorageUnavailable when files keep failing, StorageError on a permanent error.
        """
        ...

    def cancel(self) -> None:
        """Stop the transfers; returns once none is running any more."""
        ...


@runtime_checkable
class Store(Protocol):
    """Objects under one root prefix.  Keys are relative to the root and use ``/``."""

    uri: str

    def put_file(self, local: Path, key: str) -> None: ...
    def get_file(self, key: str, local: Path) -> None: ...
    def put_bytes(self, key: str, data: bytes) -> None: ...
    def get_bytes(self, key: str) -> bytes: ...
    def exists(self, key: str) -> bool: ...
    def list(self, prefix: str) -> builtins.list[ObjectInfo]: ...
    def delete(self, key: str) -> None: ...
    def delete_prefix(self, prefix: str) -> None: ...
    def upload_dir(self, local_dir: Path, prefix: str, *, move: bool = False) -> builtins.list[ObjectInfo]: ...
    def open_upload(self, prefix: str, *, move: bool = False) -> Upload: ...
    def download_prefix(self, prefix: str, local_dir: Path) -> builtins.list[Path]: ...
    def abort_incomplete_uploads(self, prefix: str) -> int: ...


def upload_tree(store: Store, local_dir: Path, prefix: str, *, move: bool = False) -> builtins.list[ObjectInfo]:
    """Upload every file under ``local_dir`` to ``prefix/<relative path>`` as one batch."""
    upload = store.open_upload(prefix, move=move)
    try:
        for rel, path in walk_files(local_dir):
            upload.add(path, rel)
    except BaseException:
        upload.cancel()
        raise
    return upload.finish()


def describe(exc: BaseException) -> str:
    """An exception as one log-safe line (backends' texts name endpoints and keys, never credentials)."""
    return f"{type(exc).__name__}: {exc}"


def check_key(key: str) -> str:
    """``key`` when it stays below the store root; StorageError otherwise."""
    if key.startswith("/") or any(part in ("..", ".") for part in key.split("/")):
        raise StorageError(f"invalid storage key {key!r}: must be relative, without '.' or '..' segments")
    return key


def join_key(prefix: str, rel: str) -> str:
    """``prefix/rel`` (just ``rel`` for an empty prefix)."""
    prefix = prefix.strip("/")
    return f"{prefix}/{rel}" if prefix else rel


def walk_files(root: Path) -> builtins.list[tuple[str, Path]]:
    """(relative posix path, path) of every regular file under root, skipping temporary files of writes."""
    out = []
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            if LOCAL_TMP_MARK in name:
                continue
            path = Path(dirpath) / name
            out.append((path.relative_to(root).as_posix(), path))
    return sorted(out)


def total_size(objects: Iterable[ObjectInfo]) -> int:
    """Sum of the objects' sizes in bytes."""
    return sum(o.size for o in objects)
