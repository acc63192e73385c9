"""Bad data is a permanent failure (exit 11, reason InvalidData) whose message names the file and line or field.

One case runs the exact pod command (``python -m kubetune_trainer.launch ... -m
kubetune_trainer --config FILE``) to pin the launcher's exit code; the others run
through the trainer's entry point in one 2-rank launch (``matrix_driver.py``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.support.tiny_models import sentiment_rows, write_jsonl
from tests.trainer.conftest import REPO, launch, trainer_env, write_job


def _spec(source: Path, train: str, validation: str | None = None, **dataset: Any) -> dict[str, Any]:
    ds: dict[str, Any] = {"train": train, "maxLength": 32, **dataset}
    if validation:
        ds["validation"] = validation
    return {
        "model": {"source": f"file://{source}", "task": "sequence-classification", "labels": ["negative", "positive"]},
        "dataset": ds,
        "strategy": {"type": "lora"},
        "training": {"maxSteps": 2, "microBatchSize": 4, "precision": "fp32"},
        "deepspeed": {"zeroStage": 2},
    }


def test_unknown_label_through_the_pod_command(tmp_path: Path, tiny_backbones: dict[str, Path]) -> None:
    rows = sentiment_rows(8, seed=1)
    rows[2]["label"] = "neutral"
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    config = write_job(tmp_path / "job.json", _spec(tiny_backbones["bert"], str(train)))
    termination = tmp_path / "termination-log"
    env = trainer_env(KUBETUNE_TERMINATION_LOG=str(termination), KUBETUNE_WORK_DIR=str(tmp_path / "work"))
    result = launch(["-m", "kubetune_trainer", "--config", str(config)], env=env)
    assert result.returncode == 11, result.stderr[-3000:]
    message = json.loads(termination.read_text())
    assert message["reason"] == "InvalidData"
    assert message["exitCode"] == 11
    assert f"{train} line 3" in message["message"]
    assert "'neutral'" in message["message"]
    assert "model.labels" in message["message"]


CASES: dict[str, tuple[dict[str, Any], list[str]]] = {}


def _cases(root: Path, source: Path) -> dict[str, tuple[dict[str, Any], list[str]]]:
    good = write_jsonl(root / "good.jsonl", sentiment_rows(8, seed=2))
    no_text = sentiment_rows(8, seed=3)
    del no_text[4]["text"]
    no_label = sentiment_rows(8, seed=4)
    del no_label[5]["label"]
    empty = root / "empty.jsonl"
    empty.write_text("")
    csv_file = root / "train.csv"
    csv_file.write_text("text,label\ngood film,positive\nbad film,negative\nfine film,great\n")
    return {
        "missing-file": (_spec(source, str(root / "nope.jsonl")), [f"{root / 'nope.jsonl'}", "file not found"]),
        "missing-text-field": (
            _spec(source, str(write_jsonl(root / "no-text.jsonl", no_text))),
            [f"{root / 'no-text.jsonl'} line 5", "missing field 'text'", "dataset.textField"],
        ),
        "missing-label-field": (
            _spec(source, str(write_jsonl(root / "no-label.jsonl", no_label))),
            [f"{root / 'no-label.jsonl'} line 6", "missing field 'label'", "dataset.labelField"],
        ),
        "empty-dataset": (_spec(source, str(empty)), [str(empty), "empty dataset"]),
        "empty-validation": (_spec(source, str(good), str(empty)), [str(empty), "empty dataset"]),
        "csv-unknown-label": (_spec(source, str(csv_file)), [f"{csv_file} line 4", "'great'", "model.labels"]),
    }


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory: pytest.TempPathFactory, tiny_backbones: dict[str, Path]) -> Path:
    root = tmp_path_factory.mktemp("bad-data")
    CASES.update(_cases(root, tiny_backbones["bert"]))
    jobs = []
    for name, (spec, _) in CASES.items():
        directory = root / name
        config = write_job(directory / "job.json", spec)
        jobs.append({"config": str(config), "dir": str(directory)})
    (root / "jobs.json").write_text(json.dumps(jobs))
    result = launch([str(REPO / "tests/trainer/matrix_driver.py"), str(root / "jobs.json")], env=trainer_env())
    assert result.returncode == 0, result.stderr[-3000:]
    return root


@pytest.mark.parametrize(
    "name",
    [
        "missing-file",
        "missing-text-field",
        "missing-label-field",
        "empty-dataset",
        "empty-validation",
        "csv-unknown-label",
    ],
)
def test_bad_data_is_permanent_and_named(bad_runs: Path, name: str) -> None:
    directory = bad_runs / name
    assert (directory / "exit-0").read_text() == "11"
    assert (directory / "exit-1").read_text() == "11"
    message = json.loads((directory / "termination.json").read_text())
    assert message["reason"] == "InvalidData"
    assert message["exitCode"] == 11
    assert "\n" not in message["message"]
    for fragment in CASES[name][1]:
        assert fragment in message["message"], message["message"]
