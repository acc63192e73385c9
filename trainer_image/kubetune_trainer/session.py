"""The distributed session of one rank: who it is, where it computes, how it talks to the others.

Two process groups: the default one (NCCL on GPUs, gloo on CPUs) carries
device tensors only — gradients inside DeepSpeed, the per-step statistics —
and a gloo side group carries Python objects and CPU tensors (evaluation
predictions, checkpoint decisions), which an NCCL group rejects.
"""

from __future__ import annotations

import logging
import os
import random
import sys
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

from kubetune_trainer.cpus import pod_threads_per_rank
from kubetune_trainer.device import Placement
from kubetune_trainer.nativeops import SHARED_MEMORY_COMM, load_native_ops
from kubetune_trainer.spec.runtime import DEFAULT_WORK_DIR, ENV_WORK_DIR

T = TypeVar("T")
OBJECT_GROUP_TIMEOUT = timedelta(minutes=30)


@dataclass
class Session:
    """This process's place in the job."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    placement: Placement
    object_group: Any = field(default=None, repr=False)  # gloo group for Python objects; None: no peers

    @property
    def cpu(self) -> bool:
        """True when this rank trains on the CPU."""
        return not self.placement.accelerated

    def barrier(self) -> None:
        """Wait for every rank (on the gloo side group: no device work is queued for it)."""
        import torch.distributed as dist

        if dist.is_initialized() and self.world_size > 1:
            dist.barrier(group=self.object_group)

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order."""
        import torch.distributed as dist

        if not dist.is_initialized() or self.world_size == 1:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj, group=self.object_group)
        return gathered

    def local_rank_zero_first(self, work: Callable[[], T]) -> T | None:
        """Local rank 0 runs ``work``, then every local rank passes one barrier; a failure is re-raised
        after the barrier on the rank that had it (the others go on and find its absence themselves).

        For node-local side effects (downloads, caches) one rank does for the node.  Returns ``work``'s
        result on local rank 0 and None elsewhere.
        """
        result: T | None = None
        error: BaseException | None = None
        if self.local_rank == 0:
            try:
                result = work()
            except BaseException as exc:  # re-raised below, after the others were released
                error = exc
        self.barrier()
        if error is not None:
            raise error
        return result

    def log(self, message: str) -> None:
        """One line on rank 0's stderr."""
        if self.rank == 0:
            print(f"kubetune: {message}", file=sys.stderr, flush=True)


def _env_defaults() -> None:
    # A plain `python -m kubetune_trainer` (no torchrun) is a world of one.
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")


def start_session(native_ops: Sequence[str] = (SHARED_MEMORY_COMM,)) -> Session:
    """Join the job: pick the device, load the DeepSpeed ops the job needs (``native_ops``, builder
    names, see :mod:`kubetune_trainer.nativeops`; by default the one ``init_distributed`` loads), start
    torch.distributed through DeepSpeed, make the gloo side group."""
    import deepspeed
    import torch
    import torch.distributed as dist

    _env_defaults()
    local_rank = int(os.environ["LOCAL_RANK"])
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    placement = Placement.for_rank(local_rank)
    placement.activate()  # NCCL binds each rank to the current device when it starts
    if "OMP_NUM_THREADS" not in os.environ:
        # Started without the launcher (which sets it, see launch.py): torch would take every core of
        # the node.  An OMP_NUM_THREADS that is set, the pod's or the launcher's, torch already obeys.
        torch.set_num_threads(pod_threads_per_rank(local_world_size, os.environ))
    load_native_ops(native_ops, _log_on_this_rank)  # before the ranks meet: see nativeops
    deepspeed.init_distributed(dist_backend="nccl" if placement.accelerated else "gloo", verbose=False)
    world_size = int(os.environ["WORLD_SIZE"])
    object_group = None
    if world_size > 1:
        # Collective: every rank creates it, in the same order.
        object_group = (
            dist.new_group(backend="gloo", timeout=OBJECT_GROUP_TIMEOUT) if placement.accelerated else dist.group.WORLD
        )
    _quiet_libraries()
    return Session(
        rank=int(os.environ["RANK"]),
        world_size=world_size,
        local_rank=local_rank,
        local_world_size=local_world_size,
        placement=placement,
        object_group=object_group,
    )


def _log_on_this_rank(message: str) -> None:
    # Before the session exists; for what happened on this node, whichever rank it is.
    print(f"kubetune: {message}", file=sys.stderr, flush=True)


def _quiet_libraries() -> None:
    # One concise line per interval from rank 0 (our own); library chatter (load
    # reports, DeepSpeed info) only when something is wrong.
    import transformers

    transformers.logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    transformers.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    deepspeed_logger = logging.getLogger("DeepSpeed")
    deepspeed_logger.setLevel(logging.WARNING)
    if _scheduler_prestart_notice not in deepspeed_logger.filters:
        deepspeed_logger.addFilter(_scheduler_prestart_notice)
    # Deprecations inside the libraries' own calls, nothing a job's settings change; the first repeats
    # after every evaluation and checkpoint (something resets the warnings registry in between).
    for library_deprecation in LIBRARY_DEPRECATIONS:
        warnings.filterwarnings("ignore", message=library_deprecation, category=FutureWarning)


# Regexes of FutureWarnings the trainer's pod logs leave out.
LIBRARY_DEPRECATIONS = (
    r"`torch\.distributed\.all_gather_into_tensor` is deprecated",  # DeepSpeed ZeRO's gathers, torch >= 2.13
    r"`is_gradient_checkpointing` is deprecated",  # PEFT reading transformers 5's attribute
)


def _scheduler_prestart_notice(record: logging.LogRecord) -> bool:
    """False for the warning DeepSpeed's warm-up schedulers log from their own constructor on every run
    ("get learning rate from scheduler before it has started"): not a problem of the job."""
    return "before it has started" not in record.getMessage()


def seed_everything(seed: int) -> None:
    """Python, NumPy and torch (every device) generators from one seed."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def work_dir() -> Path:
    """Node-local scratch (``KUBETUNE_WORK_DIR``), or a temporary folder when that is not writable."""
    path = Path(os.environ.get(ENV_WORK_DIR, DEFAULT_WORK_DIR))
    try:
        path.mkdir(parents=True, exist_ok=True)
        # A uniquely named probe: the node's ranks share this directory and start together,
        # so a fixed name could be unlinked by one rank while another probes it.
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError:
        path = Path(tempfile.gettempdir()) / "kubetune-work"
        path.mkdir(parents=True, exist_ok=True)
    return path
