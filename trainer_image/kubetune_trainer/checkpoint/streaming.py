"""Hand each checkpoint file to the upload the moment DeepSpeed has written it.

DeepSpeed writes a checkpoint as a few large files (model states, each rank's
optimizer partition) through ``engine.checkpoint_engine.save``.  While the
engine serializes the next file, the previous one can already be transferring
and being hashed; :func:`announcing_files` wraps the checkpoint engine for the
duration of one ``save_checkpoint`` so that each written path is announced.
Files DeepSpeed writes by other means (its recovery scripts) are found by the
caller's final walk of the folder.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from kubetune_trainer.checkpoint.manifest import FileEntry, sha256_file
from kubetune_trainer.storage import Upload

log = logging.getLogger("kubetune_trainer.checkpoint")


class _AnnouncingCheckpointEngine:
    """DeepSpeed's checkpoint engine, calling ``on_written(path)`` after each file it saves."""

    def __init__(self, inner: Any, on_written: Callable[[Path], None]) -> None:
        self._inner = inner
        self._on_written = on_written

    def save(self, state_dict: Any, path: str) -> None:
        self._inner.save(state_dict, path)
        self._on_written(Path(path))

    def __getattr__(self, name: str) -> Any:  # create, commit, makedirs, load, is_decoupled, ...
        return getattr(self._inner, name)


@contextlib.contextmanager
def announcing_files(engine: Any, on_written: Callable[[Path], None]) -> Iterator[None]:
    """Within the block, every file ``engine`` saves through its checkpoint engine is announced."""
    inner = engine.checkpoint_engine
    engine.checkpoint_engine = _AnnouncingCheckpointEngine(inner, on_written)
    try:
        yield
    finally:
        engine.checkpoint_engine = inner


@contextlib.contextmanager
def without_zip_checksums() -> Iterator[None]:
    """torch.save skips the CRC-32 of each record in its zip container within the block.

    A checkpoint's manifest carries the sha256 of every file, checked after every
    download and before any load, so the zip CRCs are a second checksum of the same
    bytes; computing them costs about a quarter of the serialization time.
    """
    try:
        from torch.utils.serialization import config
    except ImportError:  # an older torch: nothing to switch off
        yield
        return
    save_config = config.save
    previous = save_config.compute_crc32
    save_config.compute_crc32 = False
    try:
        yield
    finally:
        save_config.compute_crc32 = previous


class StreamedFiles:
    """One rank's checkpoint files, each uploaded and hashed from the moment it is announced."""

    def __init__(self, open_upload: Callable[[], Upload], local_dir: Path) -> None:
        self._open_upload = open_upload
        self.upload = open_upload()
        self.local_dir = local_dir
        self.started = time.monotonic()
        # Hashing runs beside the transfers (hashlib releases the GIL): the checksums cost no extra wall time.
        self._hashing = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="sha256")
        self._announced: dict[str, tuple[Path, tuple[int, int], concurrent.futures.Future[str]]] = {}

    def add(self, path: Path) -> None:
        """Start uploading and hashing one finished file of the folder."""
        rel = path.relative_to(self.local_dir).as_posix()
        if not self._announced:
            self.started = time.monotonic()
        self._announced[rel] = (path, _signature(path), self._hashing.submit(sha256_file, path))
        self.upload.add(path, rel)

    def add_the_rest(self) -> None:
        """Announce the files written without the checkpoint engine; re-upload any file changed since announced."""
        changed = [rel for rel, (path, signature, _) in self._announced.items() if _signature(path) != signature]
        if changed:
            # Never seen with DeepSpeed, but a file rewritten after its upload started must not be committed
            # half old, half new: start this folder's upload over.
            log.warning("checkpoint files changed after they were written: %s; uploading the folder again", changed)
            self.upload.cancel()
            self.upload = self._open_upload()
            previous, self._announced = self._announced, {}
            for path, _signature_then, digest in previous.values():
                digest.cancel()
                self.add(path)
        for path in sorted(p for p in self.local_dir.rglob("*") if p.is_file()):
            if path.relative_to(self.local_dir).as_posix() not in self._announced:
                self.add(path)

    def finish(self, rank: int) -> list[FileEntry]:
        """Wait for every upload and checksum; the manifest entries of this rank."""
        try:
            self.upload.finish()
            return [
                FileEntry(rel, signature[0], digest.result(), rank)
                for rel, (_path, signature, digest) in sorted(self._announced.items())
            ]
        finally:
            self._hashing.shutdown(wait=True, cancel_futures=True)

    def cancel(self) -> None:
        """Stop every transfer and checksum (the save failed)."""
        self.upload.cancel()
        self._hashing.shutdown(wait=True, cancel_futures=True)


def _signature(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns
