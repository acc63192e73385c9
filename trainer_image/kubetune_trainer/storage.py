"""One small storage interface for model download, checkpoints and the published output.

``open_store(uri)`` returns a :class:`Store` rooted at the URI's prefix; keys are
relative to that root and always use ``/``.  Two implementations:

* :class:`S3Store` for ``s3://BUCKET/PREFIX`` on AWS or any S3-compatible store
  (``endpoint``): boto3's transfer manager (multipart, parallel parts and files),
  botocore's own per-request retries, and our retry with exponential backoff and
  jitter around whole-object operations, so a store that is down for a while
  (connection refused, 5xx, throttling) is waited for.  When the retries are
  exhausted :class:`StorageUnavailable` is raised (the trainer maps it to the
  retryable exit code).  Credentials come from the environment only
  (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``) and are never logged.
  Request checksums are sent only when the operation requires them, because
  several S3-compatible servers reject boto3's default CRC headers.
* :class:`LocalStore` for ``file:///ABS/PATH``, ``pvc://CLAIM/PATH`` (under the
  pod's PVC mount root) or a plain path: every write goes to a temporary file,
  is flushed to disk (fsync) and renamed into place, and the directory is
  flushed too, so a reader never sees half an object and a written object
  survives a node crash (as with S3, where a PUT returns once it is durable).

:meth:`Store.open_upload` starts a batch of uploads to which files can be added
while earlier ones transfer: the checkpoint manager adds each file the moment
DeepSpeed has written it.  ``upload_dir`` is the same batch for a finished folder.

Retry tuning (all optional) comes from ``KUBETUNE_STORAGE_RETRY_ATTEMPTS`` (8),
``KUBETUNE_STORAGE_RETRY_BASE_SECONDS`` (0.5) and ``KUBETUNE_STORAGE_RETRY_MAX_SECONDS`` (20).
"""

from __future__ import annotations

import builtins
import concurrent.futures
import contextlib
import logging
import os
import random
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable
from urllib.parse import urlparse

log = logging.getLogger(__name__)

T = TypeVar("T")

ENV_RETRY_ATTEMPTS = "KUBETUNE_STORAGE_RETRY_ATTEMPTS"
ENV_RETRY_BASE_SECONDS = "KUBETUNE_STORAGE_RETRY_BASE_SECONDS"
ENV_RETRY_MAX_SECONDS = "KUBETUNE_STORAGE_RETRY_MAX_SECONDS"
ENV_PVC_ROOT = "KUBETUNE_PVC_ROOT"
DEFAULT_PVC_ROOT = "/mnt/pvc"

MiB = 1024 * 1024
# Temporary files of LocalStore writes; never listed, removed by abort_incomplete_uploads.
_LOCAL_TMP_MARK = ".kubetune-tmp-"


class StorageError(Exception):
    """A storage operation failed for a reason retrying will not fix (missing bucket, access denied)."""


class StorageUnavailable(StorageError):  # noqa: N818 - the name is the termination reason
    """The store could not be reached after all retries (the trainer exits with the retryable code)."""


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object: its key relative to the store root, and its size in bytes."""

    key: str
    size: int


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


# --------------------------------------------------------------------------- retries


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


def upload_tree(store: Store, local_dir: Path, prefix: str, *, move: bool = False) -> builtins.list[ObjectInfo]:
    """Upload every file under ``local_dir`` to ``prefix/<relative path>`` as one batch."""
    upload = store.open_upload(prefix, move=move)
    try:
        for rel, path in _walk_files(local_dir):
            upload.add(path, rel)
    except BaseException:
        upload.cancel()
        raise
    return upload.finish()


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter around whole-object operations."""

    attempts: int = 8
    base_seconds: float = 0.5
    max_seconds: float = 20.0

    @classmethod
    def from_env(cls) -> RetryPolicy:
        """The default policy, overridden by the ``KUBETUNE_STORAGE_RETRY_*`` variables."""
        default = cls()
        try:
            return cls(
                attempts=max(1, int(os.environ.get(ENV_RETRY_ATTEMPTS, default.attempts))),
                base_seconds=float(os.environ.get(ENV_RETRY_BASE_SECONDS, default.base_seconds)),
                max_seconds=float(os.environ.get(ENV_RETRY_MAX_SECONDS, default.max_seconds)),
            )
        except ValueError as exc:
            raise StorageError(f"invalid storage retry setting in the environment: {exc}") from exc

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt`` (1-based): half fixed, half random ("equal jitter")."""
        ceiling = min(self.max_seconds, self.base_seconds * (2 ** (attempt - 1)))
        return float(ceiling / 2 + random.uniform(0, ceiling / 2))  # noqa: S311 - jitter, not cryptography


def with_retries(
    policy: RetryPolicy, what: str, fn: Callable[[], T], is_transient: Callable[[BaseException], bool]
) -> T:
    """Run ``fn``; on a transient error wait and retry; after ``policy.attempts`` raise StorageUnavailable."""
    for attempt in range(1, policy.attempts + 1):
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc):
                raise
            if attempt == policy.attempts:
                raise StorageUnavailable(f"{what}: still failing after {attempt} attempts: {_describe(exc)}") from exc
            delay = policy.delay(attempt)
            log.warning(
                "%s failed (attempt %d/%d, retrying in %.1fs): %s",
                what,
                attempt,
                policy.attempts,
                delay,
                _describe(exc),
            )
            time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


def _describe(exc: BaseException) -> str:
    # Exception texts from botocore name the endpoint and key, never credentials.
    return f"{type(exc).__name__}: {exc}"


def _check_key(key: str) -> str:
    if key.startswith("/") or any(part in ("..", ".") for part in key.split("/")):
        raise StorageError(f"invalid storage key {key!r}: must be relative, without '.' or '..' segments")
    return key


# --------------------------------------------------------------------------- S3


class S3Store:
    """Objects under ``s3://BUCKET/PREFIX`` on AWS S3 or any S3-compatible endpoint."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint: str | None = None,
        region: str | None = None,
        retry: RetryPolicy | None = None,
        max_concurrency: int = 8,
        chunk_bytes: int = 8 * MiB,
    ) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.endpoint = endpoint
        self.retry = retry or RetryPolicy.from_env()
        region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        config = Config(
            region_name=region,
            # botocore retries single requests (throttling, 5xx, dropped connections); we retry whole objects.
            retries={"mode": "standard", "max_attempts": 3},
            connect_timeout=5,
            read_timeout=60,
            max_pool_connections=max(10, 2 * max_concurrency),
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        # A session of its own: boto3's default session is not thread-safe to create clients from.
        session = boto3.session.Session()
        self.client = session.client("s3", endpoint_url=endpoint, config=config)
        self.transfer_config = TransferConfig(
            multipart_threshold=chunk_bytes,
            multipart_chunksize=chunk_bytes,
            max_concurrency=max_concurrency,
            use_threads=True,
        )
        self._max_concurrency = max_concurrency

    def __repr__(self) -> str:
        return f"S3Store({self.uri!r}, endpoint={self.endpoint!r})"

    # -- helpers

    def _key(self, key: str) -> str:
        key = _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _rel(self, full_key: str) -> str:
        return full_key[len(self.prefix) + 1 :] if self.prefix else full_key

    def _full_prefix(self, prefix: str) -> str:
        if not prefix:
            return f"{self.prefix}/" if self.prefix else ""
        return self._key(prefix)

    def _run(self, what: str, fn: Callable[[], T]) -> T:
        return with_retries(self.retry, f"{what} ({self.uri})", fn, _s3_transient)

    @staticmethod
    def _not_found(exc: BaseException) -> bool:
        from botocore.exceptions import ClientError

        if isinstance(exc, ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            return code in ("404", "NoSuchKey", "NotFound")
        return False

    def _call(self, what: str, fn: Callable[[], T], key: str | None = None) -> T:
        from botocore.exceptions import ClientError

        try:
            return self._run(what, fn)
        except ClientError as exc:
            if self._not_found(exc) and key is not None:
                raise FileNotFoundError(f"{self.uri}/{key}: no such object") from exc
            raise StorageError(f"{what} ({self.uri}): {_describe(exc)}") from exc

    # -- Store

    def put_file(self, local: Path, key: str) -> None:
        """Upload one file (multipart and parallel parts above the chunk size)."""
        full = self._key(key)
        self._call(
            f"upload {key}", lambda: self.client.upload_file(str(local), self.bucket, full, Config=self.transfer_config)
        )

    def get_file(self, key: str, local: Path) -> None:
        """Download one object to ``local`` (parent directories are created; the file appears atomically)."""
        full = self._key(key)
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f"{local.name}{_LOCAL_TMP_MARK}{uuid.uuid4().hex}")

        def fetch() -> None:
            self.client.download_file(self.bucket, full, str(tmp), Config=self.transfer_config)
            os.replace(tmp, local)

        try:
            self._call(f"download {key}", fetch, key=key)
        finally:
            tmp.unlink(missing_ok=True)

    def put_bytes(self, key: str, data: bytes) -> None:
        """Write one small object with a single (atomic) PUT."""
        full = self._key(key)
        self._call(f"put {key}", lambda: self.client.put_object(Bucket=self.bucket, Key=full, Body=data))

    def get_bytes(self, key: str) -> bytes:
        """Read one object into memory; FileNotFoundError when it does not exist."""
        full = self._key(key)

        def fetch() -> bytes:
            body = self.client.get_object(Bucket=self.bucket, Key=full)["Body"]
            try:
                return bytes(body.read())
            finally:
                body.close()

        return self._call(f"get {key}", fetch, key=key)

    def exists(self, key: str) -> bool:
        """True when the object exists."""
        full = self._key(key)
        try:
            self._call(f"head {key}", lambda: self.client.head_object(Bucket=self.bucket, Key=full), key=key)
        except FileNotFoundError:
            return False
        return True

    def list(self, prefix: str) -> builtins.list[ObjectInfo]:
        """Every object whose key starts with ``prefix`` (a string prefix, as S3 defines it), sorted by key."""
        full_prefix = self._full_prefix(prefix)

        def fetch() -> builtins.list[ObjectInfo]:
            out: builtins.list[ObjectInfo] = []
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full_prefix):
                out.extend(ObjectInfo(self._rel(o["Key"]), int(o["Size"])) for o in page.get("Contents", []))
            return sorted(out, key=lambda o: o.key)

        return self._call(f"list {prefix or '/'}", fetch)

    def delete(self, key: str) -> None:
        """Delete one object (no error when it is absent)."""
        full = self._key(key)
        self._call(f"delete {key}", lambda: self.client.delete_object(Bucket=self.bucket, Key=full))

    def delete_prefix(self, prefix: str) -> None:
        """Delete every object under ``prefix`` (batches of 1000)."""
        objects = self.list(prefix)
        for start in range(0, len(objects), 1000):
            batch = [{"Key": self._key(o.key)} for o in objects[start : start + 1000]]
            self._call(
                f"delete {prefix}",
                lambda batch=batch: self.client.delete_objects(  # type: ignore[misc]
                    Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
                ),
            )

    def upload_dir(self, local_dir: Path, prefix: str, *, move: bool = False) -> builtins.list[ObjectInfo]:
        """Upload every file under ``local_dir`` to ``prefix/<relative path>``, files and parts in parallel.

        Files that fail are retried (whole file) with backoff; StorageUnavailable when they keep failing.
        ``move`` (the caller drops the local files afterwards) changes nothing for S3.
        """
        return upload_tree(self, local_dir, prefix, move=move)

    def open_upload(self, prefix: str, *, move: bool = False) -> Upload:
        """A batch of uploads through one transfer manager; each file added starts at once."""
        return _S3Upload(self, prefix)

    def _submit_upload(self, manager: Any, key: str, path: Path) -> Any:
        return manager.upload(str(path), self.bucket, self._key(key))

    def download_prefix(self, prefix: str, local_dir: Path) -> builtins.list[Path]:
        """Download every object under ``prefix`` into ``local_dir`` (keys relative to ``prefix``)."""
        objects = self.list(prefix)
        base = prefix.rstrip("/")
        targets: dict[str, Path] = {}
        for obj in objects:
            rel = obj.key[len(base) :].lstrip("/") if base else obj.key
            targets[obj.key] = local_dir / rel
        for path in targets.values():
            path.parent.mkdir(parents=True, exist_ok=True)
        tmp_of = {
            key: path.with_name(f"{path.name}{_LOCAL_TMP_MARK}{uuid.uuid4().hex}") for key, path in targets.items()
        }
        try:
            self._transfer_all(
                "download",
                targets,
                lambda manager, key, path: manager.download(self.bucket, self._key(key), str(tmp_of[key])),
            )
            for key, path in targets.items():
                os.replace(tmp_of[key], path)
        finally:
            for tmp in tmp_of.values():
                tmp.unlink(missing_ok=True)
        return sorted(targets.values())

    def _transfer_all(self, what: str, jobs: dict[str, Path], submit: Callable[[Any, str, Path], Any]) -> None:
        """Run many transfers through one transfer manager; retry the failed ones with backoff."""
        self._retry_failed(what, jobs, self._transfer_once(jobs, submit), submit)

    def _transfer_once(
        self, jobs: dict[str, Path], submit: Callable[[Any, str, Path], Any]
    ) -> dict[str, BaseException]:
        """One attempt at every transfer, through one transfer manager; the failures by key."""
        from boto3.s3.transfer import create_transfer_manager

        with create_transfer_manager(self.client, self.transfer_config) as manager:
            return _failures_of({key: submit(manager, key, path) for key, path in jobs.items()})

    def _retry_failed(
        self,
        what: str,
        jobs: dict[str, Path],
        failures: dict[str, BaseException],
        submit: Callable[[Any, str, Path], Any],
    ) -> None:
        """Retry the failed transfers of a first attempt, with backoff, until none fails or attempts run out."""
        from botocore.exceptions import ClientError

        attempt = 1
        while failures:
            key, first = next(iter(failures.items()))
            if not _s3_transient(first):
                if isinstance(first, ClientError) and self._not_found(first):
                    raise FileNotFoundError(f"{self.uri}/{key}: no such object") from first
                raise StorageError(f"{what} {key} ({self.uri}): {_describe(first)}") from first
            if attempt >= self.retry.attempts:
                raise StorageUnavailable(
                    f"{what} of {len(failures)} object(s) under {self.uri} still failing after {attempt} attempts: "
                    f"{key}: {_describe(first)}"
                ) from first
            delay = self.retry.delay(attempt)
            log.warning(
                "%s of %d object(s) under %s failed (attempt %d/%d, retrying in %.1fs): %s",
                what,
                len(failures),
                self.uri,
                attempt,
                self.retry.attempts,
                delay,
                _describe(first),
            )
            time.sleep(delay)
            attempt += 1
            failures = self._transfer_once({k: jobs[k] for k in failures}, submit)

    def abort_incomplete_uploads(self, prefix: str) -> int:
        """Abort multipart uploads under ``prefix`` that were never completed (their parts cost storage)."""
        full_prefix = self._full_prefix(prefix)

        def run() -> int:
            count = 0
            paginator = self.client.get_paginator("list_multipart_uploads")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full_prefix):
                for upload in page.get("Uploads", []):
                    with contextlib.suppress(Exception):
                        self.client.abort_multipart_upload(
                            Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                        )
                        count += 1
            return count

        return self._call(f"abort incomplete uploads under {prefix}", run)


class _S3Upload:
    """One transfer manager open for a batch; files added while others upload (see :class:`Upload`)."""

    def __init__(self, store: S3Store, prefix: str) -> None:
        from boto3.s3.transfer import create_transfer_manager

        self._store = store
        self._prefix = prefix
        self._manager = create_transfer_manager(store.client, store.transfer_config)
        self._paths: dict[str, Path] = {}
        self._futures: dict[str, Any] = {}

    def add(self, local: Path, rel: str) -> None:
        key = _join(self._prefix, rel)
        if key in self._paths:
            raise ValueError(f"{key} was already added to this upload")
        self._paths[key] = local
        self._futures[key] = self._store._submit_upload(self._manager, key, local)

    def finish(self) -> builtins.list[ObjectInfo]:
        try:
            failures = _failures_of(self._futures)
        finally:
            self._manager.shutdown()
        self._store._retry_failed("upload", self._paths, failures, self._store._submit_upload)
        return [ObjectInfo(key, path.stat().st_size) for key, path in self._paths.items()]

    def cancel(self) -> None:
        # s3transfer's TransferManager.shutdown(cancel=True) passes its arguments shifted and raises TypeError
        # (s3transfer 0.19); leaving the manager's context with an exception is the path that cancels every
        # transfer, aborts their multipart uploads and waits until none runs.
        reason = concurrent.futures.CancelledError("upload cancelled")
        self._manager.__exit__(type(reason), reason, None)


def _failures_of(futures: dict[str, Any]) -> dict[str, BaseException]:
    """Wait for every future; the exception of each one that failed, by key."""
    failures: dict[str, BaseException] = {}
    for key, future in futures.items():
        try:
            future.result()
        except Exception as exc:
            failures[key] = exc
    return failures


def _s3_transient(exc: BaseException) -> bool:
    """Errors worth retrying: the endpoint unreachable, connections dropped, throttling, server errors."""
    from boto3.exceptions import RetriesExceededError, S3UploadFailedError
    from botocore.exceptions import ClientError, HTTPClientError, ResponseStreamingError

    if isinstance(exc, HTTPClientError | ResponseStreamingError | RetriesExceededError | ConnectionError):
        return True
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        return status >= 500 or error.get("Code") in {"SlowDown", "Throttling", "RequestTimeout", "InternalError"}
    if isinstance(exc, S3UploadFailedError):
        # The transfer manager wraps the real error in a message; only 4xx client errors are permanent.
        text = str(exc)
        return not any(code in text for code in ("AccessDenied", "NoSuchBucket", "InvalidAccessKeyId", "(403)"))
    cause = exc.__cause__ or exc.__context__
    return cause is not None and cause is not exc and _s3_transient(cause)


# --------------------------------------------------------------------------- local


class LocalStore:
    """Objects as files under a local directory (``file://``, a PVC mount or a plain path)."""

    def __init__(self, root: Path, uri: str | None = None) -> None:
        self.root = Path(root)
        self.uri = uri or self.root.as_uri()

    def __repr__(self) -> str:
        return f"LocalStore({self.uri!r})"

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def _atomic_write(
        self, path: Path, write: Callable[[Path], object], *, durable: bool = True, sync_dir: bool = True
    ) -> None:
        """Write via a temporary file and a rename; ``durable``: on disk before the rename (and the rename too,
        unless ``sync_dir`` is False because the caller flushes the directory once for many files)."""
        if durable:
            _make_dirs_durably(path.parent, stop=self.root)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}{_LOCAL_TMP_MARK}{uuid.uuid4().hex}")
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
        for rel, path in _walk_files(start):
            key = (start.relative_to(self.root) / rel).as_posix() if start != self.root else rel
            if key.startswith(prefix):
                with contextlib.suppress(FileNotFoundError):  # deleted while we walked
                    out.append(ObjectInfo(key, path.stat().st_size))
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
            for path in start.rglob(f"*{_LOCAL_TMP_MARK}*"):
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
        key = _join(self._prefix, rel)
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


# --------------------------------------------------------------------------- helpers and factory


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a directory's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_dirs_durably(folder: Path, *, stop: Path) -> None:
    """``mkdir -p`` whose new entries survive a crash: each new directory's parent is flushed."""
    if folder.is_dir():
        return
    missing = []
    current = folder
    while not current.is_dir():
        missing.append(current)
        if current == current.parent:
            break
        current = current.parent
    for new in reversed(missing):
        new.mkdir(exist_ok=True)
        if new.parent.is_relative_to(stop):  # directories above the store's root are not ours to flush
            fsync_path(new.parent)


def _walk_files(root: Path) -> list[tuple[str, Path]]:
    """(relative posix path, path) of every regular file under root, skipping our temporary files."""
    out = []
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            if _LOCAL_TMP_MARK in name:
                continue
            path = Path(dirpath) / name
            out.append((path.relative_to(root).as_posix(), path))
    return sorted(out)


def _join(prefix: str, rel: str) -> str:
    prefix = prefix.strip("/")
    return f"{prefix}/{rel}" if prefix else rel


_lock = threading.Lock()


def open_store(
    uri: str, *, endpoint: str | None = None, region: str | None = None, retry: RetryPolicy | None = None
) -> Store:
    """The store for ``s3://BUCKET/PREFIX``, ``file:///ABS/PATH``, ``pvc://CLAIM/PATH`` or a plain local path."""
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StorageError(f"invalid storage URI {uri!r}: s3:// needs a bucket name")
        with _lock:  # boto3 client creation is not thread-safe
            return S3Store(parsed.netloc, parsed.path, endpoint=endpoint, region=region, retry=retry)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise StorageError(f"invalid storage URI {uri!r}: file:// URIs must be absolute (file:///path)")
        return LocalStore(Path(parsed.path), uri=uri.rstrip("/"))
    if parsed.scheme == "pvc":
        root = Path(os.environ.get(ENV_PVC_ROOT, DEFAULT_PVC_ROOT)) / parsed.netloc / parsed.path.lstrip("/")
        return LocalStore(root, uri=uri.rstrip("/"))
    if parsed.scheme == "":
        return LocalStore(Path(uri).absolute())
    raise StorageError(f"unsupported storage URI {uri!r}: use s3://, file://, pvc:// or a local path")


def total_size(objects: Iterable[ObjectInfo]) -> int:
    """Sum of the objects' sizes in bytes."""
    return sum(o.size for o in objects)
