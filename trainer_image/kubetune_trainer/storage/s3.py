"""Objects under ``s3://BUCKET/PREFIX`` on AWS S3 or any S3-compatible endpoint.

boto3's transfer manager does multipart, parallel parts and parallel files;
botocore retries single requests; :func:`~kubetune_trainer.storage.retry.with_retries`
retries whole objects (and the failed files of a batch) with backoff, so a store
that is down for a while (connection refused, 5xx, throttling) is waited for.
Credentials come from the environment only (``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY``) and are never logged.  Request checksums are sent only
when the operation requires them, because several S3-compatible servers reject
boto3's default CRC headers.  boto3 is imported here only, when a store is opened.
"""

from __future__ import annotations

import builtins
import concurrent.futures
import contextlib
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from kubetune_trainer.storage.base import (
    LOCAL_TMP_MARK,
    MiB,
    ObjectInfo,
    StorageError,
    Upload,
    check_key,
    describe,
    join_key,
    upload_tree,
)
from kubetune_trainer.storage.retry import RetryPolicy, with_retries

T = TypeVar("T")
# submit(transfer manager, key, local path) -> a transfer future
Submit = Callable[[Any, str, Path], Any]


class TransfersFailed(Exception):  # noqa: N818 - says what happened, like the botocore errors it wraps
    """Some transfers of a batch failed; ``first`` is the first failure (it decides transient or not)."""

    def __init__(self, what: str, uri: str, failures: dict[str, BaseException]) -> None:
        self.key, self.first = next(iter(failures.items()))
        super().__init__(f"{what} of {len(failures)} object(s) under {uri}: {self.key}: {describe(self.first)}")


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

    def __repr__(self) -> str:
        return f"S3Store({self.uri!r}, endpoint={self.endpoint!r})"

    # -- helpers

    def _key(self, key: str) -> str:
        key = check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _rel(self, full_key: str) -> str:
        return full_key[len(self.prefix) + 1 :] if self.prefix else full_key

    def _full_prefix(self, prefix: str) -> str:
        if not prefix:
            return f"{self.prefix}/" if self.prefix else ""
        return self._key(prefix)

    def _call(self, what: str, fn: Callable[[], T], key: str | None = None) -> T:
        """``fn`` with retries; a missing object becomes FileNotFoundError, other permanent errors StorageError."""
        from botocore.exceptions import ClientError

        try:
            return with_retries(self.retry, f"{what} ({self.uri})", fn, _s3_transient)
        except TransfersFailed as exc:
            if _not_found(exc.first):
                raise FileNotFoundError(f"{self.uri}/{exc.key}: no such object") from exc.first
            raise StorageError(f"{what} {exc.key} ({self.uri}): {describe(exc.first)}") from exc.first
        except ClientError as exc:
            if _not_found(exc) and key is not None:
                raise FileNotFoundError(f"{self.uri}/{key}: no such object") from exc
            raise StorageError(f"{what} ({self.uri}): {describe(exc)}") from exc

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
        tmp = local.with_name(f"{local.name}{LOCAL_TMP_MARK}{uuid.uuid4().hex}")

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
                out.extend(
                    ObjectInfo(self._rel(o["Key"]), int(o["Size"]), str(o.get("ETag", "")).strip('"'))
                    for o in page.get("Contents", [])
                )
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

    def submit_upload(self, manager: Any, key: str, path: Path) -> Any:
        """Start uploading ``path`` to ``key`` on a transfer manager; the transfer's future."""
        return manager.upload(str(path), self.bucket, self._key(key))

    def download_prefix(self, prefix: str, local_dir: Path) -> builtins.list[Path]:
        """Download every object under ``prefix`` into ``local_dir`` (keys relative to ``prefix``).

        Folder markers (empty objects named ``<folder>/``, as the S3 console's "Create folder" makes) are
        no files: they are skipped.
        """
        # (The marker of the store root itself lists as the key "".)
        objects = [o for o in self.list(prefix) if o.key and not o.key.endswith("/")]
        base = prefix.rstrip("/")
        targets: dict[str, Path] = {}
        for obj in objects:
            rel = obj.key[len(base) :].lstrip("/") if base else obj.key
            targets[obj.key] = local_dir / rel
        for path in targets.values():
            path.parent.mkdir(parents=True, exist_ok=True)
        tmp_of = {
            key: path.with_name(f"{path.name}{LOCAL_TMP_MARK}{uuid.uuid4().hex}") for key, path in targets.items()
        }
        try:
            self.transfer_batch(
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

    def transfer_batch(
        self, what: str, jobs: dict[str, Path], submit: Submit, first: dict[str, BaseException] | None = None
    ) -> None:
        """Run many transfers through one transfer manager per attempt; retry the failed ones with backoff.

        ``first``: the failures of a first attempt already made (an :meth:`open_upload` batch), so that
        only those are transferred again.
        """
        todo = jobs if first is None else {key: jobs[key] for key in first}
        made = first  # the outcome of an attempt the caller already made

        def attempt() -> None:
            nonlocal todo, made
            failures = made if made is not None else self._transfer_once(todo, submit)
            made = None
            todo = {key: jobs[key] for key in failures}
            if failures:
                raise TransfersFailed(what, self.uri, failures)

        self._call(what, attempt)

    def _transfer_once(self, jobs: dict[str, Path], submit: Submit) -> dict[str, BaseException]:
        """One attempt at every transfer, through one transfer manager; the failures by key."""
        from boto3.s3.transfer import create_transfer_manager

        with create_transfer_manager(self.client, self.transfer_config) as manager:
            return failures_of({key: submit(manager, key, path) for key, path in jobs.items()})

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
        key = join_key(self._prefix, rel)
        if key in self._paths:
            raise ValueError(f"{key} was already added to this upload")
        self._paths[key] = local
        self._futures[key] = self._store.submit_upload(self._manager, key, local)

    def finish(self) -> builtins.list[ObjectInfo]:
        try:
            failures = failures_of(self._futures)
        finally:
            self._manager.shutdown()
        if failures:
            self._store.transfer_batch("upload", self._paths, self._store.submit_upload, first=failures)
        return [ObjectInfo(key, path.stat().st_size) for key, path in self._paths.items()]

    def cancel(self) -> None:
        # s3transfer's TransferManager.shutdown(cancel=True) passes its arguments shifted and raises TypeError
        # (s3transfer 0.19); leaving the manager's context with an exception is the path that cancels every
        # transfer, aborts their multipart uploads and waits until none runs.
        reason = concurrent.futures.CancelledError("upload cancelled")
        self._manager.__exit__(type(reason), reason, None)


def failures_of(futures: dict[str, Any]) -> dict[str, BaseException]:
    """Wait for every future; the exception of each one that failed, by key."""
    failures: dict[str, BaseException] = {}
    for key, future in futures.items():
        try:
            future.result()
        except Exception as exc:
            failures[key] = exc
    return failures


def _not_found(exc: BaseException) -> bool:
    from botocore.exceptions import ClientError

    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        return code in ("404", "NoSuchKey", "NotFound")
    return False


def _s3_transient(exc: BaseException) -> bool:
    """Errors worth retrying: the endpoint unreachable, connections dropped, throttling, server errors."""
    from boto3.exceptions import RetriesExceededError, S3UploadFailedError
    from botocore.exceptions import ClientError, HTTPClientError, ResponseStreamingError

    if isinstance(exc, TransfersFailed):
        return _s3_transient(exc.first)
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
