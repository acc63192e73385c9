"""The termination message: what a trainer pod tells the operator when it ends (pure pydantic).

Kubernetes copies the container's termination-message file (at most 4096 bytes)
into the pod status.  The trainer writes one JSON object of this model there; the
operator's state machine, ``kubetune run`` and the launcher read it back with
:meth:`TerminationMessage.parse`.  Reading is lenient (unknown fields are ignored
and non-numeric evaluation values dropped) so that an operator reads messages of
a newer trainer; a file that is not such an object (a log tail written by
Kubernetes' ``FallbackToLogsOnError``) parses as None.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic.alias_generators import to_camel

MAX_TERMINATION_BYTES = 4000  # Kubernetes keeps at most 4096 bytes of the termination message

PREEMPTED = "Preempted"  # the reason of a trainer that committed a checkpoint after SIGTERM
SUCCEEDED = "Succeeded"


class _Wire(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore", frozen=True)


class OutputRef(_Wire):
    """Where the model was published."""

    uri: str


class CheckpointRef(_Wire):
    """The newest checkpoint the trainer committed."""

    step: int | None = None
    uri: str | None = None  # the checkpoint root the trainer wrote to (the step folder is derived from step)
    time: str | None = None


class CheckpointFallback(_Wire):
    """A resume that skipped a checkpoint failing verification."""

    from_step: int | None = Field(
        default=None, validation_alias=AliasChoices("from", "fromStep"), serialization_alias="from"
    )
    to_step: int | None = Field(default=None, validation_alias=AliasChoices("to", "toStep"), serialization_alias="to")


class DataCounts(_Wire):
    """What the data pipeline gave: examples per source ("train", "validation") and drops by reason."""

    examples: dict[str, int] = Field(default_factory=dict)
    dropped: dict[str, int] = Field(default_factory=dict)


class TerminationMessage(_Wire):
    """One trainer pod's last word: why it ended, and on success what it produced."""

    reason: str = Field(description="CamelCase reason: Succeeded, Preempted, InvalidData, StorageUnavailable, ...")
    message: str = Field(default="", description="One human-readable line.")
    exit_code: int | None = Field(default=None, description="The exit code the pod ends with.")
    step: int | None = Field(default=None, description="Optimizer steps done.")
    evaluation: dict[str, float] | None = Field(default=None, description="Final evaluation metrics.")
    output: OutputRef | None = None
    checkpoint: CheckpointRef | None = None
    resumed_from: int | None = Field(default=None, description="The step this attempt resumed from.")
    checkpoint_fallback: CheckpointFallback | None = None
    data: DataCounts | None = Field(default=None, description="Examples trained on and dropped at tokenization.")

    @field_validator("message", mode="before")
    @classmethod
    def _one_line(cls, value: Any) -> Any:
        return " ".join(value.split()) if isinstance(value, str) else value

    @field_validator("evaluation", mode="before")
    @classmethod
    def _numbers_only(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {
                str(k): float(v) for k, v in value.items() if isinstance(v, int | float) and not isinstance(v, bool)
            }
        return value

    @classmethod
    def parse(cls, text: str | bytes | None) -> TerminationMessage | None:
        """The message in ``text``, or None when it is empty, plain text or not a valid message."""
        if not text:
            return None
        if isinstance(text, bytes):
            text = text.decode(errors="replace")
        text = text.strip()
        if not text.startswith("{"):
            return None
        try:
            return cls.model_validate(json.loads(text))
        except (ValueError, ValidationError):
            return None

    @classmethod
    def read(cls, path: Path) -> TerminationMessage | None:
        """The message in the file at ``path``; None when absent, unreadable or not a message."""
        try:
            return cls.parse(path.read_bytes())
        except OSError:
            return None

    def to_wire(self) -> dict[str, Any]:
        """The JSON-ready camelCase form, leaving out unset fields."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")

    def to_bytes(self, limit: int = MAX_TERMINATION_BYTES) -> bytes:
        """Compact JSON no longer than ``limit``: the details go first, then the message is cut."""
        data = _dumps(self.to_wire())
        if len(data) <= limit:
            return data
        body: dict[str, Any] = {"reason": self.reason, "message": self.message}
        if self.exit_code is not None:
            body["exitCode"] = self.exit_code
        data = _dumps(body)
        while len(data) > limit:
            body["message"] = body["message"][: len(body["message"]) // 2] + "..."
            data = _dumps(body)
        return data


def _dumps(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()
