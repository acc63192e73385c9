"""Waiting for the token store: a timeout sized to the data, a progress line, the builder's error everywhere."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from kubetune_trainer import datacache
from kubetune_trainer.errors import InvalidData, TrainerError
from kubetune_trainer.spec.layout import token_cache_uri


def _place(tmp_path: Path, remote: bool = False) -> datacache.CachePlace:
    checkpoint = f"file://{tmp_path / 'ckpt'}" if remote else None
    return datacache.CachePlace.for_job("k" * 24, tmp_path / "work", checkpoint, None, None, nonce="attempt2")


def test_the_timeout_grows_with_the_data() -> None:
    assert datacache.wait_timeout(0) == datacache.BASE_TIMEOUT_SECONDS
    assert datacache.wait_timeout(500 << 20) == datacache.BASE_TIMEOUT_SECONDS + 500  # 0.5 GB: 8 more minutes
    assert datacache.wait_timeout(50 << 30) > 14 * 3600  # 50 GB: far beyond a 10-minute collective


def test_the_cache_lives_next_to_the_checkpoints() -> None:
    assert token_cache_uri("s3://ckpt/ml/job", "abc") == "s3://ckpt/ml/job/tokens/abc"


def test_a_waiting_rank_reports_progress_and_gets_the_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(datacache, "PROGRESS_EVERY_SECONDS", 0.0)
    place = _place(tmp_path)

    def build() -> None:
        datacache.publish_progress(place, "tokenizing train: chunk 3/9, 6,000 rows, 4 s", remote=False)
        time.sleep(1.5)
        staging = tmp_path / "staging"
        staging.mkdir()
        (staging / "meta.json").write_text("{}")
        datacache.install(staging, place.local)

    builder = threading.Thread(target=build)
    builder.start()
    datacache.wait_for(place, remote=False, timeout=60, rank=1, report=True)
    builder.join()
    assert place.local_complete
    err = capsys.readouterr().err
    assert "rank 1 waiting for the token store from this node: tokenizing train: chunk 3/9, 6,000 rows" in err
    assert "timeout in" in err


def test_the_builders_data_error_reaches_the_waiting_ranks_of_every_node(tmp_path: Path) -> None:
    place = _place(tmp_path, remote=True)
    error = InvalidData("s3://d/train.jsonl line 9: missing field 'messages' (dataset.messagesField)")
    datacache.publish_failure(place, error)
    for remote in (False, True):  # the node's other ranks, and other nodes through the job's storage
        with pytest.raises(InvalidData, match=r"line 9: missing field 'messages'"):
            datacache.wait_for(place, remote=remote, timeout=60, rank=3, report=False)
    stale = datacache.CachePlace(place.key, place.local, place.remote, nonce="attempt3")
    with pytest.raises(TrainerError, match=r"no token store .* after 1 s"):  # another attempt's failure is not ours
        datacache.wait_for(stale, remote=False, timeout=1, rank=3, report=False)


def test_a_stuck_builder_times_out_with_its_last_progress(tmp_path: Path) -> None:
    place = _place(tmp_path)
    datacache.publish_progress(place, "tokenizing train: chunk 1/9", remote=False)
    started = time.monotonic()
    with pytest.raises(TrainerError) as caught:
        datacache.wait_for(place, remote=False, timeout=1, rank=2, report=False)
    assert time.monotonic() - started < 10
    assert type(caught.value) is TrainerError  # retryable: a new attempt may get further
    assert "last progress: tokenizing train: chunk 1/9" in caught.value.message
