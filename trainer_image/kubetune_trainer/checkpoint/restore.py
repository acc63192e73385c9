"""The files side of a restore: fetch (and verify) what one rank loads, load it into DeepSpeed, clean up.

At the world size a checkpoint was saved with every rank downloads its own files;
at another one (ZeRO >= 1) local rank 0 of each node downloads the whole checkpoint
and converts it to DeepSpeed's universal format once for the node.  Every file is
checked against the manifest's size and sha256.  The collective steps around these
(barriers, agreeing on a checkpoint) stay in :class:`~kubetune_trainer.checkpoint.CheckpointManager`.
"""

from __future__ import annotations

import concurrent.futures
import logging
import platform
import shutil
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from kubetune_trainer.checkpoint import rng, universal
from kubetune_trainer.checkpoint.manifest import (
    RNG_FILE_PATTERN,
    FileEntry,
    Manifest,
    files_needed_by,
    prefix_of,
    sha256_file,
)
from kubetune_trainer.storage import Store

log = logging.getLogger("kubetune_trainer.checkpoint")

RESTORE_DIR = "checkpoint-restore"  # below the manager's work dir
VERSIONED_PACKAGES = ("kubetune", "torch", "deepspeed", "transformers", "peft")


def needs_universal(manifest: Manifest, world_size: int) -> bool:
    """Whether loading at ``world_size`` needs a universal checkpoint (ZeRO state of another world size)."""
    return manifest.world_size != world_size and manifest.zero_stage > 0


def fetch_for_rank(store: Store, manifest: Manifest, root: Path, rank: int, local_rank: int, world_size: int) -> Path:
    """Download (and check) what ``rank`` loads under ``root``; the folder to pass to ``load_checkpoint``."""
    if not needs_universal(manifest, world_size):
        load_dir = root / f"rank-{rank:05d}"
        shutil.rmtree(load_dir, ignore_errors=True)
        download_checked(store, manifest, files_needed_by(manifest, rank), load_dir / manifest.tag)
        return load_dir
    # Another world size: one conversion per node (local ranks share the node's work dir).
    node_dir = root / "node"
    if local_rank == 0:
        shutil.rmtree(node_dir, ignore_errors=True)
        full = node_dir / "full" / manifest.tag
        download_checked(store, manifest, list(manifest.files), full)
        log.info(
            "converting %s (world size %d) to a universal checkpoint for world size %d",
            manifest.tag,
            manifest.world_size,
            world_size,
        )
        universal.convert(full, node_dir / "universal" / manifest.tag)
        for rng_file in full.glob(RNG_FILE_PATTERN.replace("{rank:05d}", "*")):
            shutil.copy2(rng_file, node_dir / "universal" / manifest.tag / rng_file.name)
        shutil.rmtree(node_dir / "full", ignore_errors=True)
    return node_dir / "universal"


def download_checked(store: Store, manifest: Manifest, files: list[FileEntry], target: Path) -> None:
    """Download ``files`` of the checkpoint into ``target`` (in parallel); ValueError when one differs from
    the manifest (size or sha256)."""
    target.mkdir(parents=True, exist_ok=True)
    prefix = prefix_of(manifest.tag)

    def one(entry: FileEntry) -> None:
        path = target / entry.name
        store.get_file(prefix + entry.name, path)
        size = path.stat().st_size
        if size != entry.size:
            raise ValueError(f"{entry.name}: {size} bytes, manifest says {entry.size}")
        if sha256_file(path) != entry.sha256:
            raise ValueError(f"{entry.name}: sha256 differs from the manifest")

    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(one, files))


def load_fetched(engine: Any, manifest: Manifest, load_dir: Path, rank: int, world_size: int) -> dict[str, Any]:
    """Load a fetched checkpoint into the engine and restore this rank's RNG states; the client state."""
    strict = not has_frozen_parameters(engine)  # frozen parameters were excluded when saving
    if needs_universal(manifest, world_size):
        with universal.universal_loading(engine):
            path, client_state = engine.load_checkpoint(str(load_dir), tag=manifest.tag, load_module_strict=strict)
    else:
        path, client_state = engine.load_checkpoint(str(load_dir), tag=manifest.tag, load_module_strict=strict)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {manifest.tag} from {load_dir}")
    # At another world size rank r takes the state of saved rank r mod old size: every rank gets the
    # state of a rank that existed (ranks seeded alike stay alike).
    source_rank = rank % manifest.world_size
    rng_file = load_dir / manifest.tag / RNG_FILE_PATTERN.format(rank=source_rank)
    if rng_file.is_file():
        rng.load(rng_file)
    else:
        log.warning("checkpoint %s: no RNG state of rank %d, RNG states not restored", manifest.tag, source_rank)
    return dict(client_state or {})


def discard_fetched(root: Path, rank: int, local_rank: int) -> None:
    """Remove the downloaded files once every rank has loaded them (the node folder by local rank 0)."""
    shutil.rmtree(root / f"rank-{rank:05d}", ignore_errors=True)
    if local_rank == 0:
        shutil.rmtree(root / "node", ignore_errors=True)


def has_frozen_parameters(engine: Any) -> bool:
    """Whether the model has parameters the optimizer does not update (they are not saved)."""
    return any(not p.requires_grad for p in engine.module.parameters())


def library_versions() -> dict[str, str]:
    """Versions of Python and the packages a checkpoint depends on (recorded in the manifest)."""
    versions = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            continue
    return versions
