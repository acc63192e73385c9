"""Pure decisions about checkpoints: manifests, verification against listings, retention, resume order."""

from __future__ import annotations

import dataclasses

import pytest

from kubetune_trainer.checkpoint.manifest import (
    FileEntry,
    Manifest,
    StoredCheckpoints,
    build_manifest,
    files_needed_by,
    listing_problems,
    rank_of_file,
    resume_candidates,
    retention_plan,
    scan,
    step_of,
    tag_for,
)
from kubetune_trainer.storage import ObjectInfo


def entry(name: str, rank: int, size: int = 10) -> FileEntry:
    return FileEntry(name, size, f"sha-{name}", rank)


def manifest(step: int = 20, world: int = 2) -> Manifest:
    return build_manifest(
        step=step,
        world_size=world,
        zero_stage=2,
        spec_hash="h",
        per_rank_files=[
            [
                entry("mp_rank_00_model_states.pt", 0),
                entry("zero_pp_rank_0_mp_rank_00_optim_states.pt", 0),
                entry("kubetune-rng-rank-00000.pt", 0),
            ],
            [entry("zero_pp_rank_1_mp_rank_00_optim_states.pt", 1), entry("kubetune-rng-rank-00001.pt", 1)],
        ][:world],
        versions={"deepspeed": "0.19.8"},
        created="2026-01-01T00:00:00+00:00",
    )


def listing(step: int, *names: str, size: int = 10) -> list[ObjectInfo]:
    return [ObjectInfo(f"checkpoints/{tag_for(step)}/{n}", size) for n in names]


def test_tags() -> None:
    assert tag_for(500) == "step-00000500"
    assert step_of("step-00000500") == 500
    assert step_of("latest") is None
    assert step_of("step-5") is None
    with pytest.raises(ValueError, match=">= 0"):
        tag_for(-1)


def test_manifest_round_trip_and_errors() -> None:
    m = manifest()
    assert Manifest.from_json(m.to_json()) == m
    assert m.total_bytes == 50
    assert [f.name for f in m.files] == sorted(f.name for f in m.files)
    with pytest.raises(ValueError, match=r"MANIFEST\.json: malformed checkpoint manifest"):
        Manifest.from_json(b'{"format": "kubetune-checkpoint/v1", "step": 1}')
    with pytest.raises(ValueError, match="format"):
        Manifest.from_json(b'{"format": "other"}')
    with pytest.raises(ValueError, match="written by ranks 0 and 1"):
        build_manifest(
            step=1,
            world_size=2,
            zero_stage=2,
            spec_hash="",
            versions={},
            created="",
            per_rank_files=[[entry("x", 0)], [entry("x", 1)]],
        )


def test_saved_at_is_the_creation_time_or_none() -> None:
    assert manifest().saved_at == 1767225600.0  # 2026-01-01T00:00:00Z
    assert dataclasses.replace(manifest(), created="").saved_at is None  # an older manifest
    assert dataclasses.replace(manifest(), created="yesterday").saved_at is None


def test_listing_problems_name_missing_and_resized_objects() -> None:
    m = manifest()
    names = [f.name for f in m.files]
    assert listing_problems(m, listing(20, *names)) == []
    objects = listing(20, *names[1:])
    objects[0] = ObjectInfo(objects[0].key, 9)
    assert listing_problems(m, objects) == [f"{names[0]}: missing", f"{names[1]}: 9 bytes, manifest says 10"]
    # Objects of another step do not count.
    assert listing_problems(m, listing(2, *names)) == [f"{n}: missing" for n in names]


def test_each_rank_downloads_its_own_shards_and_the_shared_files() -> None:
    m = manifest()
    assert rank_of_file("zero_pp_rank_1_mp_rank_00_optim_states.pt") == 1
    assert rank_of_file("bf16_zero_pp_rank_12_mp_rank_00_optim_states.pt") == 12
    assert rank_of_file("kubetune-rng-rank-00003.pt") == 3
    assert rank_of_file("mp_rank_00_model_states.pt") is None
    assert [f.name for f in files_needed_by(m, 1)] == [
        "kubetune-rng-rank-00001.pt",
        "mp_rank_00_model_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]
    # ZeRO-0 at a larger world size: rank 3 takes saved rank 1's RNG state.
    assert "kubetune-rng-rank-00001.pt" in [f.name for f in files_needed_by(m, 3)]


def test_scan_groups_by_step_and_ignores_other_objects() -> None:
    objects = [
        *listing(10, "a", "MANIFEST.json"),
        *listing(20, "a"),
        ObjectInfo("checkpoints/LATEST", 14),
        ObjectInfo("checkpoints/latest", 14),  # DeepSpeed's, never trusted
        ObjectInfo("checkpoints/global_step5/x", 1),
        ObjectInfo("output/model.safetensors", 1),
    ]
    assert scan(objects) == StoredCheckpoints(committed=(10,), uncommitted=(20,))


def test_retention_keeps_the_newest_complete_and_never_touches_newer_folders() -> None:
    stored = StoredCheckpoints(committed=(10, 20, 30, 40), uncommitted=(15, 50))
    assert retention_plan(stored, just_committed=40, keep_last=2) == [10, 15, 20]
    assert retention_plan(stored, just_committed=40, keep_last=1) == [10, 15, 20, 30]
    assert retention_plan(stored, just_committed=40, keep_last=10) == [15]
    # A stale listing that does not show the new commit: delete nothing.
    assert retention_plan(StoredCheckpoints((10,), ()), just_committed=20, keep_last=1) == []
    with pytest.raises(ValueError, match="keepLast"):
        retention_plan(stored, just_committed=40, keep_last=0)


def test_resume_tries_every_committed_step_newest_first() -> None:
    assert resume_candidates(StoredCheckpoints(committed=(10, 30, 20), uncommitted=(40,))) == [30, 20, 10]
    assert resume_candidates(StoredCheckpoints((), (5,))) == []
