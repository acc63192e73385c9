"""The API calls the operator makes: the input of the chart's RBAC audit."""

from __future__ import annotations

from tests.support.operator_calls import record_operator_calls


def test_operator_calls_are_few_and_never_touch_secrets() -> None:
    calls = record_operator_calls()
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
        ("kopf.dev", "clusterkopfpeerings", "patch"),
    }
    assert expected <= calls
    assert not [c for c in calls if c[1].startswith("secrets")], "credentials reach pods via secretKeyRef only"
    assert not [c for c in calls if c[1].startswith("pods/")], "no exec, attach or port-forward"
    assert not [c for c in calls if c[2] in ("deletecollection", "escalate", "bind", "impersonate")]
