"""The storage interface against the real S3 protocol (moto on loopback) and a local directory."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from kubetune_trainer.storage import (
    LocalStore,
    ObjectInfo,
    RetryPolicy,
    S3Store,
    StorageError,
    StorageUnavailable,
    Store,
    open_store,
)
from tests.support.s3 import FAKE_CREDENTIALS, S3Endpoint, free_port

FAST_RETRY = RetryPolicy(attempts=3, base_seconds=0.05, max_seconds=0.2)


@pytest.fixture(params=["s3", "file"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "s3":
        endpoint: S3Endpoint = request.getfixturevalue("s3_server")
        yield open_store(endpoint.uri("jobs/a"), endpoint=endpoint.endpoint, retry=FAST_RETRY)
    else:
        yield open_store((tmp_path / "store").as_uri())


def test_open_store_picks_the_implementation(tmp_path: Path, s3_server: S3Endpoint) -> None:
    assert isinstance(open_store(s3_server.uri("x/y"), endpoint=s3_server.endpoint), S3Store)
    assert isinstance(open_store(f"file://{tmp_path}"), LocalStore)
    assert isinstance(open_store(str(tmp_path)), LocalStore)
    with pytest.raises(StorageError, match="unsupported storage URI"):
        open_store("ftp://host/x")
    with pytest.raises(StorageError, match="bucket"):
        open_store("s3:///nobucket")


def test_bytes_round_trip_exists_and_delete(store: Store) -> None:
    assert not store.exists("a/b.txt")
    store.put_bytes("a/b.txt", b"hello")
    assert store.exists("a/b.txt")
    assert store.get_bytes("a/b.txt") == b"hello"
    store.delete("a/b.txt")
    assert not store.exists("a/b.txt")
    with pytest.raises(FileNotFoundError, match=r"a/b\.txt"):
        store.get_bytes("a/b.txt")
    store.delete("a/b.txt")  # absent: no error


def test_list_is_a_string_prefix_and_sorted(store: Store) -> None:
    for key in ["checkpoints/step-00000010/x", "checkpoints/step-00000002/y", "checkpoints/LATEST", "other"]:
        store.put_bytes(key, key.encode())
    assert [o.key for o in store.list("checkpoints/")] == [
        "checkpoints/LATEST",
        "checkpoints/step-00000002/y",
        "checkpoints/step-00000010/x",
    ]
    assert [o.key for o in store.list("checkpoints/step-")] == [
        "checkpoints/step-00000002/y",
        "checkpoints/step-00000010/x",
    ]
    assert store.list("checkpoints/step-00000010/") == [
        ObjectInfo("checkpoints/step-00000010/x", len("checkpoints/step-00000010/x"))
    ]
    assert len(store.list("")) == 4
    store.delete_prefix("checkpoints/step-00000002/")
    assert [o.key for o in store.list("")] == ["checkpoints/LATEST", "checkpoints/step-00000010/x", "other"]


def test_large_file_and_directory_round_trip(store: Store, tmp_path: Path) -> None:
    # 17 MiB: above the 8 MiB multipart threshold of the S3 store, so parts go in parallel.
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    big = os.urandom(17 * 1024 * 1024)
    (src / "big.bin").write_bytes(big)
    (src / "sub" / "small.txt").write_bytes(b"small")
    uploaded = store.upload_dir(src, "ckpt/step-1")
    assert uploaded == [ObjectInfo("ckpt/step-1/big.bin", len(big)), ObjectInfo("ckpt/step-1/sub/small.txt", 5)]
    assert store.list("ckpt/") == uploaded

    dst = tmp_path / "dst"
    paths = store.download_prefix("ckpt/step-1", dst)
    assert paths == [dst / "big.bin", dst / "sub" / "small.txt"]
    assert (dst / "big.bin").read_bytes() == big
    store.get_file("ckpt/step-1/sub/small.txt", tmp_path / "one" / "file")
    assert (tmp_path / "one" / "file").read_bytes() == b"small"
    store.put_file(src / "big.bin", "single")
    assert store.list("single") == [ObjectInfo("single", len(big))]
    # No temporary files are left next to the downloads.
    assert sorted(p.name for p in dst.rglob("*")) == ["big.bin", "small.txt", "sub"]


def test_upload_with_move_leaves_a_stored_copy_that_outlives_the_local_files(store: Store, tmp_path: Path) -> None:
    src = tmp_path / "staging"
    (src / "sub").mkdir(parents=True)
    (src / "a.bin").write_bytes(b"a" * 1000)
    (src / "sub" / "b.bin").write_bytes(b"b" * 10)
    uploaded = store.upload_dir(src, "ckpt/step-2", move=True)
    assert uploaded == [ObjectInfo("ckpt/step-2/a.bin", 1000), ObjectInfo("ckpt/step-2/sub/b.bin", 10)]
    shutil.rmtree(src)  # what the checkpoint manager does after the upload
    assert store.get_bytes("ckpt/step-2/a.bin") == b"a" * 1000
    assert store.get_bytes("ckpt/step-2/sub/b.bin") == b"b" * 10


def test_local_store_move_links_on_the_same_filesystem_and_copies_otherwise(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "store"))
    src = tmp_path / "staging"
    src.mkdir()
    (src / "shard").write_bytes(b"x" * 100)
    store.upload_dir(src, "linked", move=True)
    assert os.path.samefile(src / "shard", tmp_path / "store" / "linked" / "shard")  # written once, not twice
    store.upload_dir(src, "copied")
    assert not os.path.samefile(src / "shard", tmp_path / "store" / "copied" / "shard")
    shm = Path("/dev/shm")
    if shm.is_dir() and os.stat(shm).st_dev != os.stat(tmp_path).st_dev:
        other = Path(tempfile.mkdtemp(dir=shm))
        try:
            (other / "shard").write_bytes(b"y" * 100)
            store.upload_dir(other, "cross-device", move=True)  # EXDEV: falls back to a copy
            assert store.get_bytes("cross-device/shard") == b"y" * 100
        finally:
            shutil.rmtree(other)


def test_download_prefix_skips_s3_folder_markers(s3_server: S3Endpoint, tmp_path: Path) -> None:
    # The S3 console's "Create folder" (and s3fs, Hadoop's s3a) store empty objects named "<folder>/":
    # they are no files, and a model folder made that way downloads like any other.
    for key, body in [
        ("models/tiny/", b""),
        ("models/tiny/config.json", b"{}"),
        ("models/tiny/tokenizer/", b""),
        ("models/tiny/tokenizer/vocab.txt", b"a\nb\n"),
    ]:
        s3_server.write(key, body)
    store = open_store(s3_server.uri("models/tiny"), endpoint=s3_server.endpoint, retry=FAST_RETRY)
    dst = tmp_path / "model"
    assert store.download_prefix("", dst) == [dst / "config.json", dst / "tokenizer" / "vocab.txt"]
    assert (dst / "tokenizer" / "vocab.txt").read_bytes() == b"a\nb\n"
    assert sorted(p.relative_to(dst).as_posix() for p in dst.rglob("*")) == [
        "config.json",
        "tokenizer",
        "tokenizer/vocab.txt",
    ]


def test_abort_incomplete_multipart_uploads(s3_server: S3Endpoint) -> None:
    client = s3_server.client()
    client.create_multipart_upload(Bucket=s3_server.bucket, Key="jobs/a/checkpoints/step-00000005/shard")
    client.create_multipart_upload(Bucket=s3_server.bucket, Key="elsewhere/shard")
    store = open_store(s3_server.uri("jobs/a"), endpoint=s3_server.endpoint)
    assert store.abort_incomplete_uploads("checkpoints/") == 1
    remaining = client.list_multipart_uploads(Bucket=s3_server.bucket).get("Uploads", [])
    assert [u["Key"] for u in remaining] == ["elsewhere/shard"]


def test_local_store_removes_leftover_temporary_files(tmp_path: Path) -> None:
    store = open_store(str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "shard.kubetune-tmp-123").write_bytes(b"half")
    assert store.list("checkpoints/") == []
    assert store.abort_incomplete_uploads("checkpoints/") == 1
    assert not any((tmp_path / "checkpoints").iterdir())


def test_unreachable_endpoint_raises_storage_unavailable_without_leaking_credentials(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    for name, value in FAKE_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    store = open_store("s3://bucket/x", endpoint=f"http://127.0.0.1:{free_port()}", retry=FAST_RETRY)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(StorageUnavailable, match="after 3 attempts"):
        store.put_bytes("k", b"v")
    (tmp_path / "f").write_bytes(b"v")
    with pytest.raises(StorageUnavailable):
        store.upload_dir(tmp_path, "p")
    assert "retrying in" in caplog.text
    assert FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"] not in caplog.text


def test_missing_bucket_is_a_permanent_error(s3_server: S3Endpoint) -> None:
    store = open_store("s3://no-such-bucket/x", endpoint=s3_server.endpoint, retry=FAST_RETRY)
    with pytest.raises(StorageError) as info:
        store.put_bytes("k", b"v")
    assert not isinstance(info.value, StorageUnavailable)


def test_keys_may_not_escape_the_root(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "root"))
    with pytest.raises(StorageError, match="invalid storage key"):
        store.put_bytes("../outside", b"x")


def test_open_upload_stores_files_added_while_earlier_ones_transfer(store: Store, tmp_path: Path) -> None:
    src = tmp_path / "staging"
    src.mkdir()
    (src / "first.bin").write_bytes(os.urandom(9 << 20))  # above the multipart threshold
    upload = store.open_upload("ckpt/step-3/", move=True)
    upload.add(src / "first.bin", "first.bin")
    (src / "second.bin").write_bytes(b"2" * 100)  # written after the first one started
    upload.add(src / "second.bin", "sub/second.bin")
    with pytest.raises(ValueError, match=r"ckpt/step-3/sub/second\.bin was already added"):
        upload.add(src / "second.bin", "sub/second.bin")
    assert upload.finish() == [
        ObjectInfo("ckpt/step-3/first.bin", 9 << 20),
        ObjectInfo("ckpt/step-3/sub/second.bin", 100),
    ]
    assert store.get_bytes("ckpt/step-3/first.bin") == (src / "first.bin").read_bytes()
    assert store.get_bytes("ckpt/step-3/sub/second.bin") == b"2" * 100


def test_a_cancelled_upload_leaves_no_object_and_no_open_multipart_upload(
    s3_server: S3Endpoint, tmp_path: Path
) -> None:
    store = open_store(s3_server.uri("jobs/cancel"), endpoint=s3_server.endpoint, retry=FAST_RETRY)
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(64 << 20))
    upload = store.open_upload("ckpt/step-4/")
    upload.add(big, "big.bin")
    upload.cancel()
    assert not store.exists("ckpt/step-4/big.bin")
    assert store.abort_incomplete_uploads("ckpt/") == 0  # the transfer manager aborted its own


def test_local_store_flushes_objects_and_their_directories_to_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    flushed: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        flushed.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    root = tmp_path / "store"
    store = open_store(root.as_uri())
    store.put_bytes("ckpt/LATEST", b"step-1\n")
    src = tmp_path / "staging"
    src.mkdir()
    (src / "a.pt").write_bytes(b"a" * 10)
    (src / "b.pt").write_bytes(b"b" * 10)
    store.upload_dir(src, "ckpt/step-1", move=True)
    ckpt, step = str(root / "ckpt"), str(root / "ckpt" / "step-1")
    latest = [f for f in flushed if Path(f).name.startswith("LATEST.kubetune-tmp-")]
    assert len(latest) == 1
    # put_bytes: the new directory ckpt/ into the root, the data, then the rename into ckpt/.
    assert flushed[: flushed.index(latest[0]) + 2] == [str(root), latest[0], ckpt]
    # upload (files in parallel, so in any order): step-1/ into ckpt/ and each file's data; then, once every
    # file is in, step-1/ once for all the renames.
    rest = flushed[flushed.index(latest[0]) + 2 :]
    assert sorted(Path(f).name.split(".kubetune-tmp-")[0] for f in rest[:-1] if f != ckpt) == ["a.pt", "b.pt"]
    assert ckpt in rest[:-1]  # once, or once per thread that found step-1/ missing
    assert rest[-1] == step
    assert flushed.count(step) == 1
