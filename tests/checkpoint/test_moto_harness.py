"""The test harness's repair of moto's request recording (tests/support/s3.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.s3 import FAKE_CREDENTIALS, one_request_per_line, threaded_moto


def test_requests_recorded_on_one_line_are_split_in_order(tmp_path: Path) -> None:
    recording = tmp_path / "moto_recording"
    first = {"method": "PUT", "url": "/b/k1?partNumber=1", "body": "eA=="}
    second = {"method": "PUT", "url": "/b/k2", "body": "{not json}"}
    third = {"method": "POST", "url": "/b/k1?uploadId=u"}
    # Two handler threads appended at once: two documents on one line, then a normal line.
    recording.write_text(json.dumps(first) + json.dumps(second) + "\n" + json.dumps(third) + "\n")
    one_request_per_line(recording)
    lines = recording.read_text().splitlines()
    assert [json.loads(line) for line in lines] == [first, second, third]


def test_a_clean_recording_keeps_its_requests_and_blank_lines_go(tmp_path: Path) -> None:
    recording = tmp_path / "moto_recording"
    requests = [{"method": "PUT", "url": f"/b/k{i}"} for i in range(3)]
    recording.write_text("".join(json.dumps(r) + "\n" for r in requests) + "\n  \n")
    one_request_per_line(recording)
    assert [json.loads(line) for line in recording.read_text().splitlines()] == requests


def test_a_new_in_process_server_starts_with_an_empty_bucket(monkeypatch: pytest.MonkeyPatch) -> None:
    # moto's state is process-wide: without the reset, a test would list what an earlier one left.
    for name, value in FAKE_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    with threaded_moto() as first:
        first.client().put_object(Bucket=first.bucket, Key="jobs/a/left-behind", Body=b"1")
        assert first.keys() == ["jobs/a/left-behind"]
    with threaded_moto() as second:
        assert second.keys() == []
