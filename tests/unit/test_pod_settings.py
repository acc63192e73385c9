"""The pod settings GPU clusters need (``spec.resources.env``, labels, annotations, affinity, topology spread,
extra volumes) reach the pod template as Kubernetes expects them, never replace what the operator sets,
and keep the pods Pod Security "restricted"; the NCCL defaults are there and the spec overrides them."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from kubetune_operator import names
from kubetune_operator.builders import NCCL_DEFAULTS, desired_children
from kubetune_operator.resolve import load_job
from kubetune_operator.settings import OperatorSettings
from kubetune_operator.validate import problems_of_document
from tests.support.pod_security import restricted_violations

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = OperatorSettings(default_checkpoint_uri="s3://ckpt")
RDMA = yaml.safe_load((ROOT / "examples" / "rdma-infiniband-full-causal-lm.yaml").read_text())
BASE = yaml.safe_load((ROOT / "examples" / "lora-sequence-classification.yaml").read_text())


def pod_template(doc: dict[str, Any], uid: str | None = "u-1") -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    if uid:
        doc["metadata"]["uid"] = uid
    job = next(o for o in desired_children(load_job(doc, SETTINGS), attempt=2) if o["kind"] == "Job")
    template: dict[str, Any] = job["spec"]["template"]
    return template


def env_of(template: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {entry["name"]: entry for entry in template["spec"]["containers"][0]["env"]}


def test_rdma_example_renders_valid_kubernetes_objects() -> None:
    for obj in desired_children(load_job(copy.deepcopy(RDMA), SETTINGS), attempt=1):
        kubernetes_validate.validate(obj, "1.33.0", strict=True)


def test_env_sets_and_overrides_nccl_defaults() -> None:
    env = env_of(pod_template(RDMA))
    assert env["NCCL_IB_HCA"]["value"].startswith("mlx5_0")
    assert env["TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC"]["value"] == "1200", "the spec overrides the default"
    names_in_order = [e["name"] for e in pod_template(RDMA)["spec"]["containers"][0]["env"]]
    assert names_in_order.count("TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC") == 1
    defaults = env_of(pod_template(BASE))
    for name, value in NCCL_DEFAULTS:
        assert defaults[name]["value"] == value
    assert defaults["KUBETUNE_JOB_UID"]["value"] == "u-1"
    assert "KUBETUNE_JOB_UID" not in env_of(pod_template(BASE, uid=None)), "no uid before the API server gives one"


def test_env_from_a_secret_key_only() -> None:
    doc = copy.deepcopy(BASE)
    doc["spec"]["resources"]["env"] = [
        {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}
    ]
    entry = env_of(pod_template(doc))["HF_TOKEN"]
    assert entry == {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}


def test_labels_annotations_affinity_spread_and_volumes_reach_the_pods() -> None:
    template = pod_template(RDMA)
    metadata, spec = template["metadata"], template["spec"]
    assert metadata["labels"]["cost-center"] == "research-llm"
    assert metadata["labels"][names.LABEL_JOB_NAME] == "llm-ib-full"
    assert metadata["labels"][names.LABEL_ATTEMPT] == "2"
    assert metadata["annotations"] == {"k8s.v1.cni.cncf.io/networks": "ib-rdma"}
    term = spec["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]
    assert term["topologyKey"] == "topology.example.com/rack"
    assert term["matchLabelKeys"] == [names.LABEL_ATTEMPT]
    assert spec["topologySpreadConstraints"][0]["whenUnsatisfiable"] == "DoNotSchedule"
    scratch = next(v for v in spec["volumes"] if v["name"] == "nvme-scratch")
    assert scratch["ephemeral"]["volumeClaimTemplate"]["spec"]["resources"]["requests"]["storage"] == "1500Gi"
    mounts = {m["name"]: m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
    assert mounts["nvme-scratch"] == "/scratch"
    assert {"config", "shm", "work", "tmp"} <= set(mounts)
    assert restricted_violations(spec) == []
    limits = spec["containers"][0]["resources"]["limits"]
    assert limits["rdma/rdma_shared_device_a"] == "1"


def _invalid(resources: dict[str, Any]) -> list[str]:
    doc = copy.deepcopy(BASE)
    doc["spec"]["resources"].update(resources)
    return [f"{p.path}: {p.message}" for p in problems_of_document(doc, "job.yaml")]


@pytest.mark.parametrize(
    ("resources", "words"),
    [
        ({"env": [{"name": "AWS_SECRET_ACCESS_KEY", "value": "s3cr3t"}]}, "must use valueFrom.secretKeyRef"),
        ({"env": [{"name": "HF_TOKEN", "value": "hf_x"}]}, "must use valueFrom.secretKeyRef"),
        ({"env": [{"name": "KUBETUNE_ATTEMPT", "value": "9"}]}, "are the operator's"),
        ({"env": [{"name": "X"}]}, "exactly one of value and valueFrom"),
        ({"env": [{"name": "X", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}]}, "is not a known field"),
        ({"env": [{"name": "BAD NAME", "value": "x"}]}, "spec.resources.env[0].name"),
        ({"podLabels": {"app.kubernetes.io/name": "x"}}, "podLabels may not set"),
        ({"podAnnotations": {"batch.kubernetes.io/job-completion-index": "3"}}, "podAnnotations may not set"),
        ({"volumes": [{"name": "host", "hostPath": {"path": "/"}}]}, "hostPath volumes are not allowed"),
        ({"volumes": [{"name": "nfs", "nfs": {"server": "x", "path": "/"}}]}, "is not a known field"),
        ({"volumes": [{"name": "two", "emptyDir": {}, "secret": {"secretName": "s"}}]}, "exactly one of"),
        ({"volumes": [{"name": "work", "emptyDir": {}}]}, "are the operator's"),
        ({"volumeMounts": [{"name": "ghost", "mountPath": "/data"}]}, "must name a volume"),
        (
            {"volumes": [{"name": "d", "emptyDir": {}}], "volumeMounts": [{"name": "d", "mountPath": "/etc/kubetune"}]},
            "may not use the operator's paths",
        ),
        (
            {"volumes": [{"name": "d", "emptyDir": {}}], "volumeMounts": [{"name": "d", "mountPath": "/data/../etc"}]},
            "spec.resources.volumeMounts[0].mountPath",
        ),
    ],
)
def test_bad_pod_settings_are_refused_naming_the_field(resources: dict[str, Any], words: str) -> None:
    problems = _invalid(resources)
    assert problems, resources
    assert any(words in problem for problem in problems), problems
    assert all(problem.startswith("spec.resources") for problem in problems), problems
