"""Resolve a backbone URI to a local path (DESIGN §4.2); data sources are :mod:`~kubetune_trainer.datasources`.

Local URIs (``file://``, ``pvc://CLAIM/PATH``, plain paths: see
:func:`kubetune_trainer.storage.local_path`) are used in place, ``hf://ORG/NAME``
is fetched from the Hugging Face hub (token from ``HF_TOKEN``), and every other
scheme (``s3://``, or one registered with the storage registry) goes through the
storage interface.  Downloads happen once per node: local rank 0 fetches into the
node-local work dir while the node's other ranks wait at a barrier.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

from kubetune_trainer import storage
from kubetune_trainer.errors import InvalidModel, StorageUnavailable
from kubetune_trainer.storage import local_path

__all__ = ["DONE_MARKER", "cache_dir_for", "local_path", "resolve_backbone"]

DONE_MARKER = ".kubetune-download-complete"
HF_SCHEME = "hf"


def cache_dir_for(uri: str, work_dir: Path) -> Path:
    """Node-local directory a remote ``uri`` is downloaded into."""
    parsed = urlparse(uri)
    safe = (parsed.netloc + parsed.path).strip("/").replace("/", "__") or "root"
    return work_dir / "sources" / parsed.scheme / safe


def _download_hf(uri: str, target: Path, revision: str | None) -> None:
    from huggingface_hub import snapshot_download

    repo_id = uri[len(f"{HF_SCHEME}://") :].strip("/")
    try:
        snapshot_download(
            repo_id=repo_id, revision=revision, local_dir=str(target), token=os.environ.get("HF_TOKEN") or None
        )
    except Exception as exc:
        raise InvalidModel(f"model.source {uri}: cannot download from the Hugging Face hub ({exc})") from exc


def _download_store(uri: str, target: Path, endpoint: str | None, region: str | None) -> None:
    try:
        store = storage.open_store(uri, endpoint=endpoint, region=region)
        files = store.download_prefix("", target)
    except StorageUnavailable as exc:
        raise StorageUnavailable(f"model.source {uri}: object storage unavailable ({exc})") from exc
    except (storage.StorageError, FileNotFoundError) as exc:
        raise InvalidModel(f"model.source {uri}: cannot download ({exc})") from exc
    if not files:
        raise InvalidModel(f"model.source {uri}: no objects under this prefix")


def resolve_backbone(
    uri: str,
    *,
    work_dir: Path,
    local_rank_zero_first: Callable[[Callable[[], None]], None],
    endpoint: str | None = None,
    region: str | None = None,
    revision: str | None = None,
) -> Path:
    """Return a local directory with the backbone in Hugging Face format.

    Collective: every rank must call it, passing the session's ``local_rank_zero_first``.  Local
    rank 0 downloads remote sources (skipped when a previous attempt on this node completed the
    download); the others wait for it, then look for the completion marker.
    """
    path = local_path(uri)
    if path is not None:
        local_rank_zero_first(lambda: None)  # keep every rank's collectives in step
        if not path.exists():
            raise InvalidModel(f"model.source {uri}: {path} does not exist")
        return path
    target = cache_dir_for(uri, work_dir)

    def download() -> None:
        if (target / DONE_MARKER).exists():
            return
        target.mkdir(parents=True, exist_ok=True)
        if storage.scheme_of(uri) == HF_SCHEME:
            _download_hf(uri, target, revision)
        elif storage.scheme_of(uri) in storage.schemes():
            _download_store(uri, target, endpoint, region)
        else:
            raise InvalidModel(f"model.source {uri}: unsupported scheme")
        (target / DONE_MARKER).touch()

    local_rank_zero_first(download)
    if not (target / DONE_MARKER).exists():
        raise InvalidModel(f"model.source {uri}: download on this node failed (see local rank 0)")
    return target
