"""RBAC auditing: flatten rendered Roles/ClusterRoles into (apiGroup, resource, verb) grants and check them.

Pure functions over plain dicts so the same audit runs on any rendering of the chart.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

Grant = tuple[str, str, str]  # (apiGroup, resource, verb); subresources as "pods/exec"

ROLE_KINDS = ("Role", "ClusterRole")
#: Verbs that let a subject gain permissions it was not given.
ESCALATION_VERBS = frozenset({"bind", "escalate", "impersonate"})
#: Resources a fine-tuning operator never needs and that are dangerous to hold.
FORBIDDEN_RESOURCES = frozenset(
    {"pods/exec", "pods/attach", "pods/portforward", "nodes/proxy", "serviceaccounts/token"}
)
SECRET_READ_VERBS = frozenset({"get", "list", "watch"})


@dataclass(frozen=True)
class Scoped:
    """A grant together with where it applies (``*`` for cluster-wide) and the role that gives it."""

    grant: Grant
    namespace: str
    role: str


def grants_of_rule(rule: dict[str, Any]) -> list[Grant]:
    """Every (apiGroup, resource, verb) one PolicyRule grants (resourceNames narrow, never widen)."""
    return [
        (group, resource, verb)
        for group in rule.get("apiGroups", [])
        for resource in rule.get("resources", [])
        for verb in rule.get("verbs", [])
    ]


def scoped_grants(objects: Iterable[dict[str, Any]]) -> list[Scoped]:
    """Grants of every Role and ClusterRole among ``objects`` with their scope."""
    found: list[Scoped] = []
    for obj in objects:
        if obj.get("kind") not in ROLE_KINDS:
            continue
        namespace = obj["metadata"].get("namespace", "*") if obj["kind"] == "Role" else "*"
        for rule in obj.get("rules", []):
            for grant in grants_of_rule(rule):
                found.append(Scoped(grant, namespace, f"{obj['kind']}/{obj['metadata']['name']}"))
    return found


def granted(objects: Iterable[dict[str, Any]]) -> set[Grant]:
    """The set of grants regardless of scope."""
    return {s.grant for s in scoped_grants(objects)}


def audit(objects: Iterable[dict[str, Any]]) -> list[str]:
    """Human-readable least-privilege violations (empty when the RBAC is clean).

    No wildcards anywhere, no non-resource URLs, no Secret reads (or any Secret access at all), no
    pods/exec-like subresources, no bind/escalate/impersonate.
    """
    problems: list[str] = []
    for obj in objects:
        if obj.get("kind") not in ROLE_KINDS:
            continue
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj.get("aggregationRule"):
            problems.append(f"{where}: aggregationRule pulls in permissions the chart does not list")
        for rule in obj.get("rules", []):
            if rule.get("nonResourceURLs"):
                problems.append(f"{where}: nonResourceURLs {rule['nonResourceURLs']}")
            for field in ("apiGroups", "resources", "verbs", "resourceNames"):
                if any("*" in str(item) for item in rule.get(field, [])):
                    problems.append(f"{where}: wildcard in {field}: {rule[field]}")
            for group, resource, verb in grants_of_rule(rule):
                if resource.split("/")[0] == "secrets" and group == "":
                    problems.append(f"{where}: {verb} on secrets")
                if resource in FORBIDDEN_RESOURCES:
                    problems.append(f"{where}: {verb} on {resource}")
                if verb in ESCALATION_VERBS:
                    problems.append(f"{where}: verb {verb} on {resource}")
    return problems


def bindings_reference_existing_roles(objects: list[dict[str, Any]]) -> list[str]:
    """Bindings whose roleRef names a role the chart does not render, or whose subject is not our account."""
    roles = {
        (o["kind"], o["metadata"]["name"], o["metadata"].get("namespace")) for o in objects if o["kind"] in ROLE_KINDS
    }
    problems = []
    for obj in objects:
        if obj["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        ref = obj["roleRef"]
        namespace = obj["metadata"].get("namespace") if ref["kind"] == "Role" else None
        if (ref["kind"], ref["name"], namespace) not in roles:
            problems.append(f"{obj['kind']}/{obj['metadata']['name']} refers to missing {ref['kind']}/{ref['name']}")
    return problems
