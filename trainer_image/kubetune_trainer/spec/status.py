"""The ``FineTuneJob`` status: what the operator observed (DESIGN §2, §8).

Conditions are the truth; ``phase`` is a one-word summary derived from them
(:func:`phase_of`, from the table :class:`ConditionType`).  Written by the operator only.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

from pydantic import Field, Strict

from kubetune_trainer.spec._base import KubeModel


class Phase(StrEnum):
    """One-word summary of a job's state, for ``kubectl get``."""

    PENDING = "Pending"
    RUNNING = "Running"
    RESTARTING = "Restarting"
    SUSPENDED = "Suspended"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


class ConditionType(StrEnum):
    """The one table of FineTuneJob conditions: each row is a type, the phase it implies and its Events.

    Columns: the type; the phase it implies while True (of the conditions that are True, the
    last row wins; none True means Pending); whether its turning True is a Warning Event; the
    conditions it sets False when it turns True; whether its turning False (or changing reason
    while False) is the news instead, a Warning Event (``PodsReady``: a pod cannot start).  Row
    order is also the order of ``status.conditions``.  Adding a condition is one row here (plus
    the code that sets it).
    """

    phase: Phase
    warning: bool
    clears: tuple[str, ...]
    false_is_news: bool

    def __new__(
        cls, value: str, phase: Phase, warning: bool, clears: tuple[str, ...], false_is_news: bool = False
    ) -> ConditionType:
        member = str.__new__(cls, value)
        member._value_ = value
        member.phase = phase
        member.warning = warning
        member.clears = clears
        member.false_is_news = false_is_news
        return member

    @classmethod
    def of(cls, value: str) -> ConditionType:
        """The condition type called ``value`` (ValueError for an unknown one)."""
        for kind in cls:
            if kind.value == value:
                return kind
        raise ValueError(f"unknown condition type {value!r}")

    CREATED = "Created", Phase.PENDING, False, ()
    PODS_READY = "PodsReady", Phase.PENDING, False, (), True  # False: why a pod of the attempt cannot start
    CHILD_CONFLICT = "ChildConflict", Phase.PENDING, True, ()  # a foreign object holds a child's name
    RUNNING = "Running", Phase.RUNNING, False, ("Restarting", "Stalled")
    STALLED = "Stalled", Phase.RUNNING, True, ()  # rank 0 made no optimizer step for stallTimeoutSeconds
    RESTARTING = "Restarting", Phase.RESTARTING, True, ("Running",)
    SUSPENDED = "Suspended", Phase.SUSPENDED, False, ("Running",)
    SUCCEEDED = "Succeeded", Phase.SUCCEEDED, False, ("Running", "Restarting", "Suspended", "Stalled")
    FAILED = "Failed", Phase.FAILED, True, ("Running", "Restarting")


def phase_of(true_conditions: set[ConditionType]) -> Phase:
    """The phase implied by the conditions that are True: the last such row of :class:`ConditionType`."""
    phase = Phase.PENDING
    for kind in ConditionType:
        if kind in true_conditions:
            phase = kind.phase
    return phase


def _listed(words: list[str], last: str) -> str:
    return ", ".join(words[:-1]) + f"{last}{words[-1]}"


_TYPES = [str(kind) for kind in ConditionType]


class Condition(KubeModel):
    """A Kubernetes-style condition."""

    type: Annotated[ConditionType, Strict(False)] = Field(description=_listed(_TYPES, " or ") + ".")
    status: Annotated[str, Field(pattern="^(True|False|Unknown)$")] = Field(description="True, False or Unknown.")
    reason: Annotated[str, Field(pattern="^[A-Za-z]([A-Za-z0-9_]*)$", max_length=1024)] = Field(
        description="CamelCase reason of the last transition."
    )
    message: Annotated[str, Field(max_length=32768)] = Field(default="", description="Human-readable details.")
    last_transition_time: str = Field(description="When status last changed (RFC 3339).")
    observed_generation: int | None = Field(default=None, description="The spec generation this was computed from.")


class Progress(KubeModel):
    """Live training progress read from rank 0's metrics endpoint."""

    step: int | None = Field(default=None, description="Optimizer steps done.")
    total_steps: int | None = Field(default=None, description="Optimizer steps planned.")
    epoch: float | None = Field(default=None, description="Fractional epoch.")
    loss: float | None = Field(default=None, description="Latest total training loss.")
    tokens_per_second: float | None = Field(default=None, description="Training throughput in tokens per second.")
    samples_per_second: float | None = Field(default=None, description="Training throughput in samples per second.")
    model_flops_utilization: float | None = Field(
        default=None, description="Model FLOPs utilization (0-1): achieved model FLOP/s over the accelerators' peak."
    )
    eta: str | None = Field(default=None, description="Estimated completion time (RFC 3339).")
    updated: str | None = Field(default=None, description="When this progress was read (RFC 3339).")
    last_step_time: str | None = Field(
        default=None, description="When the step was last seen to advance in the current attempt (RFC 3339)."
    )


class CheckpointStatus(KubeModel):
    """The newest committed checkpoint."""

    uri: str | None = Field(
        default=None,
        description="URI of the step folder of this checkpoint, <checkpoint.uri>/checkpoints/step-<8-digit step>, "
        "while the job runs and after it finished.",
    )
    step: int | None = Field(default=None, description="Step of the checkpoint.")
    time: str | None = Field(default=None, description="When it was committed (RFC 3339).")


class OutputStatus(KubeModel):
    """The published model."""

    uri: str | None = Field(default=None, description="URI of the published model.")


class DataStatus(KubeModel):
    """What the trainer's data pipeline gave, from the finished attempt's termination message."""

    examples: dict[str, int] | None = Field(
        default=None, description="Examples trained and evaluated on, by source (train, validation)."
    )
    dropped: dict[str, int] | None = Field(
        default=None,
        description="Examples dropped at tokenization because no trainable token was left, by reason.",
    )


class FineTuneJobStatus(KubeModel):
    """Observed state of a FineTuneJob."""

    phase: Annotated[Phase, Strict(False)] | None = Field(
        default=None, description="One-word summary derived from the conditions."
    )
    conditions: list[Condition] = Field(default_factory=list, description=_listed(_TYPES, ", ") + ".")
    attempt: int | None = Field(default=None, description="Current attempt number (1-based).")
    restarts: int = Field(default=0, description="Gang restarts after failures so far (runPolicy.maxRestarts).")
    preemptions: int = Field(
        default=0,
        description="Attempts ended by a disruption (eviction, drain, lost node, Kueue preemption) and re-queued; "
        "they do not count as restarts.",
    )
    start_time: str | None = Field(default=None, description="When the first attempt started (RFC 3339).")
    completion_time: str | None = Field(default=None, description="When the job finished (RFC 3339).")
    progress: Progress | None = Field(default=None, description="Live training progress.")
    checkpoint: CheckpointStatus | None = Field(default=None, description="Newest committed checkpoint.")
    evaluation: dict[str, float] | None = Field(default=None, description="Latest evaluation metrics.")
    output: OutputStatus | None = Field(default=None, description="The published model.")
    data: DataStatus | None = Field(default=None, description="Examples used and dropped (set when the job succeeds).")
    observed_generation: int | None = Field(default=None, description="The spec generation last reconciled.")
