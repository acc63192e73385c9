"""The checkpoint layout in storage, the manifest, and the pure decisions made from listings.

Layout under the checkpoint root (DESIGN §5; the names come from
:mod:`kubetune_trainer.spec.layout`, their one owner)::

    checkpoints/step-00000500/<DeepSpeed files of every rank + kubetune RNG files>
    checkpoints/step-00000500/MANIFEST.json   written last: every object with size and sha256
    checkpoints/LATEST                        "step-00000500": newest step whose manifest is complete

A checkpoint exists only once its manifest is written.  Everything here is a
pure function of listings and manifests, so it is unit-tested without storage.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from kubetune_trainer.spec.layout import CHECKPOINTS_PREFIX, LATEST_KEY, step_of, tag_for
from kubetune_trainer.storage import ObjectInfo

__all__ = [
    "CHECKPOINTS_PREFIX",
    "LATEST_KEY",
    "MANIFEST_FORMAT",
    "MANIFEST_NAME",
    "RNG_FILE_PATTERN",
    "FileEntry",
    "Manifest",
    "build_manifest",
    "files_needed_by",
    "listing_problems",
    "manifest_key",
    "prefix_of",
    "resume_candidates",
    "retention_plan",
    "scan",
    "sha256_file",
    "step_of",
    "tag_for",
]

MANIFEST_NAME = "MANIFEST.json"
MANIFEST_FORMAT = "kubetune-checkpoint/v1"
RNG_FILE_PATTERN = "kubetune-rng-rank-{rank:05d}.pt"

# DeepSpeed names a file of one data-parallel rank "..zero_pp_rank_<r>_..."; ours "kubetune-rng-rank-<r>".
_PER_RANK_RE = re.compile(r"(?:^|_)zero_pp_rank_(\d+)_|^kubetune-rng-rank-(\d+)\.pt$")


def prefix_of(tag: str) -> str:
    """The storage prefix of one checkpoint, with a trailing slash."""
    return f"{CHECKPOINTS_PREFIX}{tag}/"


def manifest_key(tag: str) -> str:
    return f"{CHECKPOINTS_PREFIX}{tag}/{MANIFEST_NAME}"


def sha256_file(path: Path, chunk: int = 4 * 1024 * 1024) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class FileEntry:
    """One object of a checkpoint: name relative to the step folder, size, sha256, and the rank that wrote it."""

    name: str
    size: int
    sha256: str
    rank: int


@dataclass(frozen=True)
class Manifest:
    """What a committed checkpoint contains; written last, as MANIFEST.json."""

    step: int
    world_size: int
    zero_stage: int
    spec_hash: str
    files: tuple[FileEntry, ...]
    versions: Mapping[str, str] = field(default_factory=dict)
    created: str = ""
    format: str = MANIFEST_FORMAT
    job_uid: str = ""  # the FineTuneJob that wrote it (kubetune run derives one; "" from older versions)
    compatibility: Mapping[str, Any] = field(default_factory=dict)  # see checkpoint.compat

    @property
    def tag(self) -> str:
        return tag_for(self.step)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def saved_at(self) -> float | None:
        """``created`` as a Unix time (when the checkpoint was saved); None when unrecorded or unreadable."""
        try:
            return datetime.fromisoformat(self.created).timestamp() if self.created else None
        except ValueError:
            return None

    def to_json(self) -> bytes:
        """Stable, human-readable JSON."""
        doc: dict[str, Any] = {
            "format": self.format,
            "tag": self.tag,
            "step": self.step,
            "worldSize": self.world_size,
            "zeroStage": self.zero_stage,
            "specHash": self.spec_hash,
            "created": self.created,
            "versions": dict(self.versions),
            "jobUid": self.job_uid,
            "compatibility": dict(self.compatibility),
            "totalBytes": self.total_bytes,
            "files": [{"name": f.name, "size": f.size, "sha256": f.sha256, "rank": f.rank} for f in self.files],
        }
        return (json.dumps(doc, indent=2, sort_keys=False) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, *, source: str = "MANIFEST.json") -> Manifest:
        """Parse a manifest; ValueError naming the source and the field when it is malformed."""
        try:
            doc = json.loads(data)
            if doc.get("format") != MANIFEST_FORMAT:
                raise ValueError(f"format is {doc.get('format')!r}, expected {MANIFEST_FORMAT!r}")
            files = tuple(
                FileEntry(str(f["name"]), int(f["size"]), str(f["sha256"]), int(f["rank"])) for f in doc["files"]
            )
            return cls(
                step=int(doc["step"]),
                world_size=int(doc["worldSize"]),
                zero_stage=int(doc["zeroStage"]),
                spec_hash=str(doc.get("specHash", "")),
                files=files,
                versions={str(k): str(v) for k, v in doc.get("versions", {}).items()},
                created=str(doc.get("created", "")),
                job_uid=str(doc.get("jobUid", "")),
                compatibility=dict(doc.get("compatibility") or {}),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{source}: malformed checkpoint manifest ({type(exc).__name__}: {exc})") from exc


def build_manifest(
    *,
    step: int,
    world_size: int,
    zero_stage: int,
    spec_hash: str,
    per_rank_files: Sequence[Sequence[FileEntry]],
    versions: Mapping[str, str],
    created: str,
    job_uid: str = "",
    compatibility: Mapping[str, Any] | None = None,
) -> Manifest:
    """Merge every rank's uploaded files into one manifest; ValueError when two ranks wrote the same name."""
    seen: dict[str, int] = {}
    files: list[FileEntry] = []
    for entries in per_rank_files:
        for entry in entries:
            if entry.name == MANIFEST_NAME:
                raise ValueError(f"rank {entry.rank} uploaded a file named {MANIFEST_NAME}")
            if entry.name in seen:
                raise ValueError(f"checkpoint file {entry.name} written by ranks {seen[entry.name]} and {entry.rank}")
            seen[entry.name] = entry.rank
            files.append(entry)
    return Manifest(
        step=step,
        world_size=world_size,
        zero_stage=zero_stage,
        spec_hash=spec_hash,
        files=tuple(sorted(files, key=lambda f: f.name)),
        versions=dict(versions),
        created=created,
        job_uid=job_uid,
        compatibility=dict(compatibility or {}),
    )


def listing_problems(manifest: Manifest, listing: Iterable[ObjectInfo]) -> list[str]:
    """Objects of the manifest that are missing from the step's listing or have another size (empty = fine)."""
    prefix = prefix_of(manifest.tag)
    sizes = {o.key[len(prefix) :]: o.size for o in listing if o.key.startswith(prefix)}
    problems = []
    for entry in manifest.files:
        if entry.name not in sizes:
            problems.append(f"{entry.name}: missing")
        elif sizes[entry.name] != entry.size:
            problems.append(f"{entry.name}: {sizes[entry.name]} bytes, manifest says {entry.size}")
    return problems


def rank_of_file(name: str) -> int | None:
    """The data-parallel rank a per-rank file belongs to (ZeRO shard, RNG file), None for shared files."""
    match = _PER_RANK_RE.search(Path(name).name)
    if not match:
        return None
    return int(match.group(1) if match.group(1) is not None else match.group(2))


def files_needed_by(manifest: Manifest, rank: int) -> list[FileEntry]:
    """Files rank ``rank`` downloads to resume without conversion.

    Its own shards and RNG state, plus the shared files (the model states and
    client state that data-parallel rank 0 writes); not the other ranks' shards.
    At another world size (ZeRO-0 only: nothing is partitioned) rank r takes the
    per-rank files of saved rank r mod the old world size.
    """
    source = rank % manifest.world_size
    return [f for f in manifest.files if rank_of_file(f.name) in (None, source)]


@dataclass(frozen=True)
class StoredCheckpoints:
    """What a listing of ``checkpoints/`` says: the steps with a manifest and those without."""

    committed: tuple[int, ...]  # ascending
    uncommitted: tuple[int, ...]  # ascending; saves that crashed or are still uploading


def scan(listing: Iterable[ObjectInfo]) -> StoredCheckpoints:
    """Group a listing of ``checkpoints/`` by step folder."""
    steps: dict[int, bool] = {}
    for obj in listing:
        rest = obj.key[len(CHECKPOINTS_PREFIX) :] if obj.key.startswith(CHECKPOINTS_PREFIX) else None
        if rest is None or "/" not in rest:
            continue
        folder, name = rest.split("/", 1)
        step = step_of(folder)
        if step is None:
            continue
        steps[step] = steps.get(step, False) or name == MANIFEST_NAME
    return StoredCheckpoints(
        committed=tuple(sorted(s for s, done in steps.items() if done)),
        uncommitted=tuple(sorted(s for s, done in steps.items() if not done)),
    )


def retention_plan(stored: StoredCheckpoints, *, just_committed: int, keep_last: int) -> list[int]:
    """Steps whose folders to delete right after ``just_committed`` was committed.

    Keeps the newest ``keep_last`` committed checkpoints (so never the newest
    complete one); deletes older committed ones, and uncommitted folders older
    than the new commit (crashed saves).  Folders newer than the new commit are
    never touched: they can only belong to a save still in flight.
    """
    if keep_last < 1:
        raise ValueError(f"checkpoint.keepLast must be >= 1, got {keep_last}")
    committed = [s for s in stored.committed if s <= just_committed]
    if just_committed not in committed:
        return []  # the listing does not show our own commit: decide nothing on stale data
    keep = set(committed[-keep_last:])
    doomed = [s for s in committed if s not in keep]
    doomed += [s for s in stored.uncommitted if s < just_committed]
    return sorted(doomed)


def resume_candidates(stored: StoredCheckpoints) -> list[int]:
    """Committed steps to try at resume, newest first.

    LATEST names the newest commit; a manifest newer than LATEST (a crash
    between writing the manifest and moving LATEST) is complete too, so every
    committed step is a candidate and the listing, not LATEST, is the authority.
    """
    return sorted(stored.committed, reverse=True)
