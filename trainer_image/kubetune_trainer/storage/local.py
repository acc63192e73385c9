"""Objects as files under a local directory: ``file:///ABS/PATH``, ``pvc://CLAIM/PATH`` or a plain path.

Every write goes to a temporary file, is flushed to disk (fsync) and renamed into
place, and the directory is flushed too, so a reader never sees half an object and
a written object survives a node crash (as with S3, where a PUT returns once it is
durable).
"""

from __future__ import annotations

import builtins
import concurrent.futures
import contextlib
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from kubetune_trainer.storage.base import (
    LOCAL_TMP_MARK,
    ObjectInfo,
    Upload,
    check_key,
    join_key,
    upload_tree,
    walk_files,
)
from kubetune_trainer.storage.fsync import fsync_path, make_dirs_durably


class LocalStore:
    """Objects as files under a local directory (``file://``, a PVC mount or a plain path)."""

    def __init__(self, root: Path, uri: str | None = None) -> None:
        self.root = Path(root)
        self.uri = uri or self.root.as_uri()

    def __repr__(self) -> str:
        return f"LocalStore({self.uri!r})"

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _atomic_write(
        self, path: Path, write: Callable[[Path], object], *, durable: bool = True, sync_dir: bool = True
    ) -> None:
        """Write via a temporary file and a rename; ``durable``: on disk before the rename (and the rename too,
        unless ``sync_dir`` is False because the caller flushes the directory once for many files)."""
        if durable:
            make_dirs_durably(path.parent, stop=self.root)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}{LOCAL_TMP_MARK}{uuid.uuid4().hex}")
        try:
            write(tmp)
            if durable:
                fsync_path(tmp)
            os.replace(tmp, path)
            if durable and sync_dir:
                fsync_path(path.parent)
        finally:
            tmp.unlink(missing_ok=True)

    def put_file(self, local: Path, key: str) -> None:
        """Copy ``local`` to the key (via a temporary file, fsync and a rename)."""
        self._atomic_write(self._path(key), lambda tmp: shutil.copyfile(local, tmp))

    def get_file(self, key: str, local: Path) -> None:
        """Copy the object to ``local``; FileNotFoundError when it does not exist."""
        src = self._path(key)
        if not src.is_file():
            raise FileNotFoundError(f"{self.uri}/{key}: no such object")
        self._atomic_write(local, lambda tmp: shutil.copyfile(src, tmp), durable=False)  # a scratch copy

    def put_bytes(self, key: str, data: bytes) -> None:
        """Write ``data`` to the key atomically."""
        self._atomic_write(self._path(key), lambda tmp: tmp.write_bytes(data))

    def get_bytes(self, key: str) -> bytes:
        """Read the object; FileNotFoundError when it does not exist."""
        path = self._path(key)
        if not path.is_file():
            raise FileNotFoundError(f"{self.uri}/{key}: no such object")
        return path.read_bytes()

    def exists(self, key: str) -> bool:
        """True when the object exists."""
        return self._path(key).is_file()

    def list(self, prefix: str) -> builtins.list[ObjectInfo]:
        """Every object whose key starts with ``prefix`` (string prefix, as in S3), sorted by key."""
        start = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
        if not start.is_dir():
            return []
        out = []
        for rel, path in walk_files(start):
            key = (start.relative_to(self.root) / rel).as_posix() if start != self.root else rel
            if key.startswith(prefix):
                with contextlib.suppress(FileNotFoundError):  # deleted while we walked
                    stat = path.stat()
                    out.append(ObjectInfo(key, stat.st_size, str(stat.st_mtime_ns)))
        return sorted(out, key=lambda o: o.key)

    def delete(self, key: str) -> None:
        """Delete one object (no error when it is absent)."""
        self._path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> None:
        """Delete every object under ``prefix`` and the directories left empty."""
        for obj in self.list(prefix):
            self.delete(obj.key)
        if prefix.endswith("/") or self._path(prefix.rstrip("/")).is_dir():
            target = self._path(prefix.rstrip("/")) if prefix.strip("/") else None
            if target is not None and target.is_dir():
                shutil.rmtree(target, ignore_errors=True)

    def upload_dir(self, local_dir: Path, prefix: str, *, move: bool = False) -> builtins.list[ObjectInfo]:
        """Copy every file under ``local_dir`` to ``prefix/<relative path>`` (in parallel).

        With ``move`` (the caller no longer needs the local files, as after a checkpoint upload) a file
        on the same filesystem is hard-linked instead of copied: a checkpoint is written once, not twice.
        """
        return upload_tree(self, local_dir, prefix, move=move)

    def open_upload(self, prefix: str, *, move: bool = False) -> Upload:
        """A batch of copies (hard links with ``move``) running in parallel; each file added starts at once."""
        return _LocalUpload(self, prefix, move=move)

    def _put_durably(self, local: Path, key: str, *, link: bool) -> None:
        """Copy (or hard-link) ``local`` to the key and flush it; the caller flushes the directory."""

        def write(tmp: Path) -> None:
            if link:
                try:
                    os.link(local, tmp)
                    return
                except OSError:  # another filesystem (EXDEV), or links not allowed: copy
                    pass
            shutil.copyfile(local, tmp)

        self._atomic_write(self._path(key), write, sync_dir=False)

    def download_prefix(self, prefix: str, local_dir: Path) -> builtins.list[Path]:
        """Copy every object under ``prefix`` into ``local_dir``."""
        base = prefix.rstrip("/")
        out = []
        for obj in self.list(prefix):
            rel = obj.key[len(base) :].lstrip("/") if base else obj.key
            self.get_file(obj.key, local_dir / rel)
            out.append(local_dir / rel)
        return sorted(out)

    def abort_incomplete_uploads(self, prefix: str) -> int:
        """Remove temporary files left by writes that crashed."""
        start = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
        count = 0
        if start.is_dir():
            for path in start.rglob(f"*{LOCAL_TMP_MARK}*"):
                key = path.relative_to(self.root).as_posix()
                if key.startswith(prefix) and path.is_file():
                    path.unlink(missing_ok=True)
                    count += 1
        return count


class _LocalUpload:
    """Copies (or hard links) into a LocalStore on a thread pool (see :class:`Upload`)."""

    def __init__(self, store: LocalStore, prefix: str, *, move: bool) -> None:
        self._store = store
        self._prefix = prefix
        self._move = move
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="local-upload")
        self._paths: dict[str, Path] = {}
        self._futures: dict[str, concurrent.futures.Future[None]] = {}

    def add(self, local: Path, rel: str) -> None:
        key = join_key(self._prefix, rel)
        if key in self._paths:
            raise ValueError(f"{key} was already added to this upload")
        self._paths[key] = local
        self._futures[key] = self._pool.submit(self._store._put_durably, local, key, link=self._move)

    def finish(self) -> builtins.list[ObjectInfo]:
        try:
            for future in self._futures.values():
                future.result()
        finally:
            self._pool.shutdown(wait=True)
        # One flush per directory makes the renames of all its files durable.
        for folder in sorted({self._store._path(key).parent for key in self._paths}):
            fsync_path(folder)
        return [ObjectInfo(key, path.stat().st_size) for key, path in self._paths.items()]

    def cancel(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
