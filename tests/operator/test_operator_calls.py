"""The API calls the operator makes: the input of the chart's RBAC audit."""

from __future__ import annotations

import pytest

from tests.support.operator_calls import record_operator_calls


@pytest.mark.parametrize("watch_namespaces", [None, ["ml"]], ids=["cluster-wide", "namespaced"])
def test_operator_calls_are_few_and_never_touch_secrets(watch_namespaces: list[str] | None) -> None:
    calls = record_operator_calls(watch_namespaces=watch_namespaces)
    peering = "clusterkopfpeerings" if watch_namespaces is None else "kopfpeerings"
    expected = {
        ("kubetune.io", "finetunejobs", "watch"),
        ("kubetune.io", "finetunejobs/status", "patch"),
        ("batch", "jobs", "create"),
        ("batch", "jobs", "delete"),
        ("batch", "jobs", "patch"),
        ("", "pods", "list"),
        ("", "pods", "watch"),
        ("", "configmaps", "create"),
        ("", "services", "create"),
        ("", "events", "create"),
        ("kopf.dev", peering, "patch"),
    }
    assert expected <= calls
    assert not [c for c in calls if c[1].startswith("secrets")], "credentials reach pods via secretKeyRef only"
    assert not [c for c in calls if c[1].startswith("pods/")], "no exec, attach or port-forward"
    assert not [c for c in calls if c[2] in ("deletecollection", "escalate", "bind", "impersonate")]
