"""The commands docs/runbooks.md tells an operator to run name objects the chart really creates."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RUNBOOKS = REPO / "docs" / "runbooks.md"


def test_runbook_operator_log_command_names_the_deployment_of_the_documented_release() -> None:
    helm = pytest.importorskip("tests.support.helm")
    text = RUNBOOKS.read_text()
    commands = re.findall(r"kubectl logs -n (\S+) deploy/(\S+)\s+# the operator \(release \"(\S+)\"\)", text)
    assert commands, "docs/runbooks.md has no `kubectl logs -n NS deploy/NAME` line for the operator"
    for namespace, deployment, release in commands:
        rendered = helm.render({}, name=release, namespace=namespace)
        deployments = [o["metadata"]["name"] for o in rendered if o["kind"] == "Deployment"]
        assert deployment in deployments, (
            f"runbooks.md: `kubectl logs -n {namespace} deploy/{deployment}` but release {release!r} "
            f"creates Deployment(s) {deployments}"
        )
