"""Reading a FineTuneJob's status and Events from the emulator, for the operator tests."""

from __future__ import annotations

from typing import Any

from kubetune_operator import names
from tests.operator.conftest import FTJ, NAMESPACE
from tests.support.kube import Client, wait_for

TIMEOUT = 30.0


def status(client: Client, name: str, namespace: str = NAMESPACE) -> dict[str, Any]:
    """The FineTuneJob's status ({} while it has none or is gone)."""
    obj = client.ftj(namespace, name)
    return (obj or {}).get("status") or {}


def wait_phase(client: Client, name: str, phase: str, timeout: float = TIMEOUT) -> dict[str, Any]:
    """Wait for ``phase``; the status then."""
    wait_for(lambda: status(client, name).get("phase") == phase, timeout, what=f"{name} phase {phase}")
    return status(client, name)


def condition(st: dict[str, Any], kind: str) -> dict[str, Any]:
    """The condition of type ``kind`` (StopIteration when absent)."""
    return next(c for c in st.get("conditions", []) if c["type"] == kind)


def job_names(client: Client, name: str) -> list[str]:
    """The attempt Jobs (``<name>-a<N>``) of FineTuneJob ``name`` that exist, sorted (never another job's,
    even one whose name starts the same: tests pass in any order)."""
    return sorted(
        j["metadata"]["name"]
        for j in client.jobs(NAMESPACE)
        if names.attempt_of(j["metadata"]["name"], name) is not None
    )


def events(client: Client, name: str) -> list[tuple[str, str]]:
    """``(reason, message)`` of every Event about FineTuneJob ``name``."""
    return [
        (e["reason"], e["message"])
        for e in client.list("v1", "events", NAMESPACE)
        if e["involvedObject"]["name"] == name
    ]


def create(client: Client, manifest: dict[str, Any]) -> dict[str, Any]:
    """Create a FineTuneJob as a user would."""
    return client.create(*FTJ, manifest["metadata"].get("namespace", NAMESPACE), manifest)
