"""The storage registry: a new scheme is one ``register_scheme`` call, and the real checkpoint code uses it.

``tests/checkpoint/toy_storage.py`` registers ``flatdir://`` (every object one file in one flat
directory) without touching kubetune's code; the real :class:`CheckpointManager` in 2 DeepSpeed ranks
(torchrun, gloo) then commits checkpoints through it and resumes from them exactly as from S3.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetune_trainer.storage import StorageError, local_path, open_store, register_scheme, schemes, unregister_scheme
from kubetune_trainer.storage.registry import StoreOptions
from tests.checkpoint import tiny, toy_storage

PLUGIN = "tests.checkpoint.toy_storage"


def test_a_registered_scheme_opens_its_own_store(tmp_path: Path) -> None:
    store = open_store(f"flatdir://{tmp_path / 'flat'}")
    assert isinstance(store, toy_storage.FlatDirStore)
    store.put_bytes("checkpoints/LATEST", b"step-00000001\n")
    assert toy_storage.files_of(tmp_path / "flat") == ["checkpoints/LATEST"]
    assert (tmp_path / "flat" / "checkpoints%2FLATEST").read_bytes() == b"step-00000001\n"
    assert "flatdir" in schemes()


def test_schemes_are_registered_once_and_unknown_ones_are_named(tmp_path: Path) -> None:
    def opener(uri: str, options: StoreOptions) -> toy_storage.FlatDirStore:
        return toy_storage.FlatDirStore(uri.replace("twice://", "flatdir://"))

    register_scheme("twice", opener)
    try:
        with pytest.raises(ValueError, match="already registered"):
            register_scheme("twice", opener)
        assert isinstance(open_store(f"twice://{tmp_path}"), toy_storage.FlatDirStore)
    finally:
        unregister_scheme("twice")
    with pytest.raises(StorageError, match=r"unsupported storage URI 'twice://.*'.*s3://"):
        open_store(f"twice://{tmp_path}")
    with pytest.raises(ValueError, match="invalid URI scheme"):
        register_scheme("no/slashes", opener)


def test_a_checkpoint_round_trips_through_a_registered_scheme(tmp_path: Path) -> None:
    flat = tmp_path / "flat"
    uri = f"flatdir://{flat}"
    first = tiny.run(2, uri=uri, endpoint=None, tmp=tmp_path, name="first", steps=10, every=5, sync=True, plugin=PLUGIN)
    assert first.result["committed_step"] == 10
    keys = toy_storage.files_of(flat)
    assert "checkpoints/LATEST" in keys
    assert "checkpoints/step-00000010/MANIFEST.json" in keys
    assert any(k.startswith("checkpoints/step-00000010/") and "rng-rank-00001" in k for k in keys), keys
    assert not any(p.is_dir() for p in flat.iterdir()), "the toy layout is flat: nothing made folders in it"
    assert open_store(uri).get_bytes("checkpoints/LATEST").decode().strip() == "step-00000010"

    resumed = tiny.run(
        2, uri=uri, endpoint=None, tmp=tmp_path, name="resumed", steps=15, every=5, sync=True, plugin=PLUGIN
    )
    assert resumed.result["restored"] == {"step": 10, "fell_back_from": None, "uri": f"{uri}/checkpoints/step-00000010"}
    reference = tiny.run(
        2, uri=(tmp_path / "nested").as_uri(), endpoint=None, tmp=tmp_path, name="reference", steps=15, every=5
    )
    for step in range(11, 16):  # resuming from the toy store continues exactly where the uninterrupted run is
        assert abs(resumed.losses[step] - reference.losses[step]) <= 1e-6, (step, resumed.losses, reference.losses)


def test_local_paths_of_local_uris(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KUBETUNE_PVC_ROOT", str(tmp_path / "pvc"))
    assert local_path("file:///data/train.jsonl") == Path("/data/train.jsonl")
    assert local_path("file://localhost/data/x") == Path("/data/x")
    assert local_path("file://data/x.jsonl") == Path("data/x.jsonl")  # data URIs may be relative
    assert local_path("pvc://datasets/reviews/train.jsonl") == tmp_path / "pvc" / "datasets/reviews/train.jsonl"
    assert local_path("relative/train.csv") == Path("relative/train.csv")
    assert local_path("s3://bucket/x") is None
    assert local_path("hf://org/model") is None
    store = open_store("pvc://scratch/ckpt")
    store.put_bytes("LATEST", b"x")
    assert (tmp_path / "pvc" / "scratch" / "ckpt" / "LATEST").read_bytes() == b"x"
    with pytest.raises(StorageError, match="must be absolute"):
        open_store("file://relative/dir")
