"""A strategy added through the registry alone (a plugin module, no edit elsewhere) is everywhere a built-in is.

``tests/support/bitfit_strategy.py`` registers BitFit; with ``KUBETUNE_PLUGINS`` naming
it, the generated CRD carries it (the ``strategy.type`` enum, its settings block, its
rules), ``kubetune validate`` accepts and checks it like any strategy, and the trainer
runs it on 2 ranks.  Every step runs in its own process, so this process's registry
stays as shipped.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.support.tiny_models import sentiment_rows, write_jsonl
from tests.trainer.conftest import PYTHON, REPO, job_document, launch, trainer_env, write_job

PLUGIN = "tests.support.bitfit_strategy"


def _env(**extra: str) -> dict[str, str]:
    return trainer_env(KUBETUNE_PLUGINS=PLUGIN, **extra)


def _spec(source: str, train: str, **strategy: Any) -> dict[str, Any]:
    return {
        "model": {"source": source, "task": "sequence-classification", "labels": ["negative", "positive"]},
        "dataset": {"train": train, "maxLength": 32},
        "strategy": {"type": "bitfit", **strategy},
        "training": {"maxSteps": 6, "learningRate": 5e-2, "microBatchSize": 8, "precision": "fp32", "logEverySteps": 1},
    }


def test_the_crd_carries_a_registered_strategy(tmp_path: Path) -> None:
    subprocess.run([PYTHON, "-m", "kubetune_operator.crd", str(tmp_path)], env=_env(), cwd=REPO, check=True)
    crd = yaml.safe_load(next(tmp_path.glob("*.yaml")).read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    strategy = spec["properties"]["strategy"]
    assert "bitfit" in strategy["properties"]["type"]["enum"]
    assert strategy["properties"]["bitfit"]["properties"]["trainNorms"]["type"] == "boolean"
    assert {"rule": "!has(self.bitfit) || self.type == 'bitfit'"}.items() <= next(
        rule for rule in strategy["x-kubernetes-validations"] if "bitfit" in rule["rule"]
    ).items()
    assert any(
        "'bitfit'" in rule["rule"] and "self.model.task" in rule["rule"] for rule in spec["x-kubernetes-validations"]
    )


def test_kubetune_validate_checks_a_registered_strategy(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(
        yaml.safe_dump(job_document(_spec("hf://org/model", "s3://data/train.jsonl", bitfit={"trainNorms": True})))
    )
    wrong_task = _spec("hf://org/model", "s3://data/train.jsonl")
    wrong_task["model"] = {"source": "hf://org/model", "task": "causal-lm"}
    (tmp_path / "wrong-task.yaml").write_text(yaml.safe_dump(job_document(wrong_task)))
    (tmp_path / "wrong-setting.yaml").write_text(
        yaml.safe_dump(job_document(_spec("hf://org/model", "s3://data/train.jsonl", bitfit={"trainNorms": "yes"})))
    )

    def validate(path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [PYTHON, "-m", "kubetune_operator.cli", "validate", str(path)],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            check=False,
        )

    accepted = validate(good, _env())
    assert accepted.returncode == 0, accepted.stderr
    assert "1 file(s) valid" in accepted.stdout
    task = validate(tmp_path / "wrong-task.yaml", _env())
    assert task.returncode == 1
    assert "spec.strategy.type: bitfit supports sequence-classification, token-classification only" in task.stderr
    setting = validate(tmp_path / "wrong-setting.yaml", _env())
    assert setting.returncode == 1
    assert "spec.strategy.bitfit.trainNorms" in setting.stderr
    unknown = validate(good, trainer_env())  # without the plugin the strategy does not exist
    assert unknown.returncode == 1
    assert "spec.strategy.type: unknown strategy" in unknown.stderr


def test_the_trainer_runs_a_registered_strategy_on_two_ranks(tmp_path: Path, tiny_backbones: dict[str, Path]) -> None:
    from safetensors.torch import load_file

    train = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(64, seed=1))
    spec = _spec(f"file://{tiny_backbones['bert']}", str(train)) | {"output": {"uri": f"file://{tmp_path / 'out'}"}}
    config = write_job(tmp_path / "job.json", spec)
    env = _env(KUBETUNE_TERMINATION_LOG=str(tmp_path / "termination"), KUBETUNE_WORK_DIR=str(tmp_path / "work"))
    result = launch(["-m", "kubetune_trainer", "--config", str(config)], env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "termination").read_text())["reason"] == "Succeeded"
    published = load_file(str(tmp_path / "out" / "model.safetensors"))
    pretrained = load_file(str(tiny_backbones["bert"] / "model.safetensors"))
    changed = {k for k in published if k in pretrained and not bool((published[k] == pretrained[k]).all())}
    assert changed, "nothing trained"
    assert all(k.endswith(".bias") for k in changed), sorted(changed)  # weights stayed as pretrained
    report = json.loads((tmp_path / "out" / "kubetune-metrics.json").read_text())
    assert report["strategy"] == "bitfit"
