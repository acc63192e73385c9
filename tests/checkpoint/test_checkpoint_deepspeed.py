"""CheckpointManager with real DeepSpeed ZeRO-2 processes (torchrun, 2 ranks, gloo) and moto S3 on loopback.

The runs share one moto server (module scope).  ``base`` trains 20 steps,
saving every 5 with keepLast 3; ``reference`` trains 30 uninterrupted steps.
Other tests copy ``base``'s objects to a prefix of their own, damage them as the
test needs, and resume from there.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from tests.checkpoint import tiny
from tests.support.s3 import S3Endpoint, threaded_moto

CKPT = "checkpoints"


def tag(step: int) -> str:
    return f"step-{step:08d}"


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Endpoint]:
    with threaded_moto("kubetune-ckpt") as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def base(s3: S3Endpoint, runs_dir: Path) -> tiny.TinyRun:
    """2 ranks, ZeRO-2, synchronous uploads, keepLast 3: commits steps 5, 10, 15, 20 and keeps 10, 15, 20."""
    return tiny.run(2, uri=s3.uri("base"), endpoint=s3, tmp=runs_dir, name="base", steps=20, every=5, sync=True)


@pytest.fixture(scope="module")
def reference(s3: S3Endpoint, runs_dir: Path) -> tiny.TinyRun:
    """The same training, uninterrupted for 30 steps, asynchronous uploads, keepLast 1, watching retention."""
    return tiny.run(
        2,
        uri=s3.uri("reference"),
        endpoint=s3,
        tmp=runs_dir,
        name="reference",
        steps=30,
        every=10,
        keep_last=1,
        watch_retention=True,
    )


def assert_weights_close(actual: dict, expected: dict, tol: float) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        diff = (actual[name] - expected[name]).abs().max().item()
        assert diff <= tol, f"{name} differs by {diff}"


def assert_losses_close(actual: dict[int, float], expected: dict[int, float], steps: range, tol: float) -> None:
    assert sorted(actual) == list(steps), sorted(actual)
    for step in steps:
        assert abs(actual[step] - expected[step]) <= tol, (step, actual[step], expected[step])


def test_commit_writes_every_rank_then_manifest_then_latest(s3: S3Endpoint, base: tiny.TinyRun) -> None:
    keys = s3.keys("base/")
    assert s3.read(f"base/{CKPT}/LATEST").decode().strip() == tag(20)
    # keepLast 3: step 5 was deleted after step 20 was committed.
    assert sorted({k.split("/")[2] for k in keys if "/step-" in k}) == [tag(10), tag(15), tag(20)]
    for step in (10, 15, 20):
        prefix = f"base/{CKPT}/{tag(step)}/"
        manifest = json.loads(s3.read(prefix + "MANIFEST.json"))
        assert (manifest["step"], manifest["tag"]) == (step, tag(step))
        assert (manifest["worldSize"], manifest["zeroStage"]) == (2, 2)
        assert manifest["specHash"] == "tiny-test-spec"
        assert {"torch", "deepspeed", "python"} <= manifest["versions"].keys()
        names = {f["name"]: f for f in manifest["files"]}
        # Both ranks' ZeRO shards and RNG states, rank 0's model states; DeepSpeed's `latest` never.
        assert names.keys() >= {
            "mp_rank_00_model_states.pt",
            "zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "zero_pp_rank_1_mp_rank_00_optim_states.pt",
            "kubetune-rng-rank-00000.pt",
            "kubetune-rng-rank-00001.pt",
        }
        assert names["zero_pp_rank_1_mp_rank_00_optim_states.pt"]["rank"] == 1
        assert not any(k.endswith("/latest") for k in keys)
        # Every object of the step is in the manifest with its true size and sha256.
        stored = [k for k in keys if k.startswith(prefix) and not k.endswith("MANIFEST.json")]
        assert sorted(k[len(prefix) :] for k in stored) == sorted(names)
        for key in stored:
            data = s3.read(key)
            entry = names[key[len(prefix) :]]
            assert entry["size"] == len(data)
            assert entry["sha256"] == hashlib.sha256(data).hexdigest()
        assert manifest["totalBytes"] == sum(f["size"] for f in manifest["files"])
    assert s3.client().list_multipart_uploads(Bucket=s3.bucket).get("Uploads", []) == []


def test_resume_equals_uninterrupted_and_ignores_a_stale_deepspeed_latest(
    s3: S3Endpoint, base: tiny.TinyRun, reference: tiny.TinyRun, runs_dir: Path
) -> None:
    tiny.copy_prefix(s3, "base", "resume")
    # A crashed save of step 30: DeepSpeed's `latest` names it, one shard exists, no manifest.
    s3.write(f"resume/{CKPT}/latest", tag(30).encode())
    s3.write(f"resume/{CKPT}/{tag(30)}/mp_rank_00_model_states.pt", b"half a file")
    run = tiny.run(2, uri=s3.uri("resume"), endpoint=s3, tmp=runs_dir, name="resume", steps=30, every=10)
    assert run.result["restored"] == {
        "step": 20,
        "fell_back_from": None,
        "uri": f"{s3.uri('resume')}/{CKPT}/{tag(20)}",
    }
    assert_losses_close(run.losses, reference.losses, range(21, 31), tol=1e-6)
    assert_weights_close(run.weights(), reference.weights(), tol=1e-6)
    # Its metrics date the resumed checkpoint when it was saved, not when it was restored.
    saved = json.loads(s3.read(f"resume/{CKPT}/{tag(20)}/MANIFEST.json"))["created"]
    assert run.result["restored_gauges"] == {"step": 20.0, "time": datetime.fromisoformat(saved).timestamp()}
    # The debris of the crashed save was removed before step 30 was saved again, and step 30 verifies.
    manifest = json.loads(s3.read(f"resume/{CKPT}/{tag(30)}/MANIFEST.json"))
    model_states = next(f for f in manifest["files"] if f["name"] == "mp_rank_00_model_states.pt")
    data = s3.read(f"resume/{CKPT}/{tag(30)}/mp_rank_00_model_states.pt")
    assert hashlib.sha256(data).hexdigest() == model_states["sha256"]
    assert s3.read(f"resume/{CKPT}/LATEST").decode().strip() == tag(30)


def test_corrupt_checkpoints_fail_verification_and_the_previous_complete_one_is_used(
    s3: S3Endpoint, base: tiny.TinyRun, reference: tiny.TinyRun, runs_dir: Path
) -> None:
    tiny.copy_prefix(s3, "base", "corrupt")
    # step 20: a truncated shard (rank 0 sees the size differ from the manifest in the listing).
    key20 = f"corrupt/{CKPT}/{tag(20)}/zero_pp_rank_0_mp_rank_00_optim_states.pt"
    s3.write(key20, s3.read(key20)[:-100])
    # step 15: one flipped bit, same size (only the sha256 of rank 1's download can tell).
    key15 = f"corrupt/{CKPT}/{tag(15)}/zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = bytearray(s3.read(key15))
    data[len(data) // 2] ^= 0x01
    s3.write(key15, bytes(data))
    run = tiny.run(2, uri=s3.uri("corrupt"), endpoint=s3, tmp=runs_dir, name="corrupt", steps=14, every=10)
    assert run.result["restored"]["step"] == 10
    assert run.result["restored"]["fell_back_from"] == 20
    assert f"checkpoint {tag(20)} failed verification" in run.log
    assert "bytes, manifest says" in run.log
    assert f"checkpoint {tag(15)} failed verification" in run.log
    assert "sha256 differs from the manifest" in run.log
    # Resumed from step 10 exactly: the same losses as the uninterrupted run.
    assert_losses_close(run.losses, reference.losses, range(11, 15), tol=1e-6)
    # The failed checkpoints were removed; LATEST names the newest commit.
    assert [k for k in s3.keys(f"corrupt/{CKPT}/") if tag(15) in k or tag(20) in k] == []
    assert s3.read(f"corrupt/{CKPT}/LATEST").decode().strip() == tag(14)


def test_retention_keeps_the_newest_complete_checkpoint_also_while_a_save_is_in_flight(
    s3: S3Endpoint, reference: tiny.TinyRun
) -> None:
    # The reference run (keepLast 1) listed the store after every step, also right after each save started.
    log = reference.result["retention_log"]
    assert any(entry["in_flight"] for entry in log), "no step observed an upload in flight"
    first_commit = None
    for entry in log:
        if entry["latest"] is not None:
            first_commit = first_commit or entry["step"]
            latest_step = int(entry["latest"].rsplit("-", 1)[1])
            # What LATEST names is complete, unless a newer commit (listed after LATEST was read) replaced it.
            assert latest_step in entry["committed"] or max(entry["committed"]) > latest_step, entry
        if first_commit is not None:
            assert entry["committed"], entry  # once one checkpoint is complete there is always one
        if entry["latest"] is not None and not entry["in_flight"]:
            # The pod's gauge names the commit as soon as its background upload is done, not a save later.
            assert entry["gauge"] == int(entry["latest"].rsplit("-", 1)[1]), entry
        saving = entry["step"] // 10 * 10  # the save in flight at this step
        if entry["in_flight"] and saving > 10:
            # The previous checkpoint stays until this one is committed (which may just have happened;
            # retention removes the previous one right after the commit).
            assert entry["committed"], entry
            assert set(entry["committed"]) <= {saving - 10, saving}, entry
    keys = s3.keys(f"reference/{CKPT}/")
    assert {k.split("/")[2] for k in keys if "/step-" in k} == {tag(30)}
    assert s3.client().list_multipart_uploads(Bucket=s3.bucket, Prefix="reference/").get("Uploads", []) == []


def test_resume_on_one_rank_from_two_ranks(
    s3: S3Endpoint, base: tiny.TinyRun, reference: tiny.TinyRun, runs_dir: Path
) -> None:
    tiny.copy_prefix(s3, "base", "shrink")
    run = tiny.run(1, uri=s3.uri("shrink"), endpoint=s3, tmp=runs_dir, name="shrink", steps=30, every=10)
    assert run.result["restored"]["step"] == 20
    assert "to a universal checkpoint for world size 1" in run.log
    # The universal checkpoint restores the weights exactly and the optimizer state: the loss curve continues
    # as if nothing happened (the global batch is the same at any world size).
    assert_weights_close(run.weights("restored"), base.weights(), tol=0.0)
    assert_losses_close(run.losses, reference.losses, range(21, 31), tol=1e-5)
    manifest = json.loads(s3.read(f"shrink/{CKPT}/{tag(30)}/MANIFEST.json"))
    assert manifest["worldSize"] == 1


@pytest.mark.slow
def test_resume_on_two_ranks_from_one_rank(s3: S3Endpoint, reference: tiny.TinyRun, runs_dir: Path) -> None:
    single = tiny.run(1, uri=s3.uri("grow"), endpoint=s3, tmp=runs_dir, name="grow-1", steps=20, every=10)
    assert_losses_close(single.losses, reference.losses, range(1, 21), tol=1e-5)
    run = tiny.run(2, uri=s3.uri("grow"), endpoint=s3, tmp=runs_dir, name="grow-2", steps=30, every=10)
    assert run.result["restored"]["step"] == 20
    assert "to a universal checkpoint for world size 2" in run.log
    assert_weights_close(run.weights("restored"), single.weights(), tol=0.0)
    assert_losses_close(run.losses, reference.losses, range(21, 31), tol=1e-5)
