"""Scheme → backend: the one place that knows which :class:`Store` serves which URI.

Built in: ``s3://`` (:class:`~kubetune_trainer.storage.s3.S3Store`, boto3 imported
only when such a store is opened), ``file://``, ``pvc://`` and plain paths
(:class:`~kubetune_trainer.storage.local.LocalStore`).  Another backend is one
:func:`register_scheme` call with a function that opens a store for a URI; nothing
else changes (the checkpoint manager, publishing and downloads all go through
:func:`open_store`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kubetune_trainer.storage.base import StorageError, Store
from kubetune_trainer.storage.local import LocalStore
from kubetune_trainer.storage.retry import RetryPolicy
from kubetune_trainer.storage.uris import FILE_SCHEME, PLAIN_PATH, file_path, local_path, scheme_of


@dataclass(frozen=True)
class StoreOptions:
    """What a job says about its store besides the URI (all optional)."""

    endpoint: str | None = None  # S3-compatible endpoint URL
    region: str | None = None
    retry: RetryPolicy | None = None  # default: RetryPolicy.from_env()


# opener(uri, options) -> the store rooted at uri
Opener = Callable[[str, StoreOptions], Store]

_openers: dict[str, Opener] = {}
_registry_lock = threading.Lock()
_s3_lock = threading.Lock()  # boto3 client creation is not thread-safe


def register_scheme(scheme: str, opener: Opener, *, replace: bool = False) -> None:
    """Serve ``<scheme>://...`` URIs with stores made by ``opener``; ValueError if taken (unless ``replace``)."""
    if scheme != PLAIN_PATH and (not scheme.isascii() or not scheme.replace("+", "").isalnum()):
        raise ValueError(f"invalid URI scheme {scheme!r}")
    with _registry_lock:
        if scheme in _openers and not replace:
            raise ValueError(f"storage scheme {scheme!r} is already registered")
        _openers[scheme] = opener


def unregister_scheme(scheme: str) -> None:
    """Forget a registered scheme (no error when it is not registered)."""
    with _registry_lock:
        _openers.pop(scheme, None)


def schemes() -> tuple[str, ...]:
    """The registered schemes ('' is the plain path), sorted."""
    with _registry_lock:
        return tuple(sorted(_openers))


def open_store(
    uri: str, *, endpoint: str | None = None, region: str | None = None, retry: RetryPolicy | None = None
) -> Store:
    """The store rooted at ``uri``: ``s3://BUCKET/PREFIX``, ``file:///ABS/PATH``, ``pvc://CLAIM/PATH``, a plain
    local path, or any registered scheme.  StorageError for an unknown scheme or a malformed URI."""
    scheme = scheme_of(uri)
    with _registry_lock:
        opener = _openers.get(scheme)
    if opener is None:
        known = ", ".join(f"{s}://" for s in schemes() if s)
        raise StorageError(f"unsupported storage URI {uri!r}: use {known} or a local path")
    return opener(uri, StoreOptions(endpoint=endpoint, region=region, retry=retry))


def _open_s3(uri: str, options: StoreOptions) -> Store:
    from urllib.parse import urlparse

    from kubetune_trainer.storage.s3 import S3Store

    parsed = urlparse(uri)
    if not parsed.netloc:
        raise StorageError(f"invalid storage URI {uri!r}: s3:// needs a bucket name")
    with _s3_lock:
        return S3Store(
            parsed.netloc, parsed.path, endpoint=options.endpoint, region=options.region, retry=options.retry
        )


def _open_file(uri: str, options: StoreOptions) -> Store:
    return LocalStore(file_path(uri), uri=uri.rstrip("/"))


def _open_pvc(uri: str, options: StoreOptions) -> Store:
    path = local_path(uri)
    assert path is not None  # a pvc:// URI always has one
    return LocalStore(path, uri=uri.rstrip("/"))


def _open_plain(uri: str, options: StoreOptions) -> Store:
    return LocalStore(Path(uri).absolute())


register_scheme("s3", _open_s3)
register_scheme(FILE_SCHEME, _open_file)
register_scheme("pvc", _open_pvc)
register_scheme(PLAIN_PATH, _open_plain)
