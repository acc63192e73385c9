"""One tokenization per job: where the token store is cached, who builds it, how the others wait.

The store of a job's data lives in the node's work dir (``<work>/tokens/<key>``) and, when
the job has a checkpoint URI, in the job's storage next to the checkpoints
(:func:`~kubetune_trainer.spec.layout.token_cache_uri`)::

    <checkpoint.uri>/tokens/<key>/store/...   the store's files
    <checkpoint.uri>/tokens/<key>/COMPLETE    written last: the store is whole
    <checkpoint.uri>/tokens/<key>/PROGRESS-<attempt nonce>, FAILED-<attempt nonce>

Global rank 0 takes the store from its node, else from the job's storage, else builds it
(and uploads it).  Every other node's local rank 0 waits for ``COMPLETE`` and downloads
(or, without job storage, builds its own).  The remaining ranks wait for their node's
copy.  Waiting is polling, not a collective: its timeout is sized to the data, a line
reports the builder's progress, and a builder's failure (a data error) reaches every
rank at once through a ``FAILED`` marker, so all of them exit with the same message.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune_trainer import errors, storage
from kubetune_trainer.spec.layout import token_cache_uri
from kubetune_trainer.tokenstore import META

COMPLETE = "COMPLETE"
STORE_PREFIX = "store/"
POLL_SECONDS = 0.5
PROGRESS_EVERY_SECONDS = 30.0
BASE_TIMEOUT_SECONDS = 900.0
SECONDS_PER_MIB = 1.0  # a worst case far below the tokenizer's speed on one core


def wait_timeout(data_bytes: int) -> float:
    """How long a rank waits for the token store: a base plus a worst-case rate over the data."""
    return BASE_TIMEOUT_SECONDS + SECONDS_PER_MIB * data_bytes / (1 << 20)


@dataclass(frozen=True)
class CachePlace:
    """Where the store of one key is: this node's folder, and the job's storage (None: node only)."""

    key: str
    local: Path
    remote: str | None
    endpoint: str | None = None
    region: str | None = None
    nonce: str = ""  # this attempt's: markers of earlier attempts are never mistaken for ours

    @classmethod
    def for_job(
        cls,
        key: str,
        work_dir: Path,
        checkpoint_uri: str | None,
        endpoint: str | None,
        region: str | None,
        nonce: str | None = None,
    ) -> CachePlace:
        """The place of ``key`` for a job; ``nonce`` is the attempt's (rank 0 draws it for everyone)."""
        remote = token_cache_uri(checkpoint_uri, key) if checkpoint_uri else None
        return cls(key, work_dir / "tokens" / key, remote, endpoint, region, nonce or uuid.uuid4().hex[:12])

    def store(self) -> storage.Store:
        """The job-storage folder of this key."""
        assert self.remote is not None
        return storage.open_store(self.remote, endpoint=self.endpoint, region=self.region)

    @property
    def local_complete(self) -> bool:
        """The node has a whole copy."""
        return (self.local / META).is_file()

    def local_marker(self, kind: str) -> Path:
        """A node-local marker of this attempt (``progress`` or ``failed``)."""
        return self.local.with_name(f"{self.key}.{kind}-{self.nonce}")


@dataclass
class Outcome:
    """How this rank got the store: "node" (already here), "storage" (downloaded), "built"."""

    how: str
    seconds: float


# --------------------------------------------------------------------------- markers


def _failure_body(error: BaseException) -> bytes:
    if isinstance(error, errors.TrainerError):
        return json.dumps({"class": type(error).__name__, "message": error.message}).encode()
    return json.dumps({"class": "TrainerError", "message": f"{type(error).__name__}: {error}"}).encode()


def _raise_failure(body: bytes, where: str) -> None:
    data = json.loads(body)
    kind = getattr(errors, str(data.get("class")), errors.TrainerError)
    if not (isinstance(kind, type) and issubclass(kind, errors.TrainerError)):
        kind = errors.TrainerError
    raise kind(f"{data.get('message', 'tokenization failed')}") from RuntimeError(f"reported by {where}")


def publish_failure(place: CachePlace, error: BaseException) -> None:
    """Tell the waiting ranks (this node's, and other nodes' through storage) that building failed."""
    body = _failure_body(error)
    place.local.parent.mkdir(parents=True, exist_ok=True)
    place.local_marker("failed").write_bytes(body)
    if place.remote is not None:
        try:
            place.store().put_bytes(f"FAILED-{place.nonce}", body)
        except Exception as exc:  # the storage may be what failed; the gang fails with the builder anyway
            print(f"kubetune: cannot record the tokenization failure in {place.remote}: {exc}", file=sys.stderr)


def publish_progress(place: CachePlace, line: str, *, remote: bool) -> None:
    """The builder's progress, for the waiting ranks' progress lines."""
    place.local.parent.mkdir(parents=True, exist_ok=True)
    tmp = place.local_marker("progress").with_suffix(".tmp")
    tmp.write_text(line)
    tmp.replace(place.local_marker("progress"))
    if remote and place.remote is not None:
        # Progress is advisory; the upload of the store itself is retried and checked.
        with contextlib.suppress(Exception):
            place.store().put_bytes(f"PROGRESS-{place.nonce}", line.encode())


# --------------------------------------------------------------------------- the store in the job's storage


def remote_complete(place: CachePlace) -> bool:
    """The job's storage holds a whole store for this key."""
    return place.remote is not None and place.store().exists(COMPLETE)


def upload(place: CachePlace) -> None:
    """Copy the node's store to the job's storage, then mark it complete (the marker goes last)."""
    store = place.store()
    store.upload_dir(place.local, STORE_PREFIX.rstrip("/"))
    store.put_bytes(COMPLETE, json.dumps({"key": place.key, "time": time.time()}).encode())


def download(place: CachePlace) -> None:
    """Copy the store from the job's storage into this node's folder (atomically: renamed when whole)."""
    staging = place.local.with_name(f"{place.key}.download-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    place.store().download_prefix(STORE_PREFIX, staging)
    if not (staging / META).is_file():
        raise storage.StorageError(f"{place.remote}: the cached token store has no {META}")
    install(staging, place.local)


def install(staging: Path, target: Path) -> None:
    """Move a finished folder into place; a copy another process installed first wins."""
    try:
        staging.replace(target)
    except OSError:
        if not (target / META).is_file():
            raise
        shutil.rmtree(staging, ignore_errors=True)


# --------------------------------------------------------------------------- waiting


def _read_progress(place: CachePlace, remote: bool) -> str:
    path = place.local_marker("progress")
    if path.is_file():
        return path.read_text()
    if remote and place.remote is not None:
        try:
            return place.store().get_bytes(f"PROGRESS-{place.nonce}").decode()
        except Exception:
            return ""
    return ""


def wait_for(
    place: CachePlace,
    *,
    remote: bool,
    timeout: float,
    rank: int,
    report: bool,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Block until the store is complete (this node's copy, or with ``remote`` the job storage's).

    Raises the builder's error when it failed, and a (retryable) TrainerError when ``timeout``
    passes with no store.
    """
    started = clock()
    last_report = started
    where = "the job's storage" if remote else "this node"
    while True:
        if (remote and remote_complete(place)) or (not remote and place.local_complete):
            return
        failed = place.local_marker("failed")
        if failed.is_file():
            _raise_failure(failed.read_bytes(), "local rank 0")
        if remote:
            with contextlib.suppress(FileNotFoundError):
                _raise_failure(place.store().get_bytes(f"FAILED-{place.nonce}"), "rank 0")
        now = clock()
        if now - started > timeout:
            raise errors.TrainerError(
                f"rank {rank}: no token store for the data from {where} after {timeout:.0f} s "
                f"(the building rank is slow or stuck; last progress: {_read_progress(place, remote) or 'none'})"
            )
        if report and now - last_report >= PROGRESS_EVERY_SECONDS:
            last_report = now
            line = _read_progress(place, remote) or "starting"
            left = timeout - (now - started)
            print(
                f"kubetune: rank {rank} waiting for the token store from {where}: {line}; "
                f"{now - started:.0f} s waited, timeout in {left:.0f} s",
                file=sys.stderr,
                flush=True,
            )
        time.sleep(POLL_SECONDS if not remote else POLL_SECONDS * 4)


def describe(place: CachePlace) -> dict[str, Any]:
    """The cache's place, for logs and reports."""
    return {"key": place.key, "uri": place.remote or str(place.local)}
