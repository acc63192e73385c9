"""The checkpoint manager's view of the gang: this rank, the world size, and collectives on a gloo group of its own.

The group is the manager's own, so that the background upload thread's collectives never
interleave with the training's (NCCL or gloo).  Outside torch.distributed (one process) every
collective is the identity.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any, TypeVar

T = TypeVar("T")

# Collectives of the manager wait this long for the slowest rank's upload before failing.
COLLECTIVE_TIMEOUT = timedelta(hours=2)


class Ranks:
    """This process's rank and the collectives the checkpoint manager runs."""

    def __init__(self) -> None:
        import torch.distributed as dist

        distributed = dist.is_available() and dist.is_initialized()
        self.rank: int = dist.get_rank() if distributed else 0
        self.world_size: int = dist.get_world_size() if distributed else 1
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self._group: Any = (
            dist.new_group(backend="gloo", timeout=COLLECTIVE_TIMEOUT) if distributed and self.world_size > 1 else None
        )

    def all_gather(self, obj: T) -> list[T]:
        """Every rank's ``obj``, in rank order."""
        if self._group is None:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self._group)
        return out

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank."""
        if self._group is None:
            return obj
        import torch.distributed as dist

        box = [obj if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0, group=self._group)
        return box[0]  # type: ignore[return-value]

    def barrier(self) -> None:
        """Wait for every rank."""
        if self._group is not None:
            import torch.distributed as dist

            dist.barrier(group=self._group)
