"""The one retry loop of the storage backends: exponential backoff with jitter, then StorageUnavailable.

Retry tuning (all optional) comes from ``KUBETUNE_STORAGE_RETRY_ATTEMPTS`` (8),
``KUBETUNE_STORAGE_RETRY_BASE_SECONDS`` (0.5) and ``KUBETUNE_STORAGE_RETRY_MAX_SECONDS`` (20).
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from kubetune_trainer.storage.base import StorageError, StorageUnavailable, describe

log = logging.getLogger("kubetune_trainer.storage")

T = TypeVar("T")

ENV_RETRY_ATTEMPTS = "KUBETUNE_STORAGE_RETRY_ATTEMPTS"
ENV_RETRY_BASE_SECONDS = "KUBETUNE_STORAGE_RETRY_BASE_SECONDS"
ENV_RETRY_MAX_SECONDS = "KUBETUNE_STORAGE_RETRY_MAX_SECONDS"


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter around whole-object operations."""

    attempts: int = 8
    base_seconds: float = 0.5
    max_seconds: float = 20.0

    @classmethod
    def from_env(cls) -> RetryPolicy:
        """The default policy, overridden by the ``KUBETUNE_STORAGE_RETRY_*`` variables."""
        default = cls()
        try:
            return cls(
                attempts=max(1, int(os.environ.get(ENV_RETRY_ATTEMPTS, default.attempts))),
                base_seconds=float(os.environ.get(ENV_RETRY_BASE_SECONDS, default.base_seconds)),
                max_seconds=float(os.environ.get(ENV_RETRY_MAX_SECONDS, default.max_seconds)),
            )
        except ValueError as exc:
            raise StorageError(f"invalid storage retry setting in the environment: {exc}") from exc

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt`` (1-based): half fixed, half random ("equal jitter")."""
        ceiling = min(self.max_seconds, self.base_seconds * (2 ** (attempt - 1)))
        return float(ceiling / 2 + random.uniform(0, ceiling / 2))  # noqa: S311 - jitter, not cryptography


def with_retries(
    policy: RetryPolicy, what: str, fn: Callable[[], T], is_transient: Callable[[BaseException], bool]
) -> T:
    """Run ``fn``; on a transient error wait and run it again; after ``policy.attempts`` raise StorageUnavailable.

    A permanent error (``is_transient`` false) is raised as it is.  ``fn`` may keep state between calls:
    a batch transfer retries only the files that failed the previous call.
    """
    for attempt in range(1, policy.attempts + 1):
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc):
                raise
            if attempt == policy.attempts:
                raise StorageUnavailable(f"{what}: still failing after {attempt} attempts: {describe(exc)}") from exc
            delay = policy.delay(attempt)
            log.warning(
                "%s failed (attempt %d/%d, retrying in %.1fs): %s", what, attempt, policy.attempts, delay, describe(exc)
            )
            time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover
