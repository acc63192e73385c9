"""Pod Security Standards "restricted" for the operator pod (every chart scenario) and the trainer pods the
operator builds (every example FineTuneJob, through the real builders), plus the checker's own tests."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import helm
from tests.support.pod_security import pod_spec_of, read_only_root_violations, restricted_violations

SCENARIOS = helm.scenarios()
EXAMPLES = sorted((helm.REPO / "examples").glob("*.yaml"))


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_operator_pod_is_restricted(scenario: str) -> None:
    deployment = helm.one(helm.render(SCENARIOS[scenario]), "Deployment")
    pod = pod_spec_of(deployment)
    assert restricted_violations(pod) == []
    assert read_only_root_violations(pod) == []
    assert not pod.get("hostNetwork")


def _trainer_jobs(path: Path) -> list[dict[str, Any]]:
    builders = pytest.importorskip("kubetune_operator.builders", reason="the operator's builders are not there yet")
    resolve: Any = pytest.importorskip("kubetune_operator.resolve")
    settings_module = pytest.importorskip("kubetune_operator.settings")
    settings = settings_module.OperatorSettings(
        default_image="ghcr.io/kubetune/kubetune-trainer:0.1.0",
        default_checkpoint_uri="s3://kubetune-checkpoints",
        checkpoint_endpoint="http://minio.storage:9000",
        credentials_secret="kubetune-s3",
    )
    manifest = yaml.safe_load(path.read_text())
    manifest["metadata"].setdefault("uid", "0b5c6a0e-7d3c-4c1e-9b1a-3f7e2d9c1a00")
    manifest["metadata"].setdefault("namespace", "ml")
    job = resolve.load_job(manifest, settings)
    children = builders.desired_children(job, attempt=1)
    return [child for child in children if child["kind"] == "Job"]


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_trainer_pods_built_by_the_operator_are_restricted(example: Path) -> None:
    (attempt_job,) = _trainer_jobs(example)
    pod = pod_spec_of(attempt_job)
    assert restricted_violations(pod) == []
    assert read_only_root_violations(pod) == []
    assert pod.get("automountServiceAccountToken") is False, "trainer pods need no API credentials"
    labels = attempt_job["spec"]["template"]["metadata"]["labels"]
    assert labels["app.kubernetes.io/component"] == "trainer", "the PodMonitor and NetworkPolicy select on it"
    ports = {p["name"] for c in pod["containers"] for p in c.get("ports", [])}
    assert "metrics" in ports, "the PodMonitor scrapes the port named metrics"


def test_trainer_pods_match_the_chart_selectors() -> None:
    (attempt_job,) = _trainer_jobs(EXAMPLES[0])
    labels = attempt_job["spec"]["template"]["metadata"]["labels"]
    objects = helm.render(SCENARIOS["monitoring"]) + helm.render(SCENARIOS["networkpolicy"])
    pod_monitor = helm.one(objects, "PodMonitor")
    assert pod_monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    policy = helm.one(objects, "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    assert "kubetune.io/job-name" in labels, "the PodMonitor copies it into job_name"


# --- the checker itself: each control is detected -----------------------------------------------------


def _good_pod() -> dict[str, Any]:
    return {
        "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [
            {
                "name": "c",
                "securityContext": {
                    "allowPrivilegeEscalation": False,
                    "capabilities": {"drop": ["ALL"]},
                    "readOnlyRootFilesystem": True,
                },
            }
        ],
        "volumes": [{"name": "tmp", "emptyDir": {}}],
    }


BREAKAGES = {
    "privileged": lambda p: p["containers"][0]["securityContext"].update(privileged=True),
    "escalation": lambda p: p["containers"][0]["securityContext"].pop("allowPrivilegeEscalation"),
    "root": lambda p: p["securityContext"].update(runAsNonRoot=False),
    "uid0": lambda p: p["containers"][0]["securityContext"].update(runAsUser=0),
    "seccomp": lambda p: p["securityContext"].pop("seccompProfile"),
    "unconfined": lambda p: p["containers"][0]["securityContext"].update(seccompProfile={"type": "Unconfined"}),
    "caps": lambda p: p["containers"][0]["securityContext"].update(capabilities={"drop": ["NET_RAW"]}),
    "sysadmin": lambda p: p["containers"][0]["securityContext"]["capabilities"].update(add=["SYS_ADMIN"]),
    "hostpath": lambda p: p["volumes"].append({"name": "h", "hostPath": {"path": "/"}}),
    "nfs": lambda p: p["volumes"].append({"name": "n", "nfs": {"server": "x", "path": "/"}}),
    "hostnetwork": lambda p: p.update(hostNetwork=True),
    "hostport": lambda p: p["containers"][0].update(ports=[{"name": "m", "containerPort": 1, "hostPort": 1}]),
    "sysctl": lambda p: p["securityContext"].update(sysctls=[{"name": "kernel.msgmax", "value": "1"}]),
    "selinux": lambda p: p["securityContext"].update(seLinuxOptions={"user": "root"}),
    "init": lambda p: p.update(initContainers=[{"name": "i", "securityContext": {}}]),
}


def test_checker_accepts_a_restricted_pod() -> None:
    assert restricted_violations(_good_pod()) == []


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_checker_detects_each_violation(breakage: str) -> None:
    pod = copy.deepcopy(_good_pod())
    BREAKAGES[breakage](pod)
    assert restricted_violations(pod), f"{breakage} was not detected"
