"""One optimizer step: ``accumulation`` micro-batches of forward, loss, backward, then the update.

The loss terms, the non-finite flag and the counters are summed on the
device and all-reduced once per optimizer step with an asynchronous
collective; nothing in a micro-step waits for the host.  On a GPU the
reduced numbers of step *k* are read after step *k + 1* has been queued
(one step of lag), so the device never idles while the host reads; on a CPU
execution is synchronous anyway and they are read at once.  Every rank reads
the same reduced vector, so every rank agrees on a SIGTERM or a NaN at the
same step.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from kubetune_trainer.feeder import Feeder
from kubetune_trainer.losses import Objective
from kubetune_trainer.session import Session
from kubetune_trainer.strategies.base import StepHook

LOSS_COMPONENTS = ("total", "task", "auxiliary", "l2sp")


@dataclass(frozen=True)
class StepStats:
    """What one optimizer step did, agreed by every rank."""

    step: int
    position: int  # micro-batches consumed after this step
    losses: dict[str, float]  # mean over the world's micro-batches
    samples: int  # whole job
    tokens: int  # whole job, non-padding
    nonfinite: bool  # some micro-batch's loss was NaN or infinite
    sigterm: bool  # some rank received SIGTERM before this step ended
    learning_rate: float
    grad_norm: float | None
    seconds: float  # wall time of the step (steady state on GPUs: between consecutive completions)


@dataclass
class _InFlight:
    step: int
    position: int
    vector: torch.Tensor
    work: Any
    learning_rate: float
    grad_norm: Any
    started: float


class TrainStep:
    """Runs optimizer steps on the engine and hands back their :class:`StepStats` in order."""

    def __init__(
        self,
        engine: Any,
        objective: Objective,
        feeder: Feeder,
        session: Session,
        *,
        accumulation: int,
        hook: StepHook | None = None,
        lag: int | None = None,
    ) -> None:
        self.engine = engine
        self.objective = objective
        self.feeder = feeder
        self.session = session
        self.accumulation = accumulation
        self.hook = hook
        # Steps whose statistics stay unread: one on a GPU (its queue never drains), none on a CPU.
        self.lag = lag if lag is not None else (1 if session.placement.accelerated else 0)
        self._in_flight: deque[_InFlight] = deque()
        self._last_done: float | None = None

    def run(self, step: int, position: int, *, sigterm: bool) -> int:
        """Queue optimizer step ``step`` from sampler ``position``; returns the position after it."""
        placement = self.session.placement
        started = time.perf_counter()
        sums = placement.zeros(len(LOSS_COMPONENTS) + 1)  # loss components, then the non-finite count
        samples = tokens = 0
        engine = self.engine
        for _ in range(self.accumulation):
            batch = self.feeder.batch(position)
            breakdown = self.objective.losses(engine, batch)
            total = breakdown.total.detach().float()
            terms = [total, breakdown.task.float(), breakdown.auxiliary.float(), breakdown.l2sp.float()]
            sums += torch.stack([*terms, (~torch.isfinite(total)).float()])
            samples += batch.samples
            tokens += batch.tokens
            engine.backward(breakdown.total)
            if self.hook is not None and engine.is_gradient_accumulation_boundary():
                self.hook.before_step(engine)
            engine.step()
            position += 1
        if self.hook is not None:
            self.hook.after_step(engine, step)
        host = placement.from_host([float(samples), float(tokens), 1.0 if sigterm else 0.0], dtype=torch.float64)
        vector = torch.cat([sums.double(), host])
        work = dist.all_reduce(vector, async_op=True) if self.session.world_size > 1 else None
        self._in_flight.append(
            _InFlight(
                step=step,
                position=position,
                vector=vector,
                work=work,
                learning_rate=float(engine.get_lr()[0]),
                grad_norm=engine.get_global_grad_norm(),
                started=started,
            )
        )
        return position

    def settle(self, *, all_steps: bool = False) -> list[StepStats]:
        """Statistics of the finished steps: all but the newest on a GPU, or every step with ``all_steps``."""
        keep = 0 if all_steps else self.lag
        done: list[StepStats] = []
        while len(self._in_flight) > keep:
            done.append(self._read(self._in_flight.popleft()))
        return done

    def _read(self, flight: _InFlight) -> StepStats:
        if flight.work is not None:
            flight.work.wait()
        values = flight.vector.tolist()  # the one host sync of the step
        now = time.perf_counter()
        since = flight.started if self._last_done is None or self.lag == 0 else max(self._last_done, flight.started)
        self._last_done = now
        micro_batches = float(self.session.world_size * self.accumulation)
        grad_norm = flight.grad_norm
        return StepStats(
            step=flight.step,
            position=flight.position,
            losses={name: values[i] / micro_batches for i, name in enumerate(LOSS_COMPONENTS)},
            samples=int(values[5]),
            tokens=int(values[6]),
            nonfinite=values[4] > 0,
            sigterm=values[7] > 0,
            learning_rate=flight.learning_rate,
            grad_norm=float(grad_norm) if grad_norm is not None else None,
            seconds=now - since,
        )
