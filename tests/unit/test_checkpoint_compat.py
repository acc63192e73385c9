"""Which checkpoint a job may resume (pure): the fields that shape weights and optimizer state must match,
a job's own checkpoints always resume, and ``checkpoint.resume`` decides for another job's."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune_trainer.checkpoint import compat
from kubetune_trainer.checkpoint.manifest import FileEntry, Manifest, build_manifest
from kubetune_trainer.spec import FineTuneJob
from kubetune_trainer.spec.runtime import PERMANENT_REASONS, ExitCode, is_permanent_failure

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = yaml.safe_load((ROOT / "examples" / "lora-sequence-classification.yaml").read_text())
URI = "s3://ckpt/ml/reviews-lora/checkpoints/step-00000500"


def spec_with(change: Any = None) -> Any:
    doc = copy.deepcopy(EXAMPLE)
    if change is not None:
        change(doc["spec"])
    return FineTuneJob.model_validate(doc).spec


BASE = compat.compatibility_of(spec_with())


def test_the_compatibility_fields_are_the_weight_shaping_ones() -> None:
    assert BASE["spec.model.source"] == "hf://sentence-transformers/all-MiniLM-L6-v2"
    assert BASE["spec.model.labels"] == ["negative", "positive"]
    assert BASE["spec.strategy.lora.r"] == 8
    assert BASE["spec.deepspeed.zeroStage"] == 2
    assert BASE["spec.training.precision"] == "bf16"
    assert not any(key.startswith(("spec.dataset", "spec.checkpoint", "spec.runPolicy")) for key in BASE)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda s: s["model"].update(source="hf://org/other-model"), "spec.model.source"),
        (lambda s: s["model"].update(labels=["neg", "neu", "pos"]), "spec.model.labels"),
        (lambda s: s["strategy"]["lora"].update(r=16), "spec.strategy.lora.r"),
        (lambda s: s.update(strategy={"type": "full"}, output={"uri": "s3://m/x"}), "spec.strategy.type"),
        (lambda s: s["deepspeed"].update(zeroStage=3), "spec.deepspeed.zeroStage"),
        (lambda s: s["training"].update(precision="fp32"), "spec.training.precision"),
    ],
)
def test_a_weight_shaping_change_is_named(change: Any, field: str) -> None:
    diff = compat.differences(BASE, compat.compatibility_of(spec_with(change)))
    assert any(line.startswith(field + " (") for line in diff), diff


@pytest.mark.parametrize(
    "change",
    [
        lambda s: s["dataset"].update(train="s3://data/reviews/train-v2.jsonl"),
        lambda s: s["training"].update(learningRate=1e-4, epochs=5),
        lambda s: s["checkpoint"].update(everySteps=100),
        lambda s: s["resources"].update(nodes=4),
    ],
)
def test_data_schedule_and_scale_may_change(change: Any) -> None:
    assert compat.differences(BASE, compat.compatibility_of(spec_with(change))) == []


def test_an_omitted_strategy_block_equals_its_defaults() -> None:
    explicit = compat.compatibility_of(spec_with(lambda s: s.update(strategy={"type": "lora", "lora": {}})))
    omitted = compat.compatibility_of(spec_with(lambda s: s.update(strategy={"type": "lora"})))
    assert compat.differences(explicit, omitted) == []


OTHER = compat.compatibility_of(spec_with(lambda s: s["model"].update(source="hf://org/other-model")))


@pytest.mark.parametrize(
    ("recorded_uid", "recorded", "job_uid", "policy", "resume", "error"),
    [
        ("uid-a", OTHER, "uid-a", "IfCompatible", True, False),  # its own checkpoint: always
        ("uid-a", OTHER, "uid-a", "Never", True, False),
        ("uid-old", BASE, "uid-new", "IfCompatible", True, False),  # re-created with the same spec
        ("uid-old", OTHER, "uid-new", "IfCompatible", False, True),  # re-created with another model
        ("uid-old", OTHER, "uid-new", "Always", True, False),
        ("uid-old", BASE, "uid-new", "Never", False, False),
        ("uid-old", {}, "uid-new", "IfCompatible", True, False),  # written before compatibility was recorded
        ("", BASE, "", "IfCompatible", True, False),  # kubetune run: no uids, the same spec
        ("", OTHER, "", "IfCompatible", False, True),
    ],
)
def test_judge(
    recorded_uid: str, recorded: dict[str, Any], job_uid: str, policy: str, resume: bool, error: bool
) -> None:
    verdict = compat.judge(
        uri=URI, recorded_uid=recorded_uid, recorded=recorded, job_uid=job_uid, current=BASE, policy=policy
    )
    assert verdict.resume is resume
    assert (verdict.error is not None) is error
    if verdict.error is not None:
        assert URI in verdict.error
        assert "spec.model.source" in verdict.error
        assert "hf://org/other-model" in verdict.error
        assert "spec.checkpoint.resume" in verdict.error


def test_the_manifest_records_the_job_and_its_compatibility() -> None:
    files = [[FileEntry("mp_rank_00_model_states.pt", 10, "ab" * 32, 0)]]
    manifest = build_manifest(
        step=500,
        world_size=2,
        zero_stage=2,
        spec_hash="h",
        per_rank_files=files,
        versions={},
        created="now",
        job_uid="uid-a",
        compatibility=BASE,
    )
    again = Manifest.from_json(manifest.to_json())
    assert again.job_uid == "uid-a"
    assert dict(again.compatibility) == BASE
    older = manifest.to_json().replace(b'"jobUid"', b'"unusedA"').replace(b'"compatibility"', b'"unusedB"')
    assert Manifest.from_json(older).compatibility == {}


def test_incompatible_checkpoint_is_a_permanent_failure() -> None:
    assert is_permanent_failure(ExitCode.INCOMPATIBLE_CHECKPOINT)
    assert "IncompatibleCheckpoint" in PERMANENT_REASONS
