"""Storage URIs: their scheme, and the local filesystem path of the local ones.

``file:///ABS/PATH`` is that path, ``pvc://CLAIM/PATH`` is ``PATH`` on the claim
mounted under the PVC root (``$KUBETUNE_PVC_ROOT``, default
:data:`~kubetune_trainer.spec.runtime.DEFAULT_PVC_ROOT`), and a string without a
scheme is a plain (relative or absolute) path.  Every other scheme is remote.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

from kubetune_trainer.spec.layout import PVC_SCHEME, pvc_relative_path
from kubetune_trainer.spec.runtime import DEFAULT_PVC_ROOT, ENV_PVC_ROOT
from kubetune_trainer.storage.base import StorageError

FILE_SCHEME = "file"
PLAIN_PATH = ""  # the "scheme" of a string without one


def scheme_of(uri: str) -> str:
    """The URI's scheme (``s3``, ``file``, ...); '' for a plain path."""
    return urlparse(uri).scheme if "://" in uri else PLAIN_PATH


def pvc_root() -> Path:
    """Where this pod mounts its PersistentVolumeClaims."""
    return Path(os.environ.get(ENV_PVC_ROOT, DEFAULT_PVC_ROOT))


def file_path(uri: str) -> Path:
    """The absolute path of ``file:///ABS/PATH``; StorageError for any other form."""
    parsed = urlparse(uri)
    if parsed.scheme != FILE_SCHEME or parsed.netloc not in ("", "localhost") or not parsed.path:
        raise StorageError(f"invalid storage URI {uri!r}: file:// URIs must be absolute (file:///path)")
    return Path(parsed.path)


def local_path(uri: str) -> Path | None:
    """The filesystem path of a local URI (``file://``, ``pvc://``, plain path); None for remote ones.

    Unlike :func:`file_path`, ``file://dir/x`` is accepted as the relative path ``dir/x`` (data URIs
    may be relative).
    """
    scheme = scheme_of(uri)
    if scheme == PLAIN_PATH:
        return Path(uri)
    if scheme == PVC_SCHEME:
        return pvc_root() / pvc_relative_path(uri)
    if scheme == FILE_SCHEME:
        parsed = urlparse(uri)
        if parsed.netloc in ("", "localhost"):
            return Path(parsed.path)
        return Path(parsed.netloc + parsed.path)
    return None
