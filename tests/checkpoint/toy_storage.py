"""A toy storage backend registered through the storage registry alone: ``flatdir:///ABS/DIR``.

Every object is one file directly in ``DIR`` whose name is the whole key, percent-encoded
(``checkpoints/step-00000005/MANIFEST.json`` → ``checkpoints%2Fstep-00000005%2FMANIFEST.json``): a
layout unlike the nested folders of :class:`~kubetune_trainer.storage.LocalStore`, so a test that
round-trips a checkpoint through it shows that nothing but :func:`~kubetune_trainer.storage.open_store`
decides where objects go.  Importing this module registers the scheme (``--plugin`` of train_tiny.py).
"""

from __future__ import annotations

import builtins
import os
import uuid
from pathlib import Path
from urllib.parse import quote, unquote, urlparse

from kubetune_trainer.storage import ObjectInfo, StoreOptions, Upload, register_scheme, upload_tree

SCHEME = "flatdir"
_TMP = ".toy-tmp-"


class FlatDirStore:
    """Objects as files in one flat directory, named by their percent-encoded keys."""

    def __init__(self, uri: str) -> None:
        parsed = urlparse(uri)
        # The URI's path is the directory; a key prefix after '//' is not supported by this toy.
        self.uri = uri.rstrip("/")
        self.root = Path(parsed.path)
        self.root.mkdir(parents=True, exist_ok=True)

    def _file(self, key: str) -> Path:
        if key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"bad key {key!r}")
        return self.root / quote(key, safe="")

    def _write(self, key: str, data: bytes) -> None:
        tmp = self.root / f"{_TMP}{uuid.uuid4().hex}"
        tmp.write_bytes(data)
        os.replace(tmp, self._file(key))

    def put_file(self, local: Path, key: str) -> None:
        self._write(key, local.read_bytes())

    def get_file(self, key: str, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(self.get_bytes(key))

    def put_bytes(self, key: str, data: bytes) -> None:
        self._write(key, data)

    def get_bytes(self, key: str) -> bytes:
        path = self._file(key)
        if not path.is_file():
            raise FileNotFoundError(f"{self.uri}/{key}: no such object")
        return path.read_bytes()

    def exists(self, key: str) -> bool:
        return self._file(key).is_file()

    def list(self, prefix: str) -> builtins.list[ObjectInfo]:
        found = []
        for path in self.root.iterdir():
            if path.name.startswith(_TMP):
                continue
            key = unquote(path.name)
            if key.startswith(prefix):
                found.append(ObjectInfo(key, path.stat().st_size))
        return sorted(found, key=lambda o: o.key)

    def delete(self, key: str) -> None:
        self._file(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> None:
        for obj in self.list(prefix):
            self.delete(obj.key)

    def upload_dir(self, local_dir: Path, prefix: str, *, move: bool = False) -> builtins.list[ObjectInfo]:
        return upload_tree(self, local_dir, prefix, move=move)

    def open_upload(self, prefix: str, *, move: bool = False) -> Upload:
        return _CopyUpload(self, prefix)

    def download_prefix(self, prefix: str, local_dir: Path) -> builtins.list[Path]:
        base = prefix.rstrip("/")
        out = []
        for obj in self.list(prefix):
            target = local_dir / (obj.key[len(base) :].lstrip("/") if base else obj.key)
            self.get_file(obj.key, target)
            out.append(target)
        return sorted(out)

    def abort_incomplete_uploads(self, prefix: str) -> int:
        stale = list(self.root.glob(f"{_TMP}*"))
        for path in stale:
            path.unlink(missing_ok=True)
        return len(stale)


class _CopyUpload:
    """Copies each file as it is added (the toy has no parallelism to offer)."""

    def __init__(self, store: FlatDirStore, prefix: str) -> None:
        self._store = store
        self._prefix = prefix.strip("/")
        self._written: list[ObjectInfo] = []

    def add(self, local: Path, rel: str) -> None:
        key = f"{self._prefix}/{rel}" if self._prefix else rel
        if any(o.key == key for o in self._written):
            raise ValueError(f"{key} was already added to this upload")
        self._store.put_file(local, key)
        self._written.append(ObjectInfo(key, local.stat().st_size))

    def finish(self) -> builtins.list[ObjectInfo]:
        return list(self._written)

    def cancel(self) -> None:
        for obj in self._written:
            self._store.delete(obj.key)


def open_flatdir(uri: str, options: StoreOptions) -> FlatDirStore:
    """The registry's opener for ``flatdir://`` (endpoint, region and retry do not apply)."""
    return FlatDirStore(uri)


def files_of(directory: Path) -> builtins.list[str]:
    """The object file names in a flat directory, decoded to keys (for assertions)."""
    return sorted(unquote(p.name) for p in directory.iterdir() if not p.name.startswith(_TMP))


register_scheme(SCHEME, open_flatdir, replace=True)  # replace: importing twice (test + plugin) is harmless
