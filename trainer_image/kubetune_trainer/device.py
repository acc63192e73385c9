"""The one place where tensors meet the rank's device.

Everything the trainer builds on the host (collated batches, masked inputs,
labels, L2-SP anchors) reaches the accelerator through a :class:`Placement`;
nothing else in the trainer calls ``.to(device)``, ``.cuda()`` or picks a
device.  DeepSpeed moves the model to ``engine.device``; it never moves a
batch (DESIGN §7), which is what killed the first GPU run.

Why a class and not a ``device`` variable: a batch for a GPU should come from
pinned host memory with a non-blocking copy, so the copy overlaps the step in
flight; a CPU run must not pin (there is nothing to pin for); and the
placement tests build one for ``torch.device("meta")`` to prove every tensor
a step touches lives where the model does, on a machine without a GPU.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Placement:
    """Where this rank computes, and how host tensors get there."""

    device: torch.device

    @classmethod
    def for_rank(cls, local_rank: int) -> Placement:
        """The rank's accelerator (``cuda:<local_rank>``) when there is one, else the CPU."""
        if torch.cuda.is_available():
            return cls(torch.device("cuda", local_rank))
        return cls(torch.device("cpu"))

    @property
    def accelerated(self) -> bool:
        """True on a CUDA device (pinned memory, async copies, bf16 kernels)."""
        return self.device.type == "cuda"

    def activate(self) -> None:
        """Make this the current CUDA device (before NCCL starts); nothing to do on the CPU."""
        if self.accelerated:
            torch.cuda.set_device(self.device)

    def prepare_host(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """Pin a host batch's tensors (CUDA only), so :meth:`to_device` can copy without blocking.

        Called off the critical path (the feeder's prefetch thread).
        """
        if not self.accelerated:
            return dict(batch)
        return {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def to_device(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """Every tensor of ``batch`` on this device; other values unchanged."""
        return {k: self.tensor(v) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def tensor(self, value: torch.Tensor) -> torch.Tensor:
        """One tensor on this device (non-blocking from pinned memory)."""
        if value.device == self.device:
            return value
        return value.to(self.device, non_blocking=value.is_pinned())

    def tensors(self, values: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A name → tensor mapping moved once (L2-SP anchors: kept on the device for the whole run)."""
        return {name: self.tensor(value) for name, value in values.items()}

    def zeros(self, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Zeros on this device (accumulators that must not force a host sync)."""
        return torch.zeros(shape, dtype=dtype, device=self.device)

    def from_host(self, values: list[float], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Host numbers as a device tensor without waiting for the device.

        A blocking copy from pageable memory makes torch synchronize the stream, i.e. wait for
        every kernel queued so far; from pinned memory the copy just joins the queue.
        """
        host = torch.tensor(values, dtype=dtype)
        if not self.accelerated:
            return host.to(self.device)
        return host.pin_memory().to(self.device, non_blocking=True)

    def synchronize(self) -> None:
        """Wait for queued device work (timing edges only; never per micro-step)."""
        if self.accelerated:
            torch.cuda.synchronize(self.device)

    def memory(self) -> dict[str, int]:
        """Accelerator memory of this process: allocated, reserved and peak allocated bytes ({} on CPU)."""
        if not self.accelerated:
            return {}
        return {
            "allocated": int(torch.cuda.memory_allocated(self.device)),
            "reserved": int(torch.cuda.memory_reserved(self.device)),
            "peak": int(torch.cuda.max_memory_allocated(self.device)),
        }

    def name(self) -> str:
        """The device's marketing name ("NVIDIA H200"), or "cpu"."""
        if self.accelerated:
            return str(torch.cuda.get_device_name(self.device))
        return self.device.type


def is_out_of_memory(error: BaseException) -> bool:
    """True for an accelerator out-of-memory error (``torch.OutOfMemoryError`` or the allocator's message)."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "CUDA out of memory" in str(error)
    )
