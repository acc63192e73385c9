"""Trainer failures, their exit codes, and the termination message the operator reads.

Every failure the trainer can explain is a :class:`TrainerError` subclass that
carries its :class:`ExitCode` and the CamelCase ``reason`` of the team contract.
``write_termination`` writes the one :class:`~kubetune_trainer.spec.termination.TerminationMessage`
(< 4 KiB) that Kubernetes turns into the pod's termination message.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Any

from kubetune_trainer.spec.runtime import DEFAULT_TERMINATION_LOG, ENV_TERMINATION_LOG, ExitCode, reason_of
from kubetune_trainer.spec.termination import TerminationMessage


class TrainerError(Exception):
    """A failure with a known classification: exit code + CamelCase reason + one human line."""

    exit_code: ExitCode = ExitCode.RETRYABLE
    reason: str = "Error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = " ".join(message.split())  # one line, always


class InvalidSpec(TrainerError):  # noqa: N818 (named after the termination reason it reports)
    """The trainer config does not validate (permanent)."""

    exit_code = ExitCode.INVALID_SPEC
    reason = reason_of(exit_code)


class InvalidData(TrainerError):  # noqa: N818 (named after the termination reason it reports)
    """Missing file or field, unknown label, empty dataset (permanent)."""

    exit_code = ExitCode.INVALID_DATA
    reason = reason_of(exit_code)


class InvalidModel(TrainerError):  # noqa: N818 (named after the termination reason it reports)
    """The backbone is missing or unloadable, or the strategy does not fit it (permanent)."""

    exit_code = ExitCode.INVALID_MODEL
    reason = reason_of(exit_code)


class NonFiniteLoss(TrainerError):  # noqa: N818 (named after the termination reason it reports)
    """The loss became NaN or infinite (permanent: retrying replays the same data)."""

    exit_code = ExitCode.NON_FINITE_LOSS
    reason = reason_of(exit_code)


class OutOfMemory(TrainerError):  # noqa: N818 (named after the termination reason it reports)
    """The accelerator ran out of memory (permanent: the same spec fails the same way)."""

    exit_code = ExitCode.OUT_OF_MEMORY
    reason = reason_of(exit_code)


class IncompatibleCheckpoint(TrainerError):  # noqa: N818 (named after the termination reason it reports)
    """The checkpoint to resume was written for other weights or optimizer state (permanent: see
    ``spec.checkpoint.resume``)."""

    exit_code = ExitCode.INCOMPATIBLE_CHECKPOINT
    reason = reason_of(exit_code)


class StorageUnavailable(TrainerError):  # noqa: N818 (named after the termination reason it reports)
    """Object storage could not be reached after all retries (retryable).

    The one definition: the storage backends raise it too (``kubetune_trainer.storage`` re-exports it)."""

    exit_code = ExitCode.RETRYABLE
    reason = "StorageUnavailable"


def termination_log_path() -> Path:
    """Where the termination message goes (env ``KUBETUNE_TERMINATION_LOG``)."""
    return Path(os.environ.get(ENV_TERMINATION_LOG, DEFAULT_TERMINATION_LOG))


def termination_message(reason: str, message: str, exit_code: int, **extra: Any) -> TerminationMessage:
    """The typed message; ``extra`` are its other fields by their wire names (``step``, ``evaluation``, ...)."""
    body = {k: v for k, v in extra.items() if v is not None}
    return TerminationMessage.model_validate({**body, "reason": reason, "message": message, "exitCode": int(exit_code)})


def termination_payload(reason: str, message: str, exit_code: int, **extra: Any) -> bytes:
    """The JSON termination message, shortened so that it stays below 4 KiB."""
    return termination_message(reason, message, exit_code, **extra).to_bytes()


def write_termination(
    reason: str, message: str, exit_code: int, *, overwrite: bool = False, path: Path | None = None, **extra: Any
) -> bool:
    """Write the termination message; the first writer on a node wins unless ``overwrite``.

    Several local ranks may fail at once (each sees the same bad data); a file
    lock plus the "only when empty" rule keeps the first, most specific reason.
    Returns whether this call wrote the file.
    """
    target = path or termination_log_path()
    payload = termination_payload(reason, message, exit_code, **extra)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(target, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        return False
    with os.fdopen(fd, "r+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            existing = handle.read()
            if existing.strip() and not overwrite:
                return False
            handle.seek(0)
            handle.truncate()
            handle.write(payload)
            handle.flush()
            with contextlib.suppress(OSError):
                os.fsync(handle.fileno())
            return True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def read_termination_message(path: Path | None = None) -> TerminationMessage | None:
    """The termination message written so far, or None when absent or not a message."""
    return TerminationMessage.read(path or termination_log_path())


def read_termination(path: Path | None = None) -> dict[str, Any] | None:
    """The wire form of :func:`read_termination_message` (for callers that compare JSON)."""
    message = read_termination_message(path)
    return message.to_wire() if message is not None else None
