"""`kubetune run` gives a job the identity an API server would: the same file run again is the same job
(its checkpoints resume as its own), an edited file is another job (checkpoint.resume decides)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from kubetune_operator.builders import desired_children
from kubetune_operator.localrun import RunOptions, localize_job
from kubetune_trainer.spec import FineTuneJob
from kubetune_trainer.spec import runtime as rt

DEMO = Path(__file__).resolve().parents[2] / "examples" / "local" / "demo.yaml"


def _uid(manifest: dict[str, Any], storage: Path, **overrides: Any) -> str:
    job, _ = localize_job(FineTuneJob.model_validate(manifest), RunOptions(storage=storage, **overrides))
    assert job.uid is not None
    return job.uid


def test_the_same_file_in_the_same_storage_is_the_same_job(tmp_path: Path) -> None:
    manifest = yaml.safe_load(DEMO.read_text())
    assert _uid(manifest, tmp_path / "runs") == _uid(copy.deepcopy(manifest), tmp_path / "runs")


def test_an_edited_spec_another_storage_or_other_nodes_is_another_job(tmp_path: Path) -> None:
    manifest = yaml.safe_load(DEMO.read_text())
    first = _uid(manifest, tmp_path / "runs")
    edited = copy.deepcopy(manifest)
    edited["spec"]["training"]["learningRate"] = 1e-3
    assert _uid(edited, tmp_path / "runs") != first
    assert _uid(manifest, tmp_path / "elsewhere") != first
    assert _uid(manifest, tmp_path / "runs", nodes=1) != first


def test_the_trainer_pods_get_the_uid(tmp_path: Path) -> None:
    job, _ = localize_job(FineTuneJob.model_validate(yaml.safe_load(DEMO.read_text())), RunOptions(storage=tmp_path))
    _config_map, _service, attempt = desired_children(job, attempt=1)
    env = {e["name"]: e.get("value") for e in attempt["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env[rt.ENV_JOB_UID] == job.uid
