"""Data sources are validated identically by pydantic, the CRD schema + CEL, and ``kubetune validate``.

Each URI below goes into ``spec.dataset.train`` (and ``validation``) of a valid job; the three
validators must agree, and agree with the expected verdict.  The same for the fields that
only apply to some sources (split, subset, validationSplitName).
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from kubetune_operator.crd import custom_resource_definition
from kubetune_operator.validate import problems_of_document
from kubetune_trainer.spec import FineTuneJob
from tests.support.crd_validator import CrdValidator

ROOT = Path(__file__).resolve().parents[2]
BASE = yaml.safe_load((ROOT / "examples" / "lora-causal-lm-chat.yaml").read_text())
for _name in ("split", "validationSplitName"):  # the fields that only some sources take are set per case
    BASE["spec"]["dataset"].pop(_name)
VALIDATOR = CrdValidator(custom_resource_definition()["spec"]["versions"][0]["schema"]["openAPIV3Schema"])

URIS = {
    # Hugging Face datasets
    "hf://datasets/HuggingFaceH4/ultrachat_200k": True,
    "hf://datasets/acme/chats@main": True,
    "hf://datasets/acme/chats@0123456789abcdef0123456789abcdef01234567": True,
    "hf://datasets/acme/chats@refs/convert/parquet": True,
    "hf://datasets/imdb": True,
    "hf://imdb": False,
    "hf://imdb:train": False,
    "hf://acme/chats": False,
    "hf://datasets/acme/chats@": False,
    "hf://datasets/a/b/c": False,
    "hf://datasets/acme/chats@main@x": False,
    "hf://datasets/acme/chats@main;ls": False,
    # files, folders, globs on every store
    "s3://data/train.jsonl": True,
    "s3://data/train/*.parquet": True,
    "s3://data/train/part-????.parquet": True,
    "s3://data/**/train-*.parquet": True,
    "s3://data/train/": True,
    "pvc://claim/data/": True,
    "pvc://claim/data/*.jsonl": True,
    "file:///mnt/shards/": True,
    "file:///mnt/shards/*.parquet": True,
    "data/*.jsonl": True,
    "train.jsonl": True,
    "s3://*/train.jsonl": False,
    "pvc://*/data/": False,
    "s3://key:secret@data/train.jsonl": False,
    "s3://data/train.jsonl; rm -rf /": False,
    "s3://data/{a,b}.jsonl": False,
    "s3://data/[ab].jsonl": False,
    "s3://data/$(id).jsonl": False,
    "gs://data/train.jsonl": False,
    "hf:train.jsonl": False,
}

EXTRAS: list[tuple[dict[str, Any], bool]] = [
    ({"train": "hf://datasets/acme/chats", "split": "train_sft", "subset": "en"}, True),
    ({"train": "s3://data/saved/", "split": "train"}, True),
    ({"train": "s3://data/train.jsonl", "split": "train"}, False),
    ({"train": "s3://data/train.jsonl", "subset": "en"}, False),
    ({"train": "s3://data/saved/", "subset": "en"}, False),
    ({"validation": "s3://data/dev.jsonl", "validationSplitName": "test"}, False),
    ({"validation": "s3://data/saved/", "validationSplitName": "test"}, True),
    ({"split": "train sft"}, False),
    ({"chatTemplate": "chatml"}, True),
    ({"chatTemplate": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}, True),
    ({"chatTemplate": "llama9"}, False),
    ({"maxDroppedFraction": 0.0}, True),
    ({"maxDroppedFraction": 1.01}, False),
]


def _job(dataset: dict[str, Any]) -> dict[str, Any]:
    document = copy.deepcopy(BASE)
    document["spec"]["dataset"].update(dataset)
    return document


def _pydantic(document: dict[str, Any]) -> bool:
    try:
        FineTuneJob.model_validate(document)
    except ValidationError:
        return False
    return True


def _cases() -> list[tuple[str, dict[str, Any], bool]]:
    cases = [(f"train={uri}", _job({"train": uri}), ok) for uri, ok in URIS.items()]
    cases += [(f"validation={uri}", _job({"validation": uri}), ok) for uri, ok in URIS.items()]
    cases += [(f"extra{index}", _job(change), ok) for index, (change, ok) in enumerate(EXTRAS)]
    return cases


CASES = _cases()


@pytest.mark.parametrize(("name", "document", "ok"), CASES, ids=[c[0] for c in CASES])
def test_pydantic_and_the_crd_agree(name: str, document: dict[str, Any], ok: bool) -> None:
    assert _pydantic(document) is ok
    assert (not VALIDATOR.errors(document)) is ok, [str(e) for e in VALIDATOR.errors(document)]
    assert (not problems_of_document(document, name)) is ok


def test_kubetune_validate_gives_the_same_verdicts(tmp_path: Path) -> None:
    paths = []
    for index, (_, document, _) in enumerate(CASES):
        path = tmp_path / f"case-{index}.yaml"
        path.write_text(yaml.safe_dump(document))
        paths.append(path)
    result = subprocess.run(
        [sys.executable, "-m", "kubetune_operator.cli", "validate", *map(str, paths)],
        capture_output=True,
        text=True,
        check=False,
    )
    rejected = {line.split(":", 1)[0] for line in result.stderr.splitlines() if line.strip()}
    for path, (name, _, ok) in zip(paths, CASES, strict=True):
        assert (str(path) not in rejected) is ok, name
    bad_train = next(p for p, c in zip(paths, CASES, strict=True) if c[0] == "train=hf://imdb:train")
    assert f"{bad_train}: spec.dataset.train: must match" in result.stderr
