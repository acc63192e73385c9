"""A small, self-contained DeepSpeed training program for the checkpoint tests (run under torchrun).

A two-layer MLP with dropout learns a linear map on a fixed synthetic data set.
Every step uses the same global batch of 8 samples, split between the ranks, so
the mathematics does not depend on the world size (which the world-size-change
tests rely on).  The program restores through :class:`CheckpointManager`, saves
every ``--every`` steps and at the end, and writes what the tests assert on:
per-step losses, the restored checkpoint, and the final (and restored) weights.

Test-only switches make the failures the tests need: ``--die-at-step`` SIGKILLs
every rank after the checkpoint before it is committed; ``--kill-server-pid``
SIGKILLs the S3 server right after a save started uploading and ``--wait-file``
holds training until the test has brought the server back.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

GLOBAL_BATCH = 8
DATA_SIZE = 512
FEATURES = 16


def _model_class() -> type:
    import torch

    class TinyNet(torch.nn.Module):
        """Linear → ReLU → dropout (mask given) → Linear."""

        def __init__(self, hidden: int) -> None:
            super().__init__()
            self.inner = torch.nn.Linear(FEATURES, hidden)
            self.outer = torch.nn.Linear(hidden, 1)

        def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
            return self.outer(torch.relu(self.inner(x)) * keep)

    return TinyNet


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--uri", required=True)
    parser.add_argument("--endpoint")
    parser.add_argument("--work-dir", required=True)
    parser.add_argument("--out", required=True, help="folder for losses.json / weights (written by rank 0)")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--zero", type=int, default=2)
    parser.add_argument("--keep-last", type=int, default=3)
    parser.add_argument("--sync", action="store_true", help="upload synchronously (default: async)")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--die-at-step", type=int)
    parser.add_argument("--kill-server-pid", type=int)
    parser.add_argument("--kill-server-at-step", type=int)
    parser.add_argument("--wait-file")
    parser.add_argument("--step-sleep", type=float, default=0.0)
    parser.add_argument("--watch-retention", action="store_true")
    parser.add_argument(
        "--plugin", action="append", default=[], help="a module to import first (e.g. one registering a storage scheme)"
    )
    return parser.parse_args()


def main() -> int:
    args = _args()
    for plugin in args.plugin:
        importlib.import_module(plugin)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    logging.getLogger("botocore").setLevel(logging.WARNING)
    import deepspeed
    import torch
    import torch.distributed as dist

    from kubetune_trainer.checkpoint import CheckpointManager
    from kubetune_trainer.checkpoint.manifest import LATEST_KEY, scan
    from kubetune_trainer.metrics import TrainerMetrics
    from kubetune_trainer.nativeops import SHARED_MEMORY_COMM, load_native_ops
    from kubetune_trainer.storage import open_store

    TinyNet = _model_class()  # noqa: N806 - a class

    load_native_ops([SHARED_MEMORY_COMM], print)  # as the trainer does: SIGKILLed runs leave no hang behind
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)

    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(DATA_SIZE, FEATURES, generator=generator)
    weights = torch.randn(FEATURES, 1, generator=generator) / FEATURES**0.5
    targets = inputs @ weights + 0.05 * torch.randn(DATA_SIZE, 1, generator=generator)
    torch.manual_seed(1000)  # the same stream on every rank: dropout masks are drawn for the global batch
    model = TinyNet(args.hidden)
    init = torch.Generator().manual_seed(42)  # the same initial weights on every rank and every run
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=init) * 0.2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1.0 + 0.02 * s))
    micro = GLOBAL_BATCH // world
    config = {
        "train_batch_size": GLOBAL_BATCH,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": args.zero},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)

    store = open_store(args.uri, endpoint=args.endpoint)
    manager = CheckpointManager(
        args.uri,
        store=store,
        work_dir=Path(args.work_dir),
        keep_last=args.keep_last,
        async_upload=not args.sync,
        spec_hash="tiny-test-spec",
        metrics=(metrics := TrainerMetrics()),
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    restored = manager.restore(engine)
    start = restored.step if restored else 0
    restored_gauges = {  # what the pod's metrics say of the last checkpoint once it resumed
        "step": metrics.registry.get_sample_value("kubetune_trainer_checkpoint_step"),
        "time": metrics.registry.get_sample_value("kubetune_trainer_checkpoint_timestamp_seconds"),
    }
    if restored is not None:
        assert restored.client_state["step"] == restored.step, restored.client_state
    if rank == 0:
        torch.save({n: p.detach().clone() for n, p in engine.module.named_parameters()}, out / "restored_weights.pt")

    losses: dict[int, float] = {}
    retention_log: list[dict[str, object]] = []
    for step in range(start + 1, args.steps + 1):
        batch = [((step - 1) * GLOBAL_BATCH + i) % DATA_SIZE for i in range(GLOBAL_BATCH)]
        mine = batch[rank * micro : (rank + 1) * micro]
        # Dropout drawn from the RNG for the whole global batch, each rank using its rows: the same masks at
        # any world size, and they depend on the restored RNG state (so resume equivalence tests RNG restore).
        keep = (torch.rand(GLOBAL_BATCH, args.hidden) >= args.dropout).float() / (1.0 - args.dropout)
        loss = torch.nn.functional.mse_loss(
            engine(inputs[mine], keep[rank * micro : (rank + 1) * micro]), targets[mine]
        )
        engine.backward(loss)
        engine.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses[step] = mean.item() / world
        if step % args.every == 0 or step == args.steps:
            manager.save(engine, step, {"step": step, "note": "tiny"})
        if args.kill_server_at_step == step and rank == 0 and args.kill_server_pid:
            os.kill(args.kill_server_pid, signal.SIGKILL)  # while this step's checkpoint uploads
        if args.wait_file and args.kill_server_at_step == step:
            while not Path(args.wait_file).exists():
                time.sleep(0.1)
            dist.barrier()
        if args.die_at_step == step:
            manager.finish()  # the previous checkpoint is committed; then die without any cleanup
            os.kill(os.getpid(), signal.SIGKILL)
        if args.watch_retention and rank == 0:
            in_flight = manager.upload_in_flight  # right after a save its upload has just started
            gauge = metrics.registry.get_sample_value("kubetune_trainer_checkpoint_step")  # after in_flight
            # LATEST before the listing: a manifest is written before LATEST moves, so the listing is newer.
            latest = store.get_bytes(LATEST_KEY).decode().strip() if store.exists(LATEST_KEY) else None
            committed = list(scan(store.list("checkpoints/")).committed)
            retention_log.append(
                {"step": step, "in_flight": in_flight, "latest": latest, "committed": committed, "gauge": gauge}
            )
        if args.step_sleep:
            time.sleep(args.step_sleep)
    manager.finish()
    if rank == 0:
        torch.save({n: p.detach().clone() for n, p in engine.module.named_parameters()}, out / "final_weights.pt")
        result = {
            "world_size": world,
            "restored": None
            if restored is None
            else {"step": restored.step, "fell_back_from": restored.fell_back_from, "uri": restored.uri},
            "losses": losses,
            "committed_step": manager.committed_step,
            "restored_gauges": restored_gauges,
            "retention_log": retention_log,
        }
        (out / "result.json").write_text(json.dumps(result, indent=1))
    dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
