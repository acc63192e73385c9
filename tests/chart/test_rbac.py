"""RBAC audit of every chart scenario: least privilege, no Secret access, no escalation paths, and the grants
equal the API calls the operator makes (recorded by the emulator in the operator integration tests)."""

from __future__ import annotations

import importlib
from typing import Any

import pytest

from tests.support import helm, rbac

SCENARIOS = helm.scenarios()

#: What the operator needs on namespaced resources, and nothing more (from its API client calls and kopf's:
#: kubetune_operator/apply.py, handlers.py; kopf 1.45 posts Events to core v1 only).
NAMESPACED_GRANTS = {
    *(("kubetune.io", "finetunejobs", v) for v in ("get", "list", "watch", "patch", "delete")),
    ("kubetune.io", "finetunejobs/status", "patch"),
    # blockOwnerDeletion on the children, where OwnerReferencesPermissionEnforcement is on
    ("kubetune.io", "finetunejobs/finalizers", "update"),
    ("", "events", "create"),
    *(("", resource, v) for resource in ("configmaps", "services") for v in ("get", "create")),
    *(("batch", "jobs", v) for v in ("get", "create", "list", "watch", "patch", "delete")),
    *(("", "pods", v) for v in ("list", "watch", "delete")),  # delete: pods stuck on a lost node
}
NODE_READS = {("", "nodes", "get")}  # is the node of a stuck pod NotReady or gone?
CRD_DISCOVERY = {
    ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
    ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
}
CLUSTER_ONLY_GRANTS = {
    *(("kopf.dev", "clusterkopfpeerings", v) for v in ("list", "watch", "patch")),
    *CRD_DISCOVERY,
    *NODE_READS,
}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_least_privilege_audit(scenario: str) -> None:
    objects = helm.render(SCENARIOS[scenario])
    assert rbac.audit(objects) == []
    assert rbac.bindings_reference_existing_roles(objects) == []


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_no_secret_access_of_any_kind(scenario: str) -> None:
    grants = rbac.granted(helm.render(SCENARIOS[scenario]))
    assert not {g for g in grants if g[1].startswith("secrets")}
    assert not {g for g in grants if g[1] in rbac.FORBIDDEN_RESOURCES}
    assert not {g for g in grants if g[2] in rbac.ESCALATION_VERBS}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_bindings_name_only_the_operator_service_account(scenario: str) -> None:
    objects = helm.render(SCENARIOS[scenario])
    account = helm.one(objects, "ServiceAccount")["metadata"]
    deployment = helm.one(objects, "Deployment")
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == account["name"]
    for binding in helm.find(objects, "RoleBinding") + helm.find(objects, "ClusterRoleBinding"):
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": account["name"], "namespace": account["namespace"]}
        ]


def test_cluster_mode_grants_exactly_what_the_operator_needs() -> None:
    objects = helm.render(SCENARIOS["default"])
    assert helm.find(objects, "Role") == []
    # With -A kopf neither lists nor watches namespaces.
    assert rbac.granted(objects) == NAMESPACED_GRANTS | CLUSTER_ONLY_GRANTS


def test_namespaced_mode_keeps_namespaced_grants_inside_the_watched_namespaces() -> None:
    objects = helm.render(SCENARIOS["namespaced"])
    scoped = rbac.scoped_grants(objects)
    cluster_wide = {s.grant for s in scoped if s.namespace == "*"}
    # Cluster-scoped reads only: CRD discovery, namespace names (kopf notices re-created namespaces) and nodes.
    assert cluster_wide == CRD_DISCOVERY | NODE_READS | {("", "namespaces", "list"), ("", "namespaces", "watch")}
    for namespace in ("team-a", "team-b"):
        in_namespace = {s.grant for s in scoped if s.namespace == namespace}
        assert in_namespace == NAMESPACED_GRANTS | {("kopf.dev", "kopfpeerings", v) for v in ("list", "watch", "patch")}
    assert not any(s.grant[1] == "clusterkopfpeerings" for s in scoped)


def test_rbac_can_be_disabled() -> None:
    objects = helm.render({"rbac": {"create": False}})
    assert not {o["kind"] for o in objects} & {"Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"}


def _recorded_operator_calls(**kwargs: Any) -> set[tuple[str, str, str]]:
    try:
        module: Any = importlib.import_module("tests.support.operator_calls")
    except ModuleNotFoundError:
        pytest.skip(
            "tests/support/operator_calls.py (record_operator_calls, written with the operator's kmock "
            "integration tests) does not exist yet: the granted == used cross-check cannot run"
        )
    # The lifecycle takes seconds alone; the generous timeout is for a machine shared by several test runs.
    return set(module.record_operator_calls(timeout=120.0, **kwargs))


def test_granted_equals_used_by_the_operator() -> None:
    """Every call the operator makes against the emulator is granted, and every grant is used."""
    used = _recorded_operator_calls()
    granted = rbac.granted(helm.render(SCENARIOS["default"]))
    assert used - granted == set(), f"the operator calls APIs the chart does not grant: {sorted(used - granted)}"
    assert granted - used == set(), f"the chart grants verbs the operator never uses: {sorted(granted - used)}"
