"""Where training stands, what a checkpoint's client state carries, and the checkpoint hook of the loop.

Resume is exact: the sampler's position (micro-batches consumed) and the
early-stopping state travel in the checkpoint with the engine's weights,
optimizer, scheduler and RNG states, so a resumed run sees exactly the
batches an uninterrupted run would.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune_trainer import evaluation
from kubetune_trainer.session import Session
from kubetune_trainer.spec import FineTuneJobSpec, Task


@dataclass
class TrainState:
    """Where training stands."""

    batches_per_epoch: int
    early: evaluation.EarlyStopping
    step: int = 0
    micro: int = 0  # micro-batches consumed since the start (the sampler position)
    last_checkpoint_step: int | None = None
    last_eval: dict[str, Any] = field(default_factory=dict)
    resumed_from: int | None = None  # the checkpoint step this run started from
    fell_back_from: int | None = None  # a newer checkpoint that failed verification
    stopped_early: bool = False

    @property
    def epoch(self) -> float:
        """Fractional epoch."""
        return self.micro / self.batches_per_epoch

    def client_state(self) -> dict[str, Any]:
        """What a checkpoint carries besides the engine's own state."""
        epoch, batch = divmod(self.micro, self.batches_per_epoch)
        return {
            "step": self.step,
            "micro": self.micro,
            "epoch": epoch,
            "sampler": {"epoch": epoch, "batch": batch},
            "early_stopping": self.early.state(),
            "best_metric": self.early.best,
            "last_eval": self.last_eval,
        }

    def restore(self, client_state: dict[str, Any]) -> None:
        """Continue from a checkpoint's client state."""
        self.step = int(client_state["step"])
        self.micro = int(client_state["micro"])
        self.early.load(client_state.get("early_stopping", {}))
        # A run saved after early stopping fired (its last checkpoint, or finish()'s) stays stopped: the model
        # published is that evaluation's, even when publishing failed and the gang restarted.
        self.stopped_early = self.early.should_stop
        self.last_eval = dict(client_state.get("last_eval", {}))
        self.last_checkpoint_step = self.step
        self.resumed_from = self.step


def early_stopping_for(spec: FineTuneJobSpec) -> evaluation.EarlyStopping:
    """Early stopping on the spec's metric (f1 for classifiers, loss for language models by default)."""
    is_lm = spec.model.task in (Task.CAUSAL_LM, Task.MASKED_LM)
    metric = spec.training.evaluation.metric
    return evaluation.EarlyStopping(
        metric=(metric.value if metric else None) or evaluation.default_metric(is_lm),
        patience=spec.training.evaluation.early_stopping_patience,
    )


class Checkpoints:
    """The loop's checkpoint hook: restore at the start, save when due, finish uploads at the end."""

    def __init__(self, spec: FineTuneJobSpec, *, spec_hash: str, work_dir: Path, metrics: Any) -> None:
        self.manager: Any = None
        self.every = spec.checkpoint.every_steps
        if spec.checkpoint.uri:
            from kubetune_trainer.checkpoint import CheckpointManager
            from kubetune_trainer.checkpoint.compat import compatibility_of
            from kubetune_trainer.storage import open_store

            self.manager = CheckpointManager(
                spec.checkpoint.uri,
                store=open_store(spec.checkpoint.uri, endpoint=spec.checkpoint.endpoint, region=spec.checkpoint.region),
                work_dir=work_dir / "checkpoints",
                keep_last=spec.checkpoint.keep_last,
                async_upload=spec.checkpoint.async_upload,
                spec_hash=spec_hash,
                metrics=metrics,
                compatibility=compatibility_of(spec),
                resume=spec.checkpoint.resume,
            )

    @property
    def enabled(self) -> bool:
        """True when the job has a checkpoint URI."""
        return self.manager is not None

    @property
    def committed_step(self) -> int | None:
        """The newest committed checkpoint's step."""
        return self.manager.committed_step if self.manager is not None else None

    def restore(self, engine: Any, state: TrainState, session: Session) -> None:
        """Load the newest verified checkpoint into the engine and the state, if there is one."""
        if self.manager is None:
            return
        restored = self.manager.restore(engine)
        if restored is None:
            return
        state.restore(restored.client_state)
        state.fell_back_from = restored.fell_back_from
        session.log(f"resumed from {restored.uri} at step {state.step}")
        if restored.fell_back_from is not None:
            from kubetune_trainer.checkpoint.manifest import tag_for

            session.log(
                f"checkpoint {tag_for(restored.fell_back_from)} failed verification; fell back to {tag_for(state.step)}"
            )

    def due(self, step: int) -> bool:
        """A checkpoint is scheduled after ``step``."""
        return self.manager is not None and step % self.every == 0

    def save(self, engine: Any, state: TrainState) -> None:
        """Save a checkpoint of the current step unless one exists already."""
        if self.manager is not None and state.last_checkpoint_step != state.step:
            self.manager.save(engine, state.step, state.client_state())
            state.last_checkpoint_step = state.step

    def finish(self) -> None:
        """Wait for the upload in flight and its commit."""
        if self.manager is not None:
            self.manager.finish()
