"""Micro-batches for the step and the evaluation: built on the host, handed over on the rank's device.

A :class:`Batcher` is pure host work: collate the examples (or packed rows),
draw the masked-LM masks for the task and the auxiliary loss from a CPU
generator seeded by (seed, position, rank), and count samples and real
tokens.  Drawing on the CPU makes the masks the same on every device, so a
run resumed on other hardware sees the batches an uninterrupted one would.

A :class:`Feeder` walks the sampler's positions and moves each batch to the
device through the :class:`~kubetune_trainer.device.Placement`.  On a GPU it
prepares the next batches on a background thread into pinned memory, so the
host work and the copy overlap the step in flight.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

from kubetune_trainer import data as data_mod
from kubetune_trainer.device import Placement
from kubetune_trainer.packing import collate_packed
from kubetune_trainer.spec import Task

MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
TASK_MASK_PROBABILITY = 0.15  # BERT's masked-LM rate for the masked-lm task


@dataclass
class Batch:
    """One micro-batch: model inputs, task targets, auxiliary targets, and what it holds."""

    inputs: dict[str, Any]  # keyword arguments of the model (auxiliary inputs included)
    labels: Any  # task targets (masked-LM: the masked positions' ids, else -100)
    aux_labels: Any = None  # auxiliary loss targets; None without an auxiliary loss
    samples: int = 0  # examples (packed: documents)
    tokens: int = 0  # non-padding tokens

    def tensors(self) -> dict[str, Any]:
        """Every tensor of the batch by name (labels as ``kubetune_labels`` / ``kubetune_aux_labels``)."""
        found = dict(self.inputs)
        found["kubetune_labels"] = self.labels
        if self.aux_labels is not None:
            found["kubetune_aux_labels"] = self.aux_labels
        return found

    def moved(self, placement: Placement, *, pin: bool = False) -> Batch:
        """The same batch with every tensor on ``placement``'s device (or pinned on the host)."""
        move = placement.prepare_host if pin else placement.to_device
        tensors = move(self.tensors())
        labels = tensors.pop("kubetune_labels")
        aux_labels = tensors.pop("kubetune_aux_labels", None)
        return replace(self, inputs=tensors, labels=labels, aux_labels=aux_labels)


@dataclass(frozen=True)
class Masking:
    """BERT-style masking of one input: which ids are special, what replaces them."""

    mask_token_id: int
    vocab_size: int
    special_ids: tuple[int, ...]
    probability: float


@dataclass(frozen=True)
class Batcher:
    """Host-side batch construction for one rank (pure given its arguments)."""

    task: Task
    pad_id: int
    seed: int
    rank: int
    task_masking: Masking | None = None  # masked-lm task
    aux_kind: str | None = None  # "mlm" | "lm" | None
    aux_masking: Masking | None = None  # aux_kind "mlm"
    packed: bool = False
    flatten: bool = False  # packed rows as one row (flash attention's varlen path)

    def generator(self, position: int) -> Any:
        """The CPU generator of one batch position (the same on every device and attempt)."""
        import torch

        return torch.Generator().manual_seed(self.seed * 1_000_003 + position * 101 + self.rank)

    def build(self, items: Sequence[Any], position: int) -> Batch:
        """The batch of ``items`` (examples, or lists of examples when packed) at sampler ``position``."""
        if self.packed:
            collated = collate_packed(items, pad_id=self.pad_id, flatten=self.flatten)
            examples: list[data_mod.Example] = [e for row in items for e in row]
        else:
            examples = list(items)
            collated = data_mod.collate(examples, pad_id=self.pad_id, task=self.task)
        generator = self.generator(position)
        inputs = {k: collated[k] for k in MODEL_INPUT_KEYS if k in collated}
        labels = collated.get("labels")
        if self.task_masking is not None:
            inputs["input_ids"], labels = self._mask(collated, self.task_masking, generator)
        aux_labels = None
        if self.aux_kind is not None:
            ids, mask = collated["input_ids"], collated["attention_mask"]
            if self.aux_masking is not None:
                aux_ids, aux_labels = self._mask(collated, self.aux_masking, generator)
            else:
                from kubetune_trainer.objective import causal_lm_labels

                aux_ids, aux_labels = ids, causal_lm_labels(ids, mask)
            inputs["aux_input_ids"], inputs["aux_attention_mask"] = aux_ids, mask
        tokens = sum(len(e.input_ids) for e in examples)
        return Batch(inputs=inputs, labels=labels, aux_labels=aux_labels, samples=len(examples), tokens=tokens)

    @staticmethod
    def _mask(collated: dict[str, Any], masking: Masking, generator: Any) -> tuple[Any, Any]:
        import torch

        from kubetune_trainer.objective import mask_tokens

        ids = collated["input_ids"]
        special = (collated["attention_mask"] == 0) | torch.isin(
            ids, torch.tensor(masking.special_ids, dtype=ids.dtype)
        )
        return mask_tokens(
            ids,
            mask_token_id=masking.mask_token_id,
            vocab_size=masking.vocab_size,
            special_mask=special,
            probability=masking.probability,
            generator=generator,
        )


def batcher_for(spec: Any, tokenizer: Any, *, rank: int, flatten_packed: bool) -> Batcher:
    """The :class:`Batcher` a job's spec asks for (task masking, auxiliary loss, packing)."""

    def masking(probability: float) -> Masking:
        return Masking(
            mask_token_id=int(tokenizer.mask_token_id),
            vocab_size=len(tokenizer),
            special_ids=tuple(sorted(set(tokenizer.all_special_ids))),
            probability=probability,
        )

    aux = spec.objective.auxiliary
    aux_kind = aux.type if aux is not None and aux.weight > 0 else None
    return Batcher(
        task=spec.model.task,
        pad_id=int(tokenizer.pad_token_id),
        seed=spec.training.seed,
        rank=rank,
        task_masking=masking(TASK_MASK_PROBABILITY) if spec.model.task == Task.MASKED_LM else None,
        aux_kind=aux_kind,
        aux_masking=masking(aux.mask_probability) if aux is not None and aux_kind == "mlm" else None,
        packed=spec.dataset.packing,
        flatten=spec.dataset.packing and flatten_packed,
    )


@dataclass
class Feeder:
    """This rank's training micro-batches, by position (micro-batches consumed since the start)."""

    items: Sequence[Any]  # examples, or packed rows (lists of examples)
    sampler: data_mod.LengthGroupedSampler
    batcher: Batcher
    placement: Placement
    prefetch: int = 0  # batches prepared ahead on a background thread (GPU runs)
    _epoch: int = field(default=-1, init=False, repr=False)
    _epoch_batches: Any = field(default_factory=list, init=False, repr=False)  # the sampler's index array
    _ahead: deque[tuple[int, Future[Batch]]] = field(default_factory=deque, init=False, repr=False)
    _pool: ThreadPoolExecutor | None = field(default=None, init=False, repr=False)

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches per rank per epoch."""
        return self.sampler.batches_per_epoch()

    def where(self, position: int) -> tuple[int, int]:
        """(epoch, batch index within the epoch) of a position."""
        return divmod(position, self.batches_per_epoch)

    def host_batch(self, position: int) -> Batch:
        """The batch at ``position``, on the host (pinned when the device wants it)."""
        epoch, index = self.where(position)
        if epoch != self._epoch:
            self._epoch_batches = self.sampler.epoch_batches(epoch)
            self._epoch = epoch
        batch = self.batcher.build([self.items[i] for i in self._epoch_batches[index]], position)
        return batch.moved(self.placement, pin=True) if self.placement.accelerated else batch

    def batch(self, position: int) -> Batch:
        """The batch at ``position`` on the device."""
        if self.prefetch <= 0:
            return self.host_batch(position).moved(self.placement)
        while self._ahead and self._ahead[0][0] != position:
            self._ahead.popleft()  # a jump (resume): drop what was prepared for other positions
        if not self._ahead:
            self._ahead.append((position, self._submit(position)))
        last = self._ahead[-1][0]
        for ahead in range(last + 1, position + self.prefetch + 1):
            self._ahead.append((ahead, self._submit(ahead)))
        _, future = self._ahead.popleft()
        return future.result().moved(self.placement)

    def _submit(self, position: int) -> Future[Batch]:
        # One worker: the sampler's epoch cache is not shared between threads.
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kubetune-feeder")
        return self._pool.submit(self.host_batch, position)

    def close(self) -> None:
        """Stop the prefetch thread."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._ahead.clear()


def eval_batches(
    examples: Sequence[data_mod.Example],
    batcher: Batcher,
    placement: Placement,
    *,
    micro_batch_size: int,
    rank: int,
    world_size: int,
) -> Iterator[tuple[list[int], Batch]]:
    """This rank's evaluation batches on the device, with the example indices each holds (padding slots dropped).

    A rank with fewer examples still runs a batch (of example 0) for every batch the others run:
    ZeRO-3 needs every rank in every forward.  Evaluation never packs.
    """
    unpacked = replace(batcher, packed=False, flatten=False)
    shards = data_mod.eval_shards(len(examples), micro_batch_size=micro_batch_size, world_size=world_size, rank=rank)
    for number, indices in enumerate(shards):
        real = [i for i in indices if i >= 0]
        batch = unpacked.build([examples[i] for i in (real or [0])], number)
        yield real, batch.moved(placement)
