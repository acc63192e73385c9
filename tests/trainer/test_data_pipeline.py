"""The data pipeline in one process (a world of one): sources, the token store and its cache.

* globs over moto S3 read every shard in key order; folders skip what is not data;
* a Hugging Face dataset from an offline hub cache, and a ``save_to_disk`` folder;
* the store is built once, found again by a fresh node through the job's storage (the
  data is not read: it was overwritten with garbage of the same size and time), and
  rebuilt when the tokenizer or the data changes;
* tokenizing in worker processes gives exactly the store of tokenizing in-process;
* over-truncation fails with the count, the field and ``maxLength``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kubetune_trainer import readers
from kubetune_trainer.device import Placement
from kubetune_trainer.encoding import Encoder
from kubetune_trainer.errors import InvalidData
from kubetune_trainer.session import Session
from kubetune_trainer.spec import FineTuneJobSpec
from kubetune_trainer.tokenizing import tokenize_into
from kubetune_trainer.tokenstore import StoreWriter, TokenStore
from kubetune_trainer.trainingdata import TrainingData, load_training_data
from tests.support.s3 import S3Endpoint, s3_server
from tests.support.tiny_models import instruction_rows, sentiment_rows, write_jsonl

__all__ = ["s3_server"]  # the fixture
SOLO = Session(rank=0, world_size=1, local_rank=0, local_world_size=1, placement=Placement.for_rank(0))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from transformers import AutoTokenizer

    from tests.support.tiny_models import write_tokenizer

    directory = tmp_path_factory.mktemp("tok")
    write_tokenizer(directory)
    return AutoTokenizer.from_pretrained(str(directory))


def _spec(dataset: dict[str, Any], *, task: str = "sequence-classification", **extra: Any) -> FineTuneJobSpec:
    model: dict[str, Any] = {"source": "file:///m", "task": task}
    if task == "sequence-classification":
        model["labels"] = ["negative", "positive"]
    return FineTuneJobSpec.model_validate(
        {
            "model": model,
            "dataset": {"maxLength": 32, **dataset},
            "strategy": {"type": "full"},
            "training": {"maxSteps": 1, "microBatchSize": 2, "precision": "fp32"},
            **extra,
        }
    )


def _texts(tokenizer: Any, data: TrainingData) -> list[str]:
    return [tokenizer.decode(e.input_ids, skip_special_tokens=True) for e in data.train]


def _load(spec: FineTuneJobSpec, tokenizer: Any, work: Path) -> TrainingData:
    return load_training_data(spec, tokenizer, work, SOLO)


def test_s3_glob_reads_every_shard_in_key_order(s3_server: S3Endpoint, tmp_path: Path, tokenizer: Any) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    for shard in (2, 0, 1):  # written out of order
        path = tmp_path / f"part-{shard}.parquet"
        rows = [{"text": f"{['alice', 'bob', 'carol'][shard]} film {i}", "label": "positive"} for i in range(3)]
        pq.write_table(pa.Table.from_pylist(rows), path)
        s3_server.client().upload_file(str(path), s3_server.bucket, f"data/train/part-{shard}.parquet")
    s3_server.write("data/train/_SUCCESS", b"")
    s3_server.write("data/other/part-9.parquet", b"not matched")
    spec = _spec({"train": s3_server.uri("data/train/*.parquet")}, checkpoint={"endpoint": s3_server.endpoint})
    data = _load(spec, tokenizer, tmp_path / "work")
    names = [text.split()[0] for text in _texts(tokenizer, data)]
    assert names == ["alice"] * 3 + ["bob"] * 3 + ["carol"] * 3
    assert data.report is not None
    assert data.report.parts["train"]["rows"] == 9
    with pytest.raises(InvalidData, match=r"s3://kubetune-test/data/none/\*.parquet: matches no files"):
        _load(
            _spec({"train": s3_server.uri("data/none/*.parquet")}, checkpoint={"endpoint": s3_server.endpoint}),
            tokenizer,
            tmp_path / "w2",
        )


def test_a_folder_reads_its_data_files_and_skips_the_rest(tmp_path: Path, tokenizer: Any) -> None:
    folder = tmp_path / "shards"
    write_jsonl(folder / "b.jsonl", sentiment_rows(4, seed=2))
    write_jsonl(folder / "a.jsonl", sentiment_rows(3, seed=1))
    (folder / "README.md").write_text("# notes")
    (folder / "_SUCCESS").write_text("")
    data = _load(_spec({"train": f"file://{folder}/"}), tokenizer, tmp_path / "work")
    expected = [r["text"] for r in sentiment_rows(3, seed=1) + sentiment_rows(4, seed=2)]
    assert _texts(tokenizer, data) == expected


def _shard_keys(uri: str) -> list[str]:
    from kubetune_trainer import datasources

    planned = datasources.plan(uri, declared_format=None, split=None, subset=None, endpoint=None, region=None)
    return [shard.key for shard in planned.shards]


def test_a_folder_skips_files_in_hidden_and_underscore_folders(tmp_path: Path) -> None:
    folder = tmp_path / "shards"
    write_jsonl(folder / "a.jsonl", sentiment_rows(2, seed=1))
    write_jsonl(folder / "2024" / "b.jsonl", sentiment_rows(2, seed=2))
    # Jupyter's autosaves of the data, and a Spark job's unfinished output: not data to train on.
    write_jsonl(folder / ".ipynb_checkpoints" / "a-checkpoint.jsonl", sentiment_rows(2, seed=1))
    write_jsonl(folder / "_temporary" / "0" / "part-00000.jsonl", sentiment_rows(1, seed=3))
    assert _shard_keys(f"file://{folder}/") == ["2024/b.jsonl", "a.jsonl"]
    assert _shard_keys(f"file://{folder}/**/*.jsonl") == ["2024/b.jsonl", "a.jsonl"]


def test_relative_file_uris_name_folders_and_globs_as_they_name_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # file://data/x.jsonl is the relative path data/x.jsonl (what `kubetune run` in a project folder uses).
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "data" / "a.jsonl", sentiment_rows(2, seed=1))
    write_jsonl(tmp_path / "data" / "b.jsonl", sentiment_rows(2, seed=2))
    assert _shard_keys("file://data/a.jsonl") == [""]
    assert _shard_keys("file://data/") == ["a.jsonl", "b.jsonl"]
    assert _shard_keys("file://data/*.jsonl") == ["a.jsonl", "b.jsonl"]


def _hub_cache(root: Path, rows: dict[str, list[dict[str, Any]]]) -> Path:
    """A dataset repo as huggingface_hub caches it: refs/main -> snapshots/<commit>/data/<split>-*.parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    repo = root / "datasets--acme--reviews"
    commit = "1f2e3d4c5b6a79881f2e3d4c5b6a79881f2e3d4c"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    for split, split_rows in rows.items():
        target = repo / "snapshots" / commit / "data" / f"{split}-00000-of-00001.parquet"
        target.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(split_rows), target)
    return root


def test_hugging_face_dataset_from_an_offline_hub_cache(
    tmp_path: Path, tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    train, test = sentiment_rows(6, seed=3), sentiment_rows(2, seed=4)
    monkeypatch.setenv("HF_HUB_CACHE", str(_hub_cache(tmp_path / "hub", {"train": train, "test": test})))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = _spec(
        {
            "train": "hf://datasets/acme/reviews",
            "validation": "hf://datasets/acme/reviews@main",
            "validationSplitName": "test",
        }
    )
    data = _load(spec, tokenizer, tmp_path / "work")
    assert _texts(tokenizer, data) == [r["text"] for r in train]
    assert len(data.validation) == 2
    missing = _spec({"train": "hf://datasets/acme/reviews", "split": "dev"})
    with pytest.raises(InvalidData, match=r"hf://datasets/acme/reviews: .*dev.*dataset.split"):
        _load(missing, tokenizer, tmp_path / "w2")
    with pytest.raises(InvalidData, match=r"hf://datasets/acme/nothing: dataset not found in the offline"):
        _load(_spec({"train": "hf://datasets/acme/nothing"}), tokenizer, tmp_path / "w3")


def test_save_to_disk_folder_with_splits(tmp_path: Path, tokenizer: Any) -> None:
    import datasets

    rows = instruction_rows(8, seed=5)
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows[:6]), "validation": datasets.Dataset.from_list(rows[6:])}
    ).save_to_disk(str(tmp_path / "saved"))
    folder = f"file://{tmp_path / 'saved'}/"
    spec = _spec(
        {"train": folder, "validation": folder, "promptField": "prompt", "responseField": "response"}, task="causal-lm"
    )
    data = _load(spec, tokenizer, tmp_path / "work")
    assert (len(data.train), len(data.validation)) == (6, 2)
    assert data.report is not None
    assert data.report.mode == "prompt"


def _corrupt_keeping_identity(path: Path) -> None:
    """Overwrite a file with garbage of the same size and modification time: only reading it can tell."""
    stat = path.stat()
    path.write_bytes(b"#" * stat.st_size)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_store_is_reused_by_a_fresh_node_and_rebuilt_when_tokenizer_or_data_change(
    tmp_path: Path, tokenizer: Any
) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(20, seed=6))
    checkpoint = {"uri": f"file://{tmp_path / 'ckpt'}"}
    spec = _spec({"train": str(train), "validationSplit": 0.2}, checkpoint=checkpoint)
    first = _load(spec, tokenizer, tmp_path / "attempt-1")
    assert first.report is not None
    assert first.report.cache["how"] == "built"
    key = first.report.cache["key"]
    complete = tmp_path / "ckpt" / "tokens" / key / "COMPLETE"
    assert complete.is_file()
    assert (tmp_path / "ckpt" / "tokens" / key / "store" / "meta.json").is_file()
    uploaded = {p: p.stat().st_mtime_ns for p in (tmp_path / "ckpt" / "tokens").rglob("*") if p.is_file()}

    original = list(first.train), list(first.validation)
    _corrupt_keeping_identity(train)
    second = _load(spec, tokenizer, tmp_path / "attempt-2")  # a new pod: empty work dir
    assert second.report is not None
    assert second.report.cache == {**first.report.cache, "how": "storage"}
    assert (list(second.train), list(second.validation)) == original  # the garbage was never read
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "ckpt" / "tokens").rglob("*") if p.is_file()} == uploaded

    changed = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    changed.add_tokens(["filmic"])
    with pytest.raises(InvalidData, match=r"train.jsonl line 1: invalid JSON"):
        _load(spec, changed, tmp_path / "attempt-3")  # a new tokenizer: new key, the data is read again

    write_jsonl(train, sentiment_rows(21, seed=6))
    third = _load(spec, tokenizer, tmp_path / "attempt-4")
    assert third.report is not None
    assert third.report.cache["how"] == "built"
    assert third.report.cache["key"] != key


def test_worker_processes_give_the_store_of_one_process(
    tmp_path: Path, tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(readers, "CHUNK_BYTES", 256)  # many small chunks
    train = write_jsonl(tmp_path / "train.jsonl", instruction_rows(200, seed=7))
    spec = _spec({"train": str(train), "promptField": "prompt", "responseField": "response"}, task="causal-lm")
    chunks = readers.file_chunks(train, "jsonl", str(train))
    assert len(chunks) > 8
    stores = []
    for workers in (1, 2):
        writer = StoreWriter(tmp_path / f"store-{workers}")
        counts = tokenize_into(
            writer, Encoder(tokenizer, spec.model, spec.dataset, "prompt"), [("train", chunks, None)], workers=workers
        )
        writer.close({"views": {"train": {"part": "train"}}})
        assert counts["train"].rows == 200
        stores.append(TokenStore.open(tmp_path / f"store-{workers}").view("train"))
    assert len(stores[0]) == len(stores[1]) == 200
    assert list(stores[0]) == list(stores[1])
    assert np.array_equal(stores[0].lengths(), stores[1].lengths())


def test_over_truncation_fails_naming_the_count_the_field_and_max_length(tmp_path: Path, tokenizer: Any) -> None:
    rows = instruction_rows(20, seed=8)
    for row in rows[:3]:
        row["prompt"] = " ".join(["film"] * 40)  # the response starts after maxLength
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    spec = _spec({"train": str(train), "promptField": "prompt", "responseField": "response"}, task="causal-lm")
    with pytest.raises(InvalidData) as caught:
        _load(spec, tokenizer, tmp_path / "work")
    assert str(caught.value) == (
        f"{train}: 3 of 20 training examples (15.0%) have no trainable token left after truncation to "
        "dataset.maxLength 32 (truncated: 3), more than dataset.maxDroppedFraction 0.05; raise dataset.maxLength "
        "or fix the data"
    )
    relaxed = _spec(
        {"train": str(train), "promptField": "prompt", "responseField": "response", "maxDroppedFraction": 0.2},
        task="causal-lm",
    )
    data = _load(relaxed, tokenizer, tmp_path / "work")  # the cached store, checked against the new bound
    assert data.report is not None
    assert data.report.cache["how"] == "node"
    assert len(data.train) == 17
    assert data.report.to_json()["dropped"] == {"truncated": 3, "no_trainable_tokens": 0}
    assert (
        json.loads((tmp_path / "work" / "tokens" / data.report.cache["key"] / "meta.json").read_text())["mode"]
        == "prompt"
    )


def test_packed_rows_come_from_the_store(tmp_path: Path, tokenizer: Any) -> None:
    from kubetune_trainer.feeder import Batcher
    from kubetune_trainer.spec import Task

    train = write_jsonl(tmp_path / "train.jsonl", instruction_rows(40, seed=9))
    spec = _spec(
        {"train": str(train), "promptField": "prompt", "responseField": "response", "packing": True}, task="causal-lm"
    )
    data = _load(spec, tokenizer, tmp_path / "work")
    assert sorted(e.input_ids for row in data.items for e in row) == sorted(e.input_ids for e in data.train)
    assert list(data.item_lengths) == [sum(len(e.input_ids) for e in row) for row in data.items]
    assert max(data.item_lengths) <= 32 < sum(data.item_lengths[:1]) * 2  # rows are filled, never overfull
    batch = Batcher(task=Task.CAUSAL_LM, pad_id=0, seed=1, rank=0, packed=True).build([data.items[0], data.items[1]], 0)
    assert batch.samples == len(data.items[0]) + len(data.items[1])
