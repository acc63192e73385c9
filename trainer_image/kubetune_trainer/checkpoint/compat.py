"""Which checkpoints a job may resume (pure): the spec fields that shape its weights and optimizer state.

The spec is immutable, so users change a job by deleting and re-creating it; the new job then
finds the old job's checkpoints under the same URI.  Every manifest records the job's uid and
the values of :data:`COMPATIBILITY_FIELDS`; :func:`judge` decides, per ``spec.checkpoint.resume``,
whether a checkpoint is resumed, skipped, or fails the job naming the fields that differ.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kubetune_trainer.spec import FineTuneJobSpec

# The weights (backbone, head, adapter shapes), the optimizer's state layout (precision, ZeRO stage)
# and what a checkpointed step means (task, labels).  Data, schedule and cadence may change.
COMPATIBILITY_FIELDS = (
    "spec.model.source",
    "spec.model.revision",
    "spec.model.task",
    "spec.model.labels",
    "spec.model.numLabels",
    "spec.strategy",
    "spec.objective.auxiliary.type",
    "spec.training.precision",
    "spec.deepspeed.zeroStage",
)
IF_COMPATIBLE = "IfCompatible"
ALWAYS = "Always"
NEVER = "Never"
_SHOWN = 80


def _lookup(doc: Mapping[str, Any], path: str) -> Any:
    value: Any = doc
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def _strategy(spec: FineTuneJobSpec) -> dict[str, Any]:
    """The strategy with its settings' defaults filled in, so that an omitted block equals a default one."""
    strategy = spec.strategy
    wire: dict[str, Any] = strategy.to_wire()
    settings = getattr(strategy, "settings", None)
    chosen = settings() if callable(settings) else None
    if chosen is not None:
        wire = {"type": wire["type"], wire["type"]: chosen.to_wire()}
    return wire


def _flatten(prefix: str, value: Any) -> dict[str, Any]:
    if isinstance(value, Mapping) and value:
        flat: dict[str, Any] = {}
        for key in sorted(value):
            flat.update(_flatten(f"{prefix}.{key}", value[key]))
        return flat
    return {prefix: value}


def compatibility_of(spec: FineTuneJobSpec) -> dict[str, Any]:
    """The values that must match for a checkpoint to resume into ``spec``, by dotted field path (JSON-ready)."""
    wire = {"spec": {**spec.to_wire(), "strategy": _strategy(spec)}}
    found: dict[str, Any] = {}
    for path in COMPATIBILITY_FIELDS:
        found.update(_flatten(path, _lookup(wire, path)))
    return {path: value for path, value in found.items() if value is not None}


def _shown(value: Any) -> str:
    text = "unset" if value is None else json.dumps(value, separators=(",", ":"))
    return text if len(text) <= _SHOWN else text[: _SHOWN - 3] + "..."


def differences(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``field (old → new)`` for every compatibility field that differs, sorted by field."""
    return [
        f"{path} ({_shown(recorded.get(path))} → {_shown(current.get(path))})"
        for path in sorted(set(recorded) | set(current))
        if recorded.get(path) != current.get(path)
    ]


@dataclass(frozen=True)
class Verdict:
    """What to do with one committed checkpoint at resume."""

    resume: bool
    note: str | None = None  # a log line worth writing
    error: str | None = None  # the job must fail (IncompatibleCheckpoint) with this message


def judge(
    *,
    uri: str,
    recorded_uid: str,
    recorded: Mapping[str, Any],
    job_uid: str,
    current: Mapping[str, Any],
    policy: str,
) -> Verdict:
    """Resume the checkpoint at ``uri`` (written by job ``recorded_uid`` with ``recorded`` values)?

    This job's own checkpoints always resume.  Another job's: ``Never`` skips it; a checkpoint from
    before compatibility was recorded resumes (nothing to compare); otherwise ``IfCompatible``
    resumes a matching one and fails on a mismatch, ``Always`` resumes it with a warning."""
    if job_uid and recorded_uid == job_uid:
        return Verdict(True)
    if policy == NEVER:
        return Verdict(False, f"checkpoint {uri} was written by another FineTuneJob: not resumed (resume: Never)")
    if not recorded:
        return Verdict(True, f"checkpoint {uri} records no compatibility fields (an older kubetune): resuming it")
    diff = differences(recorded, current)
    if not diff:
        return Verdict(True, f"checkpoint {uri} was written by another FineTuneJob with the same weights: resuming")
    listed = "; ".join(diff)
    if policy == ALWAYS:
        return Verdict(True, f"checkpoint {uri} was written for a different spec ({listed}): resuming (resume: Always)")
    return Verdict(
        False,
        error=(
            f"checkpoint {uri} was written for a different spec: {listed}. Delete it, use another "
            "spec.checkpoint.uri, or set spec.checkpoint.resume to Never (start from scratch) or Always "
            "(load it anyway)"
        ),
    )
