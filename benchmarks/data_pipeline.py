"""Data pipeline benchmark: tokenizing a million chat rows, a reading rank's memory, a restart's first step.

Prints one JSON document:

* ``tokenize``: best-of-``--repeats`` wall time (the two alternate) of kubetune's tokenization
  (plan, read, render with the chat template, tokenize, assistant masks, write the token store) against
  ``datasets.load_dataset("json") + Dataset.map(batched=True, num_proc=<cores>)`` doing the
  same work with ``apply_chat_template(..., return_assistant_tokens_mask=True)``, same
  tokenizer, same cores; peak RSS of each tokenizing process and of its workers.
* ``reader``: peak RSS of a rank (rank 0 of 4) that opens the store and builds N
  micro-batches, with the big dataset and with a 1,000-row one.
* ``restart``: a second attempt on a fresh node (empty work dir, store in the job's
  storage): seconds to the data, to the first optimizer step of a tiny GPT-2, and
  whether tokenization ran.

Each measurement runs in its own process (``--phase``), so peak RSS is that process's.
Usage: ``python benchmarks/data_pipeline.py [--rows 1000000] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO_ROOT, machine_info, minilm_dir

_WORD_TEXT = (
    "the of and to in is was for on that with as by at from his her an be this are have which not were but had "
    "one all their they can has been there more when will would who so if out about up what some into them only "
    "time could new these two may first then do any like my now over such our man me even most made after also "
    "did many before must through back years where much your way well down should because each just those people "
    "how too little state good very make world still own see men work long get here between both life being "
    "under never day same another know while last might us great old year off come since against go came right "
    "used take three film story music city river train model data answer question explain reason simple short "
    "example "
)
WORDS = tuple(_WORD_TEXT.split())
MAX_LENGTH = 512


def _sentence(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high))).capitalize() + "."


def generate(path: Path, rows: int, seed: int = 0) -> int:
    """``rows`` chat conversations (system, then one or two user/assistant exchanges) as jsonl; the bytes."""
    rng = random.Random(seed)  # noqa: S311 (benchmark data, not security)
    with path.open("w") as out:
        for _ in range(rows):
            messages = [{"role": "system", "content": _sentence(rng, 4, 10)}]
            for _ in range(rng.choice((1, 2))):
                messages.append({"role": "user", "content": _sentence(rng, 6, 24)})
                messages.append({"role": "assistant", "content": " ".join(_sentence(rng, 6, 18) for _ in range(2))})
            out.write(json.dumps({"messages": messages}) + "\n")
    return path.stat().st_size


def prepare_tokenizer(directory: Path) -> Path:
    """all-MiniLM-L6-v2's tokenizer (real, fast) with ChatML's control tokens and template."""
    from transformers import AutoTokenizer

    from kubetune_trainer.chat import CHATML

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir()))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(directory)
    return directory


def _peaks() -> dict[str, float]:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"peak_rss_mb": round(own, 1), "peak_rss_workers_mb": round(children, 1)}


def _session() -> Any:
    from kubetune_trainer.device import Placement
    from kubetune_trainer.session import Session

    return Session(rank=0, world_size=1, local_rank=0, local_world_size=1, placement=Placement.for_rank(0))


def _spec(data: Path, ckpt: Path) -> Any:
    from kubetune_trainer.spec import FineTuneJobSpec

    return FineTuneJobSpec.model_validate(
        {
            "model": {"source": "file:///bench/minilm-chat", "task": "causal-lm"},
            "dataset": {"train": str(data), "maxLength": MAX_LENGTH},
            "strategy": {"type": "full"},
            "training": {"maxSteps": 1, "microBatchSize": 8, "precision": "fp32", "seed": 1},
            "checkpoint": {"uri": f"file://{ckpt}"},
        }
    )


def phase_kubetune(args: argparse.Namespace) -> dict[str, Any]:
    """Tokenize into the store (the first attempt's work)."""
    from transformers import AutoTokenizer

    from kubetune_trainer.trainingdata import load_training_data

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    started = time.perf_counter()
    data = load_training_data(_spec(Path(args.data), Path(args.ckpt)), tokenizer, Path(args.work), _session())
    seconds = time.perf_counter() - started
    assert data.report is not None
    return {"seconds": seconds, "how": data.report.cache["how"], "examples": len(data.train), **_peaks()}


def phase_datasets(args: argparse.Namespace) -> dict[str, Any]:
    """The same work with ``datasets``: load the jsonl, map apply_chat_template over all cores."""
    import datasets
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    datasets.disable_progress_bars()

    def encode(batch: dict[str, list[Any]]) -> dict[str, Any]:
        out = tokenizer.apply_chat_template(
            batch["messages"],
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
            truncation=True,
            max_length=MAX_LENGTH,
        )
        return {"input_ids": out["input_ids"], "assistant_masks": out["assistant_masks"]}

    started = time.perf_counter()
    loaded = datasets.load_dataset("json", data_files=args.data, split="train", cache_dir=args.work)
    mapped = loaded.map(encode, batched=True, num_proc=args.cores, remove_columns=loaded.column_names)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "examples": len(mapped), **_peaks()}


def phase_reader(args: argparse.Namespace) -> dict[str, Any]:
    """A rank (0 of 4) that maps the store and builds ``--batches`` micro-batches."""
    import psutil
    from transformers import AutoTokenizer

    from kubetune_trainer.data import LengthGroupedSampler
    from kubetune_trainer.feeder import Batcher
    from kubetune_trainer.spec import Task
    from kubetune_trainer.trainingdata import load_training_data

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    data = load_training_data(_spec(Path(args.data), Path(args.ckpt)), tokenizer, Path(args.work), _session())
    sampler = LengthGroupedSampler(data.item_lengths, micro_batch_size=8, world_size=4, rank=0, seed=1)
    batcher = Batcher(task=Task.CAUSAL_LM, pad_id=int(tokenizer.pad_token_id), seed=1, rank=0)
    per_epoch = sampler.batches_per_epoch()
    tokens = 0
    epoch_batches: Any = None
    for position in range(args.batches):
        epoch, index = divmod(position, per_epoch)
        if index == 0:
            epoch_batches = sampler.epoch_batches(epoch)
        tokens += batcher.build([data.items[i] for i in epoch_batches[index]], position).tokens
    rss = psutil.Process().memory_info().rss / 2**20
    return {"examples": len(data.train), "batches": args.batches, "tokens": tokens, "rss_mb": round(rss, 1), **_peaks()}


def phase_restart(args: argparse.Namespace) -> dict[str, Any]:
    """A second attempt on a fresh node: data from the job's storage, then one step of a tiny GPT-2."""
    started = time.perf_counter()
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from kubetune_trainer.data import LengthGroupedSampler
    from kubetune_trainer.feeder import Batcher
    from kubetune_trainer.spec import Task
    from kubetune_trainer.trainingdata import load_training_data

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    data = load_training_data(_spec(Path(args.data), Path(args.ckpt)), tokenizer, Path(args.work), _session())
    assert data.report is not None
    data_seconds = time.perf_counter() - started
    sampler = LengthGroupedSampler(data.item_lengths, micro_batch_size=8, world_size=4, rank=0, seed=1)
    batch = Batcher(task=Task.CAUSAL_LM, pad_id=int(tokenizer.pad_token_id), seed=1, rank=0).build(
        [data.items[i] for i in sampler.epoch_batches(0)[0]], 0
    )
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=2, n_positions=MAX_LENGTH)
    model = GPT2LMHeadModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss = model(**batch.inputs, labels=batch.labels).loss
    loss.backward()
    optimizer.step()
    return {
        "how": data.report.cache["how"],
        "seconds_to_data": data_seconds,
        "seconds_to_first_step": time.perf_counter() - started,
        **_peaks(),
    }


PHASES = {"kubetune": phase_kubetune, "datasets": phase_datasets, "reader": phase_reader, "restart": phase_restart}


def _run_phase(name: str, **options: Any) -> dict[str, Any]:
    argv = [sys.executable, __file__, "--phase", name]
    for key, value in options.items():
        argv += [f"--{key}", str(value)]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(str(REPO_ROOT / p) for p in ("operator", "trainer_image", ".")),
        "TOKENIZERS_PARALLELISM": "false",  # both systems parallelize over processes
        "PYTHONWARNINGS": "ignore",
    }
    result = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"phase {name} failed:\n{result.stderr[-4000:]}")
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--small-rows", type=int, default=1000)
    parser.add_argument("--batches", type=int, default=2000, help="micro-batches the reading rank builds")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each tokenizer, alternating (best kept)")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    parser.add_argument("--phase", choices=sorted(PHASES), default=None, help=argparse.SUPPRESS)
    for name in ("data", "work", "ckpt", "tokenizer"):
        parser.add_argument(f"--{name}", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cores", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    report_out = sys.stdout
    if args.phase:
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON (DeepSpeed prints notes)
            phase_report = PHASES[args.phase](args)
        print(json.dumps(phase_report), file=report_out)
        return 0
    with contextlib.redirect_stdout(sys.stderr):
        from kubetune_trainer.cpus import available_cpus

        cores = available_cpus()
        root = Path(tempfile.mkdtemp(prefix="kubetune-data-bench-"))
        try:
            report = _benchmark(root, args, cores)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text, file=report_out)
    return 0


def _benchmark(root: Path, args: argparse.Namespace, cores: int) -> dict[str, Any]:
    tokenizer = prepare_tokenizer(root / "tokenizer")
    big, small = root / "chat.jsonl", root / "chat-small.jsonl"
    size = generate(big, args.rows)
    generate(small, args.small_rows, seed=1)
    common = {"tokenizer": tokenizer}
    # Alternate the two systems and keep each one's best run: on a shared machine the load drifts.
    ours_runs, their_runs = [], []
    for index in range(args.repeats):
        ours_runs.append(
            _run_phase("kubetune", data=big, work=root / f"work-{index}", ckpt=root / f"ckpt-{index}", **common)
        )
        their_runs.append(_run_phase("datasets", data=big, work=root / f"hf-cache-{index}", cores=cores, **common))
    ours = {**min(ours_runs, key=lambda r: r["seconds"]), "runs_seconds": [r["seconds"] for r in ours_runs]}
    theirs = {**min(their_runs, key=lambda r: r["seconds"]), "runs_seconds": [r["seconds"] for r in their_runs]}
    shutil.move(root / "ckpt-0", root / "ckpt")
    shutil.move(root / "work-0", root / "work-1")
    _run_phase("kubetune", data=small, work=root / "work-small", ckpt=root / "ckpt-small", **common)
    read_big = _run_phase("reader", data=big, work=root / "work-1", ckpt=root / "ckpt", batches=args.batches, **common)
    read_small = _run_phase(
        "reader", data=small, work=root / "work-small", ckpt=root / "ckpt-small", batches=args.batches, **common
    )
    restart = _run_phase("restart", data=big, work=root / "work-2", ckpt=root / "ckpt", **common)
    return {
        "machine": machine_info(),
        "date": time.strftime("%Y-%m-%d"),
        "rows": args.rows,
        "jsonl_bytes": size,
        "cores": cores,
        "max_length": MAX_LENGTH,
        "tokenizer": "all-MiniLM-L6-v2 WordPiece + ChatML tokens and template (with generation markers)",
        "tokenize": {
            "kubetune": ours,
            "datasets_map": theirs,
            "ratio_kubetune_vs_datasets_map": ours["seconds"] / theirs["seconds"],
        },
        "reader": {
            "big": read_big,
            "small": read_small,
            "ratio_peak_rss_big_vs_small": read_big["peak_rss_mb"] / read_small["peak_rss_mb"],
        },
        "restart": {**restart, "tokenization_skipped": restart["how"] == "storage"},
    }


if __name__ == "__main__":
    sys.exit(main())
