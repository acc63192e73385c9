"""LLM data through the real trainer: 2 ranks under ``python -m kubetune_trainer.launch``.

One launch trains several jobs in turn (``matrix_driver.py``): multi-turn chat with
packing, a Hugging Face dataset from an offline hub cache, a ``save_to_disk`` folder, an
``s3://…/*.parquet`` glob on moto, and an over-truncated dataset that must fail.

The resume case runs the pod command three times: an uninterrupted run, a run stopped
by SIGTERM (checkpoint, exit 21), and its second attempt on a fresh node (empty work
dir).  The second attempt takes the token store from the job's storage: the data file
was overwritten with garbage of the same size and time, so tokenizing would fail, and
it trains on exactly the batches of the uninterrupted run (equal losses, step by step).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.processes import kill_tree
from tests.support.s3 import FAKE_CREDENTIALS, S3Endpoint, threaded_moto
from tests.support.tiny_models import instruction_rows, sentiment_rows, tiny_gpt2, write_jsonl
from tests.trainer.conftest import REPO, launch, trainer_env, write_job

STEP_LINE = re.compile(r"^step (\d+)/\d+ epoch \S+ loss (\S+)", re.MULTILINE)
CHATML_TOKENS = ["<|im_start|>", "<|im_end|>"]


def chat_rows(n: int, seed: int) -> list[dict[str, Any]]:
    """Multi-turn conversations: a system turn, then two user/assistant exchanges."""
    rows = []
    for index, row in enumerate(instruction_rows(2 * n, seed=seed)[::2]):
        follow = instruction_rows(2 * n, seed=seed)[2 * index + 1]
        rows.append(
            {
                "messages": [
                    {"role": "system", "content": "the film"},
                    {"role": "user", "content": str(row["prompt"])},
                    {"role": "assistant", "content": str(row["response"])},
                    {"role": "user", "content": str(follow["prompt"])},
                    {"role": "assistant", "content": str(follow["response"])},
                ]
            }
        )
    return rows


def _lm_spec(source: Path, dataset: dict[str, Any], directory: Path, **training: Any) -> dict[str, Any]:
    return {
        "model": {"source": f"file://{source}", "task": "causal-lm"},
        "dataset": {"maxLength": 64, **dataset},
        "strategy": {"type": "lora", "lora": {"r": 4, "alpha": 8, "targetModules": ["c_attn"]}},
        "training": {
            "maxSteps": 3,
            "microBatchSize": 2,
            "precision": "fp32",
            "learningRate": 1e-3,
            "logEverySteps": 1,
            **training,
        },
        "deepspeed": {"zeroStage": 2},
        "checkpoint": {"uri": f"file://{directory / 'ckpt'}", "everySteps": 1000},
        "output": {"uri": f"file://{directory / 'output'}"},
    }


def _bert_spec(source: Path, dataset: dict[str, Any], directory: Path, **checkpoint: Any) -> dict[str, Any]:
    return {
        "model": {"source": f"file://{source}", "task": "sequence-classification", "labels": ["negative", "positive"]},
        "dataset": {"maxLength": 32, **dataset},
        "strategy": {"type": "lora"},
        "training": {"maxSteps": 2, "microBatchSize": 4, "precision": "fp32"},
        "deepspeed": {"zeroStage": 2},
        "checkpoint": {"uri": f"file://{directory / 'ckpt'}", "everySteps": 1000, **checkpoint},
        "output": {"uri": f"file://{directory / 'output'}"},
    }


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Endpoint]:
    with threaded_moto("kubetune-data") as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny GPT-2 with ChatML's control tokens in its tokenizer and the ChatML template (no markers)."""
    from transformers import AutoTokenizer

    directory = tiny_gpt2(tmp_path_factory.mktemp("chat-model") / "gpt2")
    tokenizer = AutoTokenizer.from_pretrained(directory)
    from transformers import GPT2LMHeadModel

    tokenizer.add_special_tokens({"additional_special_tokens": CHATML_TOKENS})
    model = GPT2LMHeadModel.from_pretrained(directory)
    model.resize_token_embeddings(len(tokenizer))  # the new tokens get rows, as a real chat model has
    model.save_pretrained(directory)
    tokenizer.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def runs(
    tmp_path_factory: pytest.TempPathFactory, tiny_backbones: dict[str, Path], chat_model: Path, s3: S3Endpoint
) -> Path:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.trainer.test_data_pipeline import _hub_cache

    root = tmp_path_factory.mktemp("data-runs")
    bert, gpt2 = tiny_backbones["bert"], tiny_backbones["gpt2"]
    chat = write_jsonl(root / "chat.jsonl", chat_rows(24, seed=1))
    hub = _hub_cache(root / "hub-cache", {"train": sentiment_rows(24, seed=2)})
    instructions = instruction_rows(24, seed=3)
    datasets.DatasetDict({"train": datasets.Dataset.from_list(instructions)}).save_to_disk(str(root / "saved"))
    for shard in range(3):
        pq.write_table(pa.Table.from_pylist(sentiment_rows(8, seed=10 + shard)), root / f"part-{shard}.parquet")
        s3.client().upload_file(str(root / f"part-{shard}.parquet"), s3.bucket, f"train/part-{shard}.parquet")
    truncated = instruction_rows(24, seed=4)
    for row in truncated[:4]:
        row["prompt"] = " ".join(["film"] * 40)
    jobs = {
        "chat": _lm_spec(chat_model, {"train": str(chat), "packing": True}, root / "chat"),
        "hub-run": _bert_spec(bert, {"train": "hf://datasets/acme/reviews"}, root / "hub-run"),
        "saved-run": _lm_spec(
            gpt2,
            {"train": f"file://{root / 'saved'}/", "promptField": "prompt", "responseField": "response"},
            root / "saved-run",
        ),
        "glob": _bert_spec(bert, {"train": s3.uri("train/*.parquet")}, root / "glob", endpoint=s3.endpoint),
        "truncated": _lm_spec(
            gpt2,
            {
                "train": str(write_jsonl(root / "truncated.jsonl", truncated)),
                "maxLength": 32,
                "promptField": "prompt",
                "responseField": "response",
            },
            root / "truncated",
        ),
    }
    entries = []
    for name, spec in jobs.items():
        config = write_job(root / name / "job.json", spec)
        entries.append({"config": str(config), "dir": str(root / name)})
    (root / "jobs.json").write_text(json.dumps(entries))
    env = trainer_env(HF_HUB_CACHE=str(hub), **FAKE_CREDENTIALS)
    result = launch([str(REPO / "tests/trainer/matrix_driver.py"), str(root / "jobs.json")], env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return root


def _succeeded(directory: Path) -> dict[str, Any]:
    for rank in (0, 1):
        assert (directory / f"exit-{rank}").read_text() == "0", (directory / "train.log").read_text()[-3000:]
    return json.loads((directory / "output" / "kubetune-metrics.json").read_text())


def test_multi_turn_chat_trains_with_packing(runs: Path) -> None:
    metrics = _succeeded(runs / "chat")
    assert metrics["data"]["mode"] == "chat"
    assert metrics["data"]["examples"] == {"train": 24}
    assert metrics["steps"] == 3
    log = (runs / "chat" / "train.log").read_text()
    assert "data: chat data, train 24 examples" in log


def test_hugging_face_dataset_from_the_offline_hub_cache_trains(runs: Path) -> None:
    metrics = _succeeded(runs / "hub-run")
    assert metrics["data"]["examples"] == {"train": 24}


def test_save_to_disk_folder_trains(runs: Path) -> None:
    metrics = _succeeded(runs / "saved-run")
    assert metrics["data"]["mode"] == "prompt"
    assert metrics["data"]["examples"] == {"train": 24}


def test_s3_parquet_glob_trains_over_every_shard(runs: Path, s3: S3Endpoint) -> None:
    metrics = _succeeded(runs / "glob")
    assert metrics["data"]["examples"] == {"train": 24}
    termination = json.loads((runs / "glob" / "termination.json").read_text())
    assert termination["data"] == {"examples": {"train": 24}, "dropped": {"truncated": 0, "no_trainable_tokens": 0}}
    key = metrics["data"]["cache"]["key"]
    meta = json.loads((runs / "glob" / "ckpt" / "tokens" / key / "store" / "meta.json").read_text())
    assert meta["counts"]["train"]["rows"] == 24


def test_over_truncation_fails_permanently_with_the_count_field_and_max_length(runs: Path) -> None:
    directory = runs / "truncated"
    assert (directory / "exit-0").read_text() == (directory / "exit-1").read_text() == "11"
    message = json.loads((directory / "termination.json").read_text())
    assert message["reason"] == "InvalidData"
    text = message["message"]
    assert "4 of 24 training examples (16.7%)" in text
    assert "dataset.maxLength 32" in text
    assert "dataset.maxDroppedFraction 0.05" in text


# --------------------------------------------------------------------------- attempts and resume


def _start(job: Path, work: Path, log: Path) -> subprocess.Popen[bytes]:
    from kubetune_operator.localpods import free_port

    argv = [
        sys.executable, "-m", "kubetune_trainer.launch", "--nnodes=1", "--nproc-per-node=2", "--node-rank=0",
        "--master-addr=127.0.0.1", f"--master-port={free_port()}", "-m", "kubetune_trainer", "--config", str(job),
    ]  # fmt: skip
    env = trainer_env(KUBETUNE_WORK_DIR=str(work), KUBETUNE_TERMINATION_LOG=str(work / "termination-log"))
    with log.open("ab") as out:
        return subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)


def _losses(text: str) -> dict[int, str]:
    return {int(m.group(1)): m.group(2) for m in STEP_LINE.finditer(text)}


def _wait(proc: subprocess.Popen[bytes], log: Path, timeout: float = 600) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        raise AssertionError(f"trainer did not finish:\n{log.read_text()[-4000:]}") from None


def test_second_attempt_reuses_the_store_and_sees_the_batches_of_an_uninterrupted_run(
    tmp_path: Path, chat_model: Path
) -> None:
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(40, seed=5))
    spec = _lm_spec(chat_model, {"train": str(data), "packing": True}, tmp_path / "a", maxSteps=30)
    log_a = tmp_path / "a.log"
    a = _start(write_job(tmp_path / "a.json", spec), tmp_path / "a-work", log_a)
    assert _wait(a, log_a) == 0, log_a.read_text()[-4000:]

    spec_b = {**spec, "checkpoint": {"uri": f"file://{tmp_path / 'b' / 'ckpt'}", "everySteps": 1000}}
    spec_b["output"] = {"uri": f"file://{tmp_path / 'b' / 'output'}"}
    job_b = write_job(tmp_path / "b.json", spec_b)
    log_b1 = tmp_path / "b1.log"
    b = _start(job_b, tmp_path / "b-work-1", log_b1)
    deadline = time.monotonic() + 600
    while max(_losses(log_b1.read_text()), default=0) < 3:
        assert b.poll() is None, log_b1.read_text()[-4000:]
        assert time.monotonic() < deadline
        time.sleep(0.1)
    b.send_signal(signal.SIGTERM)
    assert _wait(b, log_b1) == 21, log_b1.read_text()[-4000:]
    stopped = json.loads((tmp_path / "b-work-1" / "termination-log").read_text())["step"]
    assert 3 <= stopped < 30

    stat = data.stat()  # only reading the file could tell it changed
    data.write_bytes(b"#" * stat.st_size)
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    log_b2 = tmp_path / "b2.log"
    b = _start(job_b, tmp_path / "b-work-2", log_b2)  # a new pod: empty work dir
    assert _wait(b, log_b2) == 0, log_b2.read_text()[-4000:]
    resumed = log_b2.read_text()
    assert f"reused from file://{tmp_path / 'b' / 'ckpt'}/tokens/" in resumed
    assert "tokenizing" not in resumed
    assert "tokenized" not in resumed
    assert f"at step {stopped}" in resumed
    loss_a, loss_b = _losses(log_a.read_text()), _losses(resumed)
    assert sorted(loss_b) == list(range(stopped + 1, 31))
    assert {s: loss_b[s] for s in loss_b} == {s: loss_a[s] for s in loss_b}


def test_two_nodes_tokenize_once(tmp_path: Path, chat_model: Path) -> None:
    """Two nodes (two launchers, separate work dirs): node 0 tokenizes, node 1 downloads the store."""
    from kubetune_operator.localpods import free_port

    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(24, seed=6))
    job = write_job(tmp_path / "job.json", _lm_spec(chat_model, {"train": str(data)}, tmp_path / "run", maxSteps=2))
    port = free_port()
    procs, logs = [], []
    for node in (0, 1):
        argv = [
            sys.executable, "-m", "kubetune_trainer.launch", "--nnodes=2", "--nproc-per-node=1", f"--node-rank={node}",
            "--master-addr=127.0.0.1", f"--master-port={port}", "-m", "kubetune_trainer", "--config", str(job),
        ]  # fmt: skip
        work = tmp_path / f"node-{node}"
        env = trainer_env(KUBETUNE_WORK_DIR=str(work), KUBETUNE_TERMINATION_LOG=str(work / "termination-log"))
        logs.append(tmp_path / f"node-{node}.log")
        with logs[-1].open("wb") as out:
            procs.append(
                subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
            )
    for proc, log in zip(procs, logs, strict=True):
        assert _wait(proc, log) == 0, log.read_text()[-4000:]
    assert "tokenized" in logs[0].read_text()
    key = json.loads((tmp_path / "run" / "output" / "kubetune-metrics.json").read_text())["data"]["cache"]["key"]
    built = sorted(p.name for p in (tmp_path / "node-0" / "tokens").iterdir())
    downloaded = sorted(p.name for p in (tmp_path / "node-1" / "tokens").iterdir())
    assert built[0] == key
    assert built[1].startswith(f"{key}.progress-")
    assert downloaded == [key]  # node 1 only received the finished store
    assert (tmp_path / "run" / "ckpt" / "tokens" / key / "COMPLETE").is_file()
