"""The typed contracts shared by the trainer and the operator (all pure, in ``kubetune_trainer.spec``):
the termination message, the layout of a job's URIs and the table of conditions."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from kubetune_operator.conditions import derive_phase, set_condition
from kubetune_trainer.errors import read_termination_message, write_termination
from kubetune_trainer.spec import ConditionType, Phase
from kubetune_trainer.spec import layout as lay
from kubetune_trainer.spec.runtime import PERMANENT_REASONS, ExitCode, reason_of
from kubetune_trainer.spec.status import phase_of
from kubetune_trainer.spec.termination import MAX_TERMINATION_BYTES, TerminationMessage

NOW = datetime(2026, 1, 2, tzinfo=UTC)


# -- the termination message


def test_what_the_trainer_writes_the_operator_reads(tmp_path: Path) -> None:
    path = tmp_path / "termination-log"
    extra = {
        "step": 40,
        "evaluation": {"accuracy": 0.9, "f1": 0.8},
        "output": {"uri": "s3://models/x"},
        "checkpoint": {"uri": "s3://ckpt/x", "step": 40},
        "resumedFrom": 20,
        "checkpointFallback": {"from": 30, "to": 20},
    }
    assert write_termination("Succeeded", "trained\n40 steps", 0, path=path, **extra)
    message = TerminationMessage.parse(path.read_text())
    assert message is not None
    assert (message.reason, message.message, message.exit_code, message.step) == (
        "Succeeded",
        "trained 40 steps",
        0,
        40,
    )
    assert message.evaluation == {"accuracy": 0.9, "f1": 0.8}
    assert message.output is not None
    assert message.output.uri == "s3://models/x"
    assert message.checkpoint is not None
    assert (message.checkpoint.uri, message.checkpoint.step) == ("s3://ckpt/x", 40)
    assert message.resumed_from == 20
    assert message.checkpoint_fallback is not None
    assert (message.checkpoint_fallback.from_step, message.checkpoint_fallback.to_step) == (30, 20)
    assert json.loads(path.read_text()) == {
        "reason": "Succeeded",
        "message": "trained 40 steps",
        "exitCode": 0,
        **extra,
    }
    assert read_termination_message(path) == message


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "OOMKilled",
        "Traceback (most recent call last):\n ...",
        "{not json",
        "[1, 2]",
        '{"message": "no reason"}',
    ],
)
def test_plain_text_and_other_objects_are_not_messages(text: str) -> None:
    assert TerminationMessage.parse(text) is None


def test_reading_is_lenient_with_newer_or_sloppier_writers() -> None:
    text = '{"reason": "Succeeded", "exitCode": 0, "newField": 1, "evaluation": {"f1": 0.5, "note": "x", "ok": true}}'
    message = TerminationMessage.parse(text)
    assert message is not None
    assert message.evaluation == {"f1": 0.5}  # only numbers are metrics


def test_a_long_message_is_cut_below_the_kubernetes_limit() -> None:
    message = TerminationMessage(
        reason="InvalidData", message="x" * 10_000, exit_code=11, evaluation={f"m{i}": 0.5 for i in range(500)}
    )
    data = message.to_bytes()
    assert len(data) <= MAX_TERMINATION_BYTES
    assert json.loads(data)["reason"] == "InvalidData"
    assert json.loads(data)["exitCode"] == 11


def test_permanent_reasons_are_the_permanent_exit_codes_by_name() -> None:
    assert reason_of(ExitCode.NON_FINITE_LOSS) == "NonFiniteLoss"
    assert frozenset(
        {"InvalidSpec", "InvalidData", "InvalidModel", "NonFiniteLoss", "OutOfMemory", "IncompatibleCheckpoint"}
    ) == (PERMANENT_REASONS)


# -- the layout of a job's URIs


def test_the_checkpoint_layout() -> None:
    assert lay.tag_for(500) == "step-00000500"
    assert lay.step_of("step-00000500") == 500
    assert lay.step_of("step-123456789") == 123456789
    assert lay.step_of("step-5") is None
    assert lay.step_prefix(7) == "checkpoints/step-00000007/"
    assert lay.LATEST_KEY == "checkpoints/LATEST"
    with pytest.raises(ValueError, match=">= 0"):
        lay.tag_for(-1)


@pytest.mark.parametrize("root", ["s3://ckpt/ml/job", "s3://ckpt/ml/job/", "file:///data/job"])
def test_uris_derived_from_the_checkpoint_root(root: str) -> None:
    base = root.rstrip("/")
    assert lay.checkpoint_step_uri(root, 25) == f"{base}/checkpoints/step-00000025"
    assert lay.default_output_uri(root) == f"{base}/output"
    assert lay.job_uri(root, "ml", "x") == f"{base}/ml/x"


def test_pvc_uris() -> None:
    assert lay.pvc_claim("pvc://models/minilm/v1") == "models"
    assert lay.pvc_claim("s3://models/minilm") is None
    assert lay.pvc_relative_path("pvc://models/minilm") == "models/minilm"
    assert lay.pvc_mount_path("models") == "/mnt/pvc/models"


# -- the table of conditions


def test_each_row_of_the_table_is_complete() -> None:
    for kind in ConditionType:
        assert isinstance(kind.phase, Phase)
        assert all(ConditionType.of(other) is not kind for other in kind.clears)
    assert {kind for kind in ConditionType if kind.warning} == {
        ConditionType.FAILED,
        ConditionType.RESTARTING,
        ConditionType.STALLED,
        ConditionType.CHILD_CONFLICT,
    }
    # PodsReady is the one condition whose turning False is the news (a pod cannot start).
    assert {kind for kind in ConditionType if kind.false_is_news} == {ConditionType.PODS_READY}
    with pytest.raises(ValueError, match="unknown condition type"):
        ConditionType.of("Sleeping")


@pytest.mark.parametrize(
    ("true", "phase"),
    [
        (set(), Phase.PENDING),
        ({ConditionType.CREATED}, Phase.PENDING),
        ({ConditionType.CREATED, ConditionType.RUNNING}, Phase.RUNNING),
        ({ConditionType.RUNNING, ConditionType.RESTARTING}, Phase.RESTARTING),
        ({ConditionType.RUNNING, ConditionType.SUSPENDED}, Phase.SUSPENDED),
        ({ConditionType.SUSPENDED, ConditionType.SUCCEEDED}, Phase.SUCCEEDED),
        ({ConditionType.SUCCEEDED, ConditionType.FAILED}, Phase.FAILED),
        (set(ConditionType), Phase.FAILED),
    ],
)
def test_the_phase_is_the_last_true_row(true: set[ConditionType], phase: Phase) -> None:
    assert phase_of(true) == phase
    conditions: list[dict[str, object]] = []
    for kind in ConditionType:
        conditions = set_condition(conditions, kind, kind in true, "Reason", "", NOW)
    assert derive_phase(conditions) == phase
