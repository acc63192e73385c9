"""``kubectl apply --dry-run=client --validate=strict -f crds/`` accepts the generated CRD.

The real kubectl runs against the fake API server of :mod:`tests.support.kubectl_server`
(discovery plus the Kubernetes 1.32 OpenAPI from ``kubernetes-validate``), so its
client-side schema validation is on: the CRD manifest is checked against
``io.k8s.apiextensions-apiserver.pkg.apis.apiextensions.v1.CustomResourceDefinition``,
including every ``JSONSchemaProps`` of the embedded schema (unknown fields, wrong
primitive types, missing required fields).  Broken copies of the CRD must be rejected
by the very same command, so a pass is not vacuous.  Skipped only without kubectl.
"""

from __future__ import annotations

import asyncio
import copy
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.kubectl_server import KUBERNETES_VERSION, kubectl_api_server

ROOT = Path(__file__).resolve().parents[2]
CRDS = ROOT / "crds"
CRD_FILE = CRDS / "kubetune.io_finetunejobs.yaml"
KUBECTL = shutil.which("kubectl")
CRD_NAME = "customresourcedefinition.apiextensions.k8s.io/finetunejobs.kubetune.io"

needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed")
pytestmark = pytest.mark.timeout(60)


async def _kubectl(server: str, home: Path, *args: str) -> tuple[int, str, str]:
    """Run kubectl against ``server`` only: no kubeconfig, caches and HOME under ``home``."""
    assert KUBECTL is not None
    home.mkdir(parents=True, exist_ok=True)
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(home),
        "KUBECONFIG": str(home / "no-kubeconfig"),
    }
    argv = [KUBECTL, "--server", server, "--cache-dir", str(home / "cache"), "--request-timeout", "20s", *args]
    process = await asyncio.create_subprocess_exec(
        *argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=45)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def _dry_run_apply(path: Path, home: Path, field_validation: bool = False) -> tuple[int, str, str, list[str]]:
    """``kubectl apply --dry-run=client --validate=strict -f path``; also the paths kubectl requested."""
    async with kubectl_api_server(field_validation=field_validation) as server:
        url = str(server.url).rstrip("/")
        code, out, err = await _kubectl(url, home, "apply", "--dry-run=client", "--validate=strict", "-f", str(path))
        requested = [request.url.path for request in server]
        agents = {request.headers.get("User-Agent", "") for request in server if request.url.path != "/version"}
    # The gcloud kubectl dispatcher picks the build by the server's minor version: make sure it is 1.32.
    minor = ".".join(KUBERNETES_VERSION.split(".")[:2])
    assert agents, requested
    assert all(agent.startswith(f"kubectl/{minor}.") for agent in agents), agents
    return code, out, err, requested


def _crd() -> dict[str, Any]:
    crd: dict[str, Any] = yaml.safe_load(CRD_FILE.read_text())
    return crd


def _version(crd: dict[str, Any]) -> dict[str, Any]:
    version: dict[str, Any] = crd["spec"]["versions"][0]
    return version


def _spec_schema(crd: dict[str, Any]) -> dict[str, Any]:
    schema: dict[str, Any] = _version(crd)["schema"]["openAPIV3Schema"]["properties"]["spec"]
    return schema


# name -> (how to break a copy of the CRD, what kubectl must say about it)
BREAKAGES: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "unknown-field-in-version": (
        lambda crd: _version(crd).__setitem__("bogus", 1),
        'unknown field "bogus" in io.k8s.apiextensions-apiserver.pkg.apis.apiextensions.v1.'
        "CustomResourceDefinitionVersion",
    ),
    "wrong-type-served": (
        lambda crd: _version(crd).__setitem__("served", "yes"),
        'CustomResourceDefinitionVersion.served: got "string", expected "boolean"',
    ),
    "missing-required-scope": (
        lambda crd: crd["spec"].pop("scope"),
        'missing required field "scope"',
    ),
    "misspelt-schema-keyword": (
        lambda crd: _spec_schema(crd).__setitem__("minimumLength", 3),
        'unknown field "minimumLength" in io.k8s.apiextensions-apiserver.pkg.apis.apiextensions.v1.JSONSchemaProps',
    ),
    "required-not-a-list": (
        lambda crd: _spec_schema(crd).__setitem__("required", "strategy"),
        'JSONSchemaProps.required: got "string", expected "array"',
    ),
}


def _write_broken(directory: Path, breakage: str) -> Path:
    crd = copy.deepcopy(_crd())
    BREAKAGES[breakage][0](crd)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CRD_FILE.name).write_text(yaml.safe_dump(crd, sort_keys=False))
    return directory


def test_crds_directory_holds_the_generated_crd() -> None:
    assert [path.name for path in sorted(CRDS.glob("*.yaml"))] == [CRD_FILE.name]
    assert _crd()["kind"] == "CustomResourceDefinition"


@needs_kubectl
async def test_kubectl_client_dry_run_accepts_the_crd(tmp_path: Path) -> None:
    code, out, err, requested = await _dry_run_apply(CRDS, tmp_path / "home")

    assert code == 0, err
    assert out.strip() == f"{CRD_NAME} created (dry run)"
    assert "error" not in err.lower(), err
    # The schema really was fetched and used: v3 to learn the server leaves validation
    # to the client, v2 (protobuf) for the validation itself; and nothing was written.
    assert "/openapi/v3/apis/apiextensions.k8s.io/v1" in requested
    assert "/openapi/v2" in requested
    assert "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/finetunejobs.kubetune.io" in requested


@needs_kubectl
@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
async def test_kubectl_client_dry_run_rejects_a_broken_copy(tmp_path: Path, breakage: str) -> None:
    broken = _write_broken(tmp_path / "crds", breakage)

    code, out, err, requested = await _dry_run_apply(broken, tmp_path / "home")

    assert code != 0, out
    assert "created" not in out
    assert f'error validating "{broken / CRD_FILE.name}"' in err, err
    assert BREAKAGES[breakage][1] in err, err
    assert "/openapi/v2" in requested


@needs_kubectl
async def test_server_side_field_validation_turns_client_validation_off(tmp_path: Path) -> None:
    """Why the fake server hides ``fieldValidation``: once the server supports it (every real
    API server since 1.25 does), ``--validate=strict`` leaves the checking to the server, and a
    client-side dry run sends nothing, so even a broken CRD passes and no schema is fetched.
    """
    broken = _write_broken(tmp_path / "crds", "unknown-field-in-version")

    code, out, err, requested = await _dry_run_apply(broken, tmp_path / "home", field_validation=True)

    assert code == 0, err
    assert out.strip() == f"{CRD_NAME} created (dry run)"
    assert "/openapi/v2" not in requested
