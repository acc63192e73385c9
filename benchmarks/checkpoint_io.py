"""Checkpoint I/O benchmark: prints JSON.

1. Throughput: one DeepSpeed ZeRO-2 checkpoint saved and committed through
   ``CheckpointManager`` (serialize to local disk, each file uploaded and
   sha256-hashed as soon as it is written, manifest, LATEST) versus a raw
   transfer of the same files: a boto3 transfer-manager upload (same endpoint,
   same TransferConfig) on moto's S3 server on loopback (a subprocess, so it
   does not share our GIL), and a file copy on ``file://``.  The store makes
   every object durable before it counts as written (S3 acknowledges a PUT once
   it is stored; LocalStore fsyncs), so the ``file://`` raw baseline is a copy
   plus fsync; the page-cache-only copy is reported beside it.
   ``ratio_save_upload_commit_vs_raw`` = raw seconds / seconds from the
   ``save()`` call until LATEST names the new checkpoint (throughput relative to
   raw; target >= 0.8); retention of older checkpoints runs after that and is
   reported as its own phase.
2. Step-time overhead: blocks of ``--every`` steps without checkpoints, with a
   synchronous and with an asynchronous checkpoint, back to back in rotating
   order, ``--rounds`` times, on moto and on ``file://`` (the local runtime's
   store); the overhead is the median over rounds of a checkpointing block's
   time over the same round's block without (target for async: < 10 %).  Each step feeds
   ``--rows`` rows through the model (default 1024 = one process's micro-batch
   of 16 sequences × 64 tokens in the trainer benchmark), so the compute per
   checkpointed byte is that of fine-tuning a transformer, not of a toy MLP step;
   the checkpoint interval is still seconds, far more often than real jobs save.

One process, world size 1 (gloo).  Usage::

    PYTHONPATH=operator:trainer_image python benchmarks/checkpoint_io.py [--params-m 6] [--rounds 10] [--every 10]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kubetune_operator.localpods import free_port
from kubetune_trainer.nativeops import SHARED_MEMORY_COMM, load_native_ops
from kubetune_trainer.storage import fsync_path

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "bench-key",
    "AWS_SECRET_ACCESS_KEY": "bench-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@contextlib.contextmanager
def moto_server() -> Iterator[tuple[str, int]]:
    """``python -m moto.server`` on a loopback port; yields its endpoint URL and process id."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **CREDENTIALS},
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
            if time.monotonic() > deadline:
                raise TimeoutError("moto server did not start")
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}", proc.pid
    finally:
        proc.kill()
        proc.wait()


class Timings:
    """Duck-typed metrics object: records checkpoint_seconds{phase} observations."""

    def __init__(self) -> None:
        self.phases: dict[str, list[float]] = {}
        outer = self

        class _Histogram:
            def labels(self, *, phase: str) -> Any:
                class _Child:
                    def observe(self, seconds: float) -> None:
                        outer.phases.setdefault(phase, []).append(seconds)

                return _Child()

        self.checkpoint_seconds = _Histogram()


def build_engine(params_m: float, rows: int) -> tuple[Any, Any, Any]:
    """A single-rank DeepSpeed ZeRO-2 engine around an MLP with about ``params_m`` million parameters.

    Returns the engine and one batch of ``rows`` inputs and targets.
    """
    import deepspeed
    import torch

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    load_native_ops([SHARED_MEMORY_COMM], print)  # as the trainer does
    deepspeed.init_distributed(dist_backend="gloo")
    width = int((params_m * 1e6 / 2) ** 0.5)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.ReLU(), torch.nn.Linear(width, width))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    config = {
        "train_batch_size": 1,  # DeepSpeed's bookkeeping only: the batch is the rows below
        "zero_optimization": {"stage": 2},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    inputs = torch.randn(rows, width)
    return engine, inputs, torch.randn(rows, width)


def train_step(engine: Any, inputs: Any, targets: Any) -> None:
    import torch

    loss = torch.nn.functional.mse_loss(engine(inputs), targets)
    engine.backward(loss)
    engine.step()


def throughput(engine: Any, uri: str, endpoint: str | None, work: Path, *, repeats: int) -> dict[str, Any]:
    """Save+commit a checkpoint synchronously and upload the same files raw; best of ``repeats`` each.

    A first, untimed checkpoint warms up connections and provides the files for the raw uploads; then
    the two alternate which goes first, so neither always meets a fresher server or page cache.
    """
    from kubetune_trainer.checkpoint import CheckpointManager
    from kubetune_trainer.storage import open_store

    store = open_store(uri, endpoint=endpoint)
    ours: list[dict[str, float]] = []
    raw: list[float] = []

    def save(step: int) -> None:
        timings = Timings()
        manager = CheckpointManager(
            uri, store=store, work_dir=work, keep_last=1, async_upload=False, spec_hash="bench", metrics=timings
        )
        started = time.monotonic()
        manager.save(engine, step, {"step": step})
        manager.finish()
        wall = time.monotonic() - started
        if manager.last_save_seconds is None or manager.committed_step != step:
            raise RuntimeError(f"checkpoint of step {step} was not committed")
        phases = {phase: sum(values) for phase, values in timings.phases.items()}
        ours.append(phases | {"total": manager.last_save_seconds, "wall_with_retention": wall})

    save(1)
    ours.clear()
    prefix = "checkpoints/step-00000001/"
    size = int(json.loads(store.get_bytes(prefix + "MANIFEST.json"))["totalBytes"])
    raw_dir = work / "raw-source"  # the same bytes (the manager removed its staging folder after the commit)
    store.download_prefix(prefix, raw_dir)
    (raw_dir / "MANIFEST.json").unlink()
    raw_files = sorted(p for p in raw_dir.rglob("*") if p.is_file())
    durable_local = not uri.startswith("s3://")
    page_cache: list[float] = []
    for attempt in range(2, repeats + 2):
        if attempt % 2:
            raw.append(_raw_upload(raw_files, uri, endpoint, work))
            save(attempt)
        else:
            save(attempt)
            raw.append(_raw_upload(raw_files, uri, endpoint, work))
        if durable_local:
            page_cache.append(_raw_upload(raw_files, uri, endpoint, work, durable=False))
    shutil.rmtree(raw_dir)
    upload = min(o["upload"] for o in ours)
    total = min(o["total"] for o in ours)
    best_raw = min(raw)
    report = {
        "bytes": size,
        "repeats": repeats,
        "save_seconds": round(min(o["save"] for o in ours), 3),
        "upload_seconds": round(upload, 3),
        "commit_seconds": round(min(o["commit"] for o in ours), 3),
        "save_upload_commit_seconds": round(total, 3),
        "retention_seconds": round(min(o.get("retention", 0.0) for o in ours), 3),
        "wall_with_retention_seconds": round(min(o["wall_with_retention"] for o in ours), 3),
        "raw_seconds": round(best_raw, 3),
        "upload_MBps": round(size / upload / 1e6, 1),
        "save_upload_commit_MBps": round(size / total / 1e6, 1),
        "raw_MBps": round(size / best_raw / 1e6, 1),
        "ratio_upload_vs_raw": round(best_raw / upload, 3),
        "ratio_save_upload_commit_vs_raw": round(best_raw / total, 3),
        "runs": [{k: round(v, 3) for k, v in o.items()} for o in ours],
        "raw_runs": [round(r, 3) for r in raw],
    }
    if durable_local:
        report["raw"] = "copy + fsync of every file and the folder"
        report["raw_page_cache_seconds"] = round(min(page_cache), 3)
        report["ratio_save_upload_commit_vs_raw_page_cache"] = round(min(page_cache) / total, 3)
    else:
        report["raw"] = "boto3 transfer manager, same TransferConfig"
    return report


def _raw_upload(files: list[Path], uri: str, endpoint: str | None, work: Path, *, durable: bool = True) -> float:
    """Seconds to upload ``files`` with boto3's transfer manager (S3) or to copy them (file://).

    A ``durable`` copy is flushed to disk (each file, then the folder), as a stored object is.
    """
    if uri.startswith("s3://"):
        import boto3
        from boto3.s3.transfer import TransferConfig, create_transfer_manager
        from botocore.config import Config

        bucket = uri[len("s3://") :].split("/", 1)[0]
        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            config=Config(
                max_pool_connections=16,
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )
        config = TransferConfig(multipart_threshold=8 << 20, multipart_chunksize=8 << 20, max_concurrency=8)
        started = time.monotonic()
        with create_transfer_manager(client, config) as manager:
            futures = [manager.upload(str(f), bucket, f"raw/{f.name}") for f in files]
            for future in futures:
                future.result()
        return time.monotonic() - started
    target = work / "raw-copy"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    started = time.monotonic()
    for f in files:
        shutil.copyfile(f, target / f.name)
        if durable:
            fsync_path(target / f.name)
    if durable:
        fsync_path(target)
    return time.monotonic() - started


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far."""
    import psutil

    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def step_overhead(
    engine: Any,
    inputs: Any,
    targets: Any,
    uri: str,
    endpoint: str | None,
    work: Path,
    *,
    rounds: int,
    every: int,
) -> dict[str, Any]:
    """Step-time overhead of sync and async checkpoints every ``every`` steps, as paired ratios.

    One round runs three blocks of ``every`` steps back to back, one per mode (no checkpoint, sync,
    async; the order rotates every round); a checkpointing block saves at its middle step, and its
    time includes waiting for that upload to finish, so no upload spills into the next block and
    the async figure is an upper bound (training would only wait at its next save).  The overhead
    of a mode is the median over rounds of its block time over the same round's block without
    checkpoints: the blocks of a round are seconds apart, so a machine that is slower for a while
    slows all three alike.
    """
    import statistics

    from kubetune_trainer.checkpoint import CheckpointManager
    from kubetune_trainer.storage import open_store

    managers = {
        mode: CheckpointManager(
            f"{uri}/{mode}",
            store=open_store(f"{uri}/{mode}", endpoint=endpoint),
            work_dir=work / mode,
            keep_last=1,
            async_upload=mode == "async",
            spec_hash="bench",
        )
        for mode in ("sync", "async")
    }
    step = 0

    def block(mode: str) -> float:
        nonlocal step
        manager = managers.get(mode)
        started = time.monotonic()
        for index in range(every):
            train_step(engine, inputs, targets)
            step += 1
            if manager is not None and index == every // 2:
                manager.save(engine, step, {"step": step})
        if manager is not None:
            manager.finish()  # the upload, if still running, is this block's cost
        return time.monotonic() - started

    for _ in range(2):  # warm-up
        train_step(engine, inputs, targets)
    modes = ["none", "sync", "async"]
    seconds: dict[str, list[float]] = {mode: [] for mode in modes}
    for round_index in range(rounds):
        shift = round_index % len(modes)
        for mode in modes[shift:] + modes[:shift]:
            seconds[mode].append(block(mode))
    ratios = {
        mode: [t / base for t, base in zip(seconds[mode], seconds["none"], strict=True)] for mode in ("sync", "async")
    }
    median_none = statistics.median(seconds["none"])
    return {
        "rounds": rounds,
        "checkpoint_every": every,
        "step_seconds_no_checkpoint": round(median_none / every, 4),
        "step_seconds_sync": round(statistics.median(seconds["sync"]) / every, 4),
        "step_seconds_async": round(statistics.median(seconds["async"]) / every, 4),
        "overhead_sync": round(statistics.median(ratios["sync"]) - 1, 3),
        "overhead_async": round(statistics.median(ratios["async"]) - 1, 3),
        "overhead_async_per_round": [round(r - 1, 3) for r in ratios["async"]],
        "overhead_sync_per_round": [round(r - 1, 3) for r in ratios["sync"]],
        "checkpoint_interval_seconds": round(median_none, 2),
    }


def main() -> int:
    """Entry point: stdout carries only the JSON report (libraries' chatter goes to stderr)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params-m", type=float, default=6.0, help="model size in millions of parameters")
    parser.add_argument("--rows", type=int, default=1024, help="rows (tokens) through the model per step")
    parser.add_argument("--rounds", type=int, default=10, help="rounds of the step-overhead comparison")
    parser.add_argument("--every", type=int, default=10, help="steps between checkpoints")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of the throughput comparison")
    args = parser.parse_args()
    report_out = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed prints build and accelerator notes
        report = _measure(args)
    print(json.dumps(report, indent=2), file=report_out)
    return 0


def _measure(args: argparse.Namespace) -> dict[str, Any]:
    """Both measurements, on moto and on file://, as one report."""
    os.environ.update({k: os.environ.get(k, v) for k, v in CREDENTIALS.items()})
    import logging

    logging.basicConfig(level=logging.WARNING)
    import torch

    torch.set_num_threads(1)
    engine, inputs, targets = build_engine(args.params_m, args.rows)
    params = sum(p.numel() for p in engine.module.parameters())
    report: dict[str, Any] = {
        "parameters": params,
        "rows_per_step": args.rows,
        "cpus": os.cpu_count(),
        "load_average_1m_start": round(os.getloadavg()[0], 2),
    }
    with tempfile.TemporaryDirectory(prefix="kubetune-bench-") as tmp:
        work = Path(tmp)
        with moto_server() as (endpoint, server_pid):
            import boto3

            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
            for _ in range(3):  # optimizer states exist from the first step on: checkpoints of their final size
                train_step(engine, inputs, targets)
            report["s3_moto_loopback"] = throughput(
                engine, "s3://bench/ckpt", endpoint, work / "s3", repeats=args.repeats
            )
            server_cpu_before = _cpu_seconds(server_pid)
            overhead = step_overhead(
                engine,
                inputs,
                targets,
                "s3://bench/steps",
                endpoint,
                work / "s3-steps",
                rounds=args.rounds,
                every=args.every,
            )
            # The S3 server shares this machine's cores with training; a real store does not.
            checkpoints = 2 * args.rounds  # one sync and one async save per round
            overhead["server_cpu_seconds_per_checkpoint"] = round(
                (_cpu_seconds(server_pid) - server_cpu_before) / checkpoints, 3
            )
            report["step_overhead_s3_moto_loopback"] = overhead
        report["file"] = throughput(engine, (work / "store").as_uri(), None, work / "file", repeats=args.repeats)
        report["step_overhead_file"] = step_overhead(
            engine,
            inputs,
            targets,
            (work / "steps-store").as_uri(),
            None,
            work / "file-steps",
            rounds=args.rounds,
            every=args.every,
        )
    report["load_average_1m_end"] = round(os.getloadavg()[0], 2)
    return report


if __name__ == "__main__":
    sys.exit(main())
