"""The launcher's exit-code mapping and the termination message (pure parts)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetune_trainer.errors import read_termination, termination_payload, write_termination
from kubetune_trainer.launch import exit_code_for


@pytest.mark.parametrize(
    ("codes", "sigterm", "reason", "expected"),
    [
        ([0, 0], False, None, 0),
        ([11, 1], False, None, 11),  # a permanent code wins over a crash of another rank
        ([-9, 13], False, None, 13),
        ([1], False, None, 20),  # an unexplained crash is retryable
        ([-9], False, None, 20),  # OOM kill
        ([21, 21], True, "Preempted", 21),
        ([21, -15], True, "Preempted", 21),
        ([-15, -15], True, None, 20),  # SIGTERM before any checkpoint was committed
        ([20, 20], True, "Error", 20),
        ([21], False, None, 21),  # a worker SIGTERMed directly still reports its committed checkpoint
    ],
)
def test_exit_code_for(codes: list[int], sigterm: bool, reason: str | None, expected: int) -> None:
    termination = {"reason": reason} if reason else None
    assert exit_code_for(codes, sigterm=sigterm, termination=termination) == expected


def test_termination_first_writer_wins_and_stays_small(tmp_path: Path) -> None:
    path = tmp_path / "termination-log"
    path.write_text("")  # Kubernetes creates the file empty
    assert write_termination("InvalidData", "train.jsonl line 3: bad\nlabel", 11, path=path)
    assert not write_termination("Error", "second", 20, path=path)
    body = read_termination(path)
    assert body == {"reason": "InvalidData", "message": "train.jsonl line 3: bad label", "exitCode": 11}
    assert write_termination("Succeeded", "done", 0, overwrite=True, path=path, step=5)
    assert json.loads(path.read_text())["step"] == 5


def test_termination_payload_is_cut_below_4k() -> None:
    data = termination_payload("Error", "x" * 10_000, 20, evaluation={f"m{i}": 0.5 for i in range(500)})
    assert len(data) < 4096
    assert json.loads(data)["reason"] == "Error"
