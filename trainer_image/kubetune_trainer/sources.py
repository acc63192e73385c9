"""Resolve a backbone or data URI to a local path (DESIGN §4.2).

``file://`` and plain paths are used in place, ``pvc://CLAIM/PATH`` maps to the
claim's mount under ``$KUBETUNE_PVC_ROOT``, ``hf://ORG/NAME`` is fetched from the
Hugging Face hub (token from ``HF_TOKEN``), and ``s3://`` goes through the storage
interface.  Downloads happen once per node: local rank 0 fetches into the
node-local work dir while the node's other ranks wait at a barrier.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

from kubetune_trainer.errors import InvalidModel, StorageUnavailable
from kubetune_trainer.spec.runtime import DEFAULT_PVC_ROOT, ENV_PVC_ROOT

DONE_MARKER = ".kubetune-download-complete"


def local_path(uri: str) -> Path | None:
    """The filesystem path of a local URI (``file://``, ``pvc://``, plain path); None for remote ones."""
    if uri.startswith("file://"):
        return Path(uri[len("file://") :])
    if uri.startswith("pvc://"):
        return Path(os.environ.get(ENV_PVC_ROOT, DEFAULT_PVC_ROOT)) / uri[len("pvc://") :]
    if "://" not in uri:
        return Path(uri)
    return None


def cache_dir_for(uri: str, work_dir: Path) -> Path:
    """Node-local directory a remote ``uri`` is downloaded into."""
    parsed = urlparse(uri)
    safe = (parsed.netloc + parsed.path).strip("/").replace("/", "__") or "root"
    return work_dir / "sources" / parsed.scheme / safe


def _download_hf(uri: str, target: Path, revision: str | None) -> None:
    from huggingface_hub import snapshot_download

    repo_id = uri[len("hf://") :].strip("/")
    try:
        snapshot_download(
            repo_id=repo_id, revision=revision, local_dir=str(target), token=os.environ.get("HF_TOKEN") or None
        )
    except Exception as exc:
        raise InvalidModel(f"model.source {uri}: cannot download from the Hugging Face hub ({exc})") from exc


def _download_s3(uri: str, target: Path, endpoint: str | None, region: str | None) -> None:
    from kubetune_trainer import storage

    try:
        store = storage.open_store(uri, endpoint=endpoint, region=region)
        files = store.download_prefix("", target)
    except storage.StorageUnavailable as exc:
        raise StorageUnavailable(f"model.source {uri}: object storage unavailable ({exc})") from exc
    except (storage.StorageError, FileNotFoundError) as exc:
        raise InvalidModel(f"model.source {uri}: cannot download ({exc})") from exc
    if not files:
        raise InvalidModel(f"model.source {uri}: no objects under this prefix")


def resolve_backbone(
    uri: str,
    *,
    work_dir: Path,
    local_rank: int,
    barrier: Callable[[], None],
    endpoint: str | None = None,
    region: str | None = None,
    revision: str | None = None,
) -> Path:
    """Return a local directory with the backbone in Hugging Face format.

    Collective: every rank must call it (they all pass ``barrier``).  Local
    rank 0 downloads remote sources (skipped when a previous attempt on this
    node completed the download); the others wait.
    """
    path = local_path(uri)
    if path is not None:
        barrier()
        if not path.exists():
            raise InvalidModel(f"model.source {uri}: {path} does not exist")
        return path
    target = cache_dir_for(uri, work_dir)
    error: Exception | None = None
    if local_rank == 0 and not (target / DONE_MARKER).exists():
        try:
            target.mkdir(parents=True, exist_ok=True)
            if uri.startswith("hf://"):
                _download_hf(uri, target, revision)
            elif uri.startswith("s3://"):
                _download_s3(uri, target, endpoint, region)
            else:
                raise InvalidModel(f"model.source {uri}: unsupported scheme")
            (target / DONE_MARKER).touch()
        except Exception as exc:
            error = exc
    barrier()  # everyone waits for the node's download (or its failure) before looking
    if error is not None:
        raise error
    if not (target / DONE_MARKER).exists():
        raise InvalidModel(f"model.source {uri}: download on this node failed (see local rank 0)")
    return target
