"""What a data URI names, how to recognise it later, and where its rows are on this node.

:func:`plan` looks a source up without downloading it (a listing, a hub lookup): the
files of a file, folder or glob in key order, a ``datasets`` ``save_to_disk`` folder,
or a Hugging Face dataset at a commit.  Its :attr:`SourcePlan.identity` changes when
the data does (sizes and ETags or modification times; the hub commit), which is what
the token cache is keyed by.  :func:`materialize` then makes the rows readable here:
remote files are downloaded into the node's work dir, Hugging Face and ``save_to_disk``
datasets are opened with ``datasets`` (memory-mapped Arrow), and the result is cut into
:mod:`~kubetune_trainer.readers` chunks.

``hf://datasets/OWNER/NAME[@REVISION]`` is read with the token from ``HF_TOKEN`` (the
job's credentials Secret) and honours an offline hub cache (``HF_HUB_OFFLINE``,
``HF_HUB_CACHE``/``HF_HOME``): offline, the cached snapshot of the revision is used.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune_trainer import readers, storage
from kubetune_trainer.errors import InvalidData, StorageUnavailable
from kubetune_trainer.storage.listing import expand, is_folder, is_glob

HF_DATASETS = "hf://datasets/"
DISK_MARKERS = ("dataset_dict.json", "state.json")  # what datasets' save_to_disk writes


@dataclass(frozen=True)
class Shard:
    """One file of a source: its key below the source root, size and version."""

    key: str
    size: int
    version: str
    fmt: str | None


@dataclass(frozen=True)
class SourcePlan:
    """A data source as looked up on rank 0 (picklable; sent to every rank)."""

    uri: str  # as the spec wrote it
    kind: str  # "files" | "disk" | "hf"
    root: str  # the store root the shard keys are relative to ("" for hf)
    shards: tuple[Shard, ...] = ()
    split: str | None = None  # disk / hf
    subset: str | None = None  # hf
    repo: str = ""  # hf: OWNER/NAME
    commit: str = ""  # hf: the resolved revision
    snapshot: str = ""  # hf offline: the cached snapshot folder

    @property
    def identity(self) -> list[Any]:
        """What changes when the data does."""
        return [
            self.uri,
            self.kind,
            self.split,
            self.subset,
            self.commit,
            [(s.key, s.size, s.version) for s in self.shards],
        ]

    @property
    def size(self) -> int:
        """Bytes of data (0 when unknown: Hugging Face datasets)."""
        return sum(s.size for s in self.shards)

    def display(self, shard: Shard) -> str:
        """The URI of a shard (what errors name)."""
        return f"{self.root.rstrip('/')}/{shard.key}" if shard.key else self.root


def _options(endpoint: str | None, region: str | None) -> dict[str, Any]:
    return {"endpoint": endpoint, "region": region}


def plan(
    uri: str,
    *,
    declared_format: str | None,
    split: str | None,
    subset: str | None,
    endpoint: str | None,
    region: str | None,
) -> SourcePlan:
    """Look ``uri`` up (no download).  InvalidData naming it when it names no data."""
    try:
        if uri.startswith(HF_DATASETS):
            return _plan_hf(uri, split=split, subset=subset)
        if is_glob(uri) or is_folder(uri) or _local_dir(uri):
            return _plan_many(uri, declared_format, split, endpoint, region)
        return _plan_file(uri, declared_format, endpoint, region)
    except storage.StorageUnavailable as exc:
        raise StorageUnavailable(f"{uri}: object storage unavailable ({exc})") from exc
    except storage.StorageError as exc:
        raise InvalidData(f"{uri}: {exc}") from exc


def _local_dir(uri: str) -> bool:
    path = storage.local_path(uri)
    return path is not None and path.is_dir()


def _plan_file(uri: str, declared: str | None, endpoint: str | None, region: str | None) -> SourcePlan:
    fmt = readers.format_of(uri, declared)
    if fmt is None:
        raise InvalidData(f"{uri}: cannot infer the format from the extension; set dataset.format")
    path = storage.local_path(uri)
    if path is not None:
        if not path.is_file():
            raise InvalidData(f"{uri}: file not found")
        stat = path.stat()
        return SourcePlan(uri, "files", uri, (Shard("", stat.st_size, str(stat.st_mtime_ns), fmt),))
    parent, _, name = uri.rpartition("/")
    store = storage.open_store(parent, **_options(endpoint, region))
    found = [o for o in store.list(name) if o.key == name]
    if not found:
        raise InvalidData(f"{uri}: file not found")
    return SourcePlan(uri, "files", parent, (Shard(name, found[0].size, found[0].version, fmt),))


def _plan_many(
    uri: str, declared: str | None, split: str | None, endpoint: str | None, region: str | None
) -> SourcePlan:
    listing = expand(uri, **_options(endpoint, region))
    keys = {o.key for o in listing.objects}
    if not is_glob(uri) and any(marker in keys for marker in DISK_MARKERS):
        shards = tuple(Shard(o.key, o.size, o.version, None) for o in listing.objects)
        return SourcePlan(uri, "disk", listing.root, shards, split=split)
    shards_list = []
    for obj in listing.objects:
        name = obj.key.rsplit("/", 1)[-1]
        fmt = readers.format_of(name, declared)
        # Hidden: the file, or a folder it is in (.ipynb_checkpoints/, a Spark job's _temporary/).
        hidden = any(segment.startswith((".", "_")) for segment in obj.key.split("/"))
        if fmt is None or hidden:
            if is_glob(uri) and not hidden:
                raise InvalidData(
                    f"{listing.root}/{obj.key}: cannot infer the format from the extension; set dataset.format"
                )
            continue  # a folder's README, _SUCCESS, .crc files
        shards_list.append(Shard(obj.key, obj.size, obj.version, fmt))
    if not shards_list:
        what = "matches no files" if is_glob(uri) else "holds no .jsonl, .csv or .parquet files"
        raise InvalidData(f"{uri}: {what}")
    return SourcePlan(uri, "files", listing.root, tuple(shards_list), split=split)


def _plan_hf(uri: str, *, split: str | None, subset: str | None) -> SourcePlan:
    name = uri[len(HF_DATASETS) :]
    repo, _, revision = name.partition("@")
    token = os.environ.get("HF_TOKEN") or None
    try:
        if _offline():
            from huggingface_hub import snapshot_download

            folder = snapshot_download(
                repo, repo_type="dataset", revision=revision or None, local_files_only=True, cache_dir=hub_cache()
            )
            commit = Path(folder).name
            return SourcePlan(uri, "hf", "", (), split, subset, repo, commit, snapshot=folder)
        from huggingface_hub import HfApi

        commit = str(HfApi().dataset_info(repo, revision=revision or None, token=token).sha)
    except Exception as exc:
        where = "in the offline Hugging Face cache" if _offline() else "on the Hugging Face hub"
        raise InvalidData(f"{uri}: dataset not found {where} ({type(exc).__name__})") from exc
    return SourcePlan(uri, "hf", "", (), split, subset, repo, commit)


def hub_cache() -> str | None:
    """The hub cache the environment names now (huggingface_hub reads it once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    return str(Path(os.environ["HF_HOME"]) / "hub") if os.environ.get("HF_HOME") else None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on") or os.environ.get(
        "HF_DATASETS_OFFLINE", ""
    ).lower() in ("1", "true", "yes", "on")


# --------------------------------------------------------------------------- making rows readable here


def materialize(
    source: SourcePlan,
    *,
    work_dir: Path,
    default_split: str,
    endpoint: str | None,
    region: str | None,
) -> list[readers.Chunk]:
    """Chunks of the source's rows on this node (downloads remote files into ``work_dir``)."""
    try:
        if source.kind == "hf":
            return readers.arrow_chunks(*_open_hf(source, work_dir, default_split))
        local_root = _local_root(source, work_dir, endpoint, region)
        if source.kind == "disk":
            return readers.arrow_chunks(*_open_disk(source, local_root, default_split))
        chunks: list[readers.Chunk] = []
        for shard in source.shards:
            path = local_root / shard.key if shard.key else local_root
            assert shard.fmt is not None
            chunks.extend(readers.file_chunks(path, shard.fmt, source.display(shard)))
        return chunks
    except storage.StorageUnavailable as exc:
        raise StorageUnavailable(f"{source.uri}: object storage unavailable ({exc})") from exc


def _local_root(source: SourcePlan, work_dir: Path, endpoint: str | None, region: str | None) -> Path:
    """The source root on this node: in place for local stores, else downloaded (once per version)."""
    path = storage.local_path(source.root)
    if path is not None:
        return path
    import hashlib

    digest = hashlib.sha256(repr(source.identity).encode()).hexdigest()[:16]
    target = work_dir / "sources" / "data" / digest
    done = target / ".kubetune-download-complete"
    if not done.exists():  # remote shards always have a key below their root (the object's parent)
        store = storage.open_store(source.root, **_options(endpoint, region))
        target.mkdir(parents=True, exist_ok=True)
        for shard in source.shards:
            store.get_file(shard.key, target / shard.key)
        done.touch()
    return target


def _open_disk(source: SourcePlan, root: Path, default_split: str) -> tuple[Any, str]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(root))
    except Exception as exc:
        raise InvalidData(f"{source.uri}: not a readable save_to_disk folder ({exc})") from exc
    if isinstance(loaded, datasets.DatasetDict):
        split = source.split or default_split
        if split not in loaded:
            raise InvalidData(f"{source.uri}: no split {split!r} (it has {', '.join(loaded)}); set dataset.split")
        return loaded[split], f"{source.uri} (split {split})"
    return loaded, source.uri


def _open_hf(source: SourcePlan, work_dir: Path, default_split: str) -> tuple[Any, str]:
    import datasets

    datasets.disable_progress_bars()  # one concise line per interval is ours; no per-split bars

    split = source.split or default_split
    path = source.snapshot or source.repo
    kwargs: dict[str, Any] = {"cache_dir": str(work_dir / "sources" / "hf-datasets")}
    if not source.snapshot:
        kwargs |= {"revision": source.commit, "token": os.environ.get("HF_TOKEN") or None}
    try:
        dataset = datasets.load_dataset(path, source.subset, split=split, **kwargs)
    except ValueError as exc:  # unknown split or subset: the library lists the ones there are
        raise InvalidData(f"{source.uri}: {exc} (dataset.split / dataset.subset)") from exc
    except Exception as exc:
        raise InvalidData(f"{source.uri}: cannot load the dataset ({type(exc).__name__}: {exc})") from exc
    return dataset, f"{source.uri} (split {split})"
