"""Both Dockerfiles: bases pinned by tag (a digest only as a real one, by build argument), a non-root USER,
no secrets, a filtered build context, and entrypoints that match what the chart and the operator's builder run."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import helm

REPO = helm.REPO
DOCKERFILES = {"operator": REPO / "operator" / "Dockerfile", "trainer": REPO / "trainer_image" / "Dockerfile"}
PINNED = re.compile(r"^(?P<name>[a-z0-9./_-]+):(?P<tag>[A-Za-z0-9._-]+)(@sha256:(?P<digest>[0-9a-f]{64}))?$")
LAST_GPU_RUN = REPO / "tests" / "gpu" / "last-run.json"
SECRET_WORDS = re.compile(r"(PASSWORD|PASSWD|SECRET|TOKEN|PRIVATE_KEY|ACCESS_KEY|API_KEY|CREDENTIAL)", re.IGNORECASE)


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class Dockerfile:
    args: dict[str, str]
    stages: list[Stage]

    def final(self) -> Stage:
        return self.stages[-1]


def parse(path: Path) -> Dockerfile:
    """Instructions per stage, with line continuations joined and global ARG defaults substituted in FROM."""
    text = re.sub(r"\\\n", " ", path.read_text())
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            parts = rest.split()
            base = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], parts[0])
            stages.append(Stage(base, parts[2] if len(parts) > 2 and parts[1].upper() == "AS" else None))
        elif not stages and keyword == "ARG":
            name, _, default = rest.partition("=")
            args[name.strip()] = default.strip().strip('"')
        elif stages:
            stages[-1].instructions.append((keyword, rest.strip()))
    return Dockerfile(args, stages)


def _exec_form(value: str) -> list[str]:
    return list(yaml.safe_load(value))


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_every_base_is_pinned_by_tag_and_builds_as_shipped(image: str) -> None:
    dockerfile = parse(DOCKERFILES[image])
    stage_names = {s.name for s in dockerfile.stages if s.name}
    for stage in dockerfile.stages:
        if stage.base in stage_names:
            continue
        match = PINNED.match(stage.base)
        assert match, f"{image}: FROM {stage.base} is not pinned as name:tag[@sha256:<64 hex>]"
        assert match.group("tag") != "latest"
        # A digest is opt-in (a build argument); a placeholder one would make the file unbuildable.
        assert match.group("digest") is None or set(match.group("digest")) != {"0"}, stage.base


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_final_stage_runs_as_a_numeric_non_root_user(image: str) -> None:
    final = parse(DOCKERFILES[image]).final()
    users = [value for keyword, value in final.instructions if keyword == "USER"]
    assert users, f"{image}: no USER in the final stage"
    user, _, group = users[-1].partition(":")
    assert user.isdigit(), f"{image}: USER {users[-1]} must be a numeric uid (kubelet verifies runAsNonRoot)"
    assert int(user) != 0, f"{image}: USER {users[-1]} is root"
    assert not group or (group.isdigit() and int(group) != 0)
    # The runtime must not switch back to root after USER.
    last_user_index = max(i for i, (keyword, _) in enumerate(final.instructions) if keyword == "USER")
    assert all(keyword != "RUN" for keyword, _ in final.instructions[last_user_index:])


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_no_secrets_in_the_image(image: str) -> None:
    dockerfile = parse(DOCKERFILES[image])
    for stage in dockerfile.stages:
        for keyword, value in stage.instructions:
            if keyword in ("ENV", "ARG", "LABEL"):
                assert not SECRET_WORDS.search(value), f"{image}: {keyword} {value} looks like a secret"
            if keyword in ("COPY", "ADD"):
                assert not re.search(r"\.env\b|\.pem\b|id_rsa|credentials|\.aws|\.netrc", value), value
            if keyword == "ADD":
                assert "://" not in value, f"{image}: ADD from a URL is unverified; download in RUN with a checksum"
            if keyword == "RUN":
                assert not re.search(r"--mount=type=secret", value) or "id=" in value
                assert "curl" not in value or "| sh" not in value, f"{image}: curl | sh"
    for name in dockerfile.args:
        assert not SECRET_WORDS.search(name), f"{image}: ARG {name} would end up in the image history"


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_runtime_is_read_only_root_compatible(image: str) -> None:
    final = parse(DOCKERFILES[image]).final()
    env = " ".join(value for keyword, value in final.instructions if keyword == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in env, "bytecode caches would be written next to the code"
    assert "HOME=/tmp" in env, "HOME must point at a writable emptyDir"


def test_operator_image_has_no_torch_and_runs_the_chart_command() -> None:
    dockerfile = parse(DOCKERFILES["operator"])
    everything = " ".join(value for stage in dockerfile.stages for _, value in stage.instructions)
    for heavy in ("torch", "deepspeed", "transformers", "peft", "[trainer]"):
        assert heavy not in everything, f"the operator image must not install {heavy}"
    assert "slim" in dockerfile.final().base
    entrypoint = [_exec_form(v) for k, v in dockerfile.final().instructions if k == "ENTRYPOINT"][-1]
    deployment = helm.one(helm.render({}), "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == entrypoint
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    user = next(v for k, v in dockerfile.final().instructions if k == "USER")
    assert user == "{runAsUser}:{runAsGroup}".format(**deployment["spec"]["template"]["spec"]["securityContext"])


def _trainer_pins() -> dict[str, str]:
    dockerfile = parse(DOCKERFILES["trainer"])
    runs = " ".join(value for stage in dockerfile.stages for keyword, value in stage.instructions if keyword == "RUN")
    pins = {}
    for package in ("torch", "deepspeed", "transformers", "peft"):
        found = re.search(rf"\b{package}==(\d+\.\d+\.\d+)", runs)
        assert found, f"{package} is not pinned with =="
        pins[package] = found.group(1)
    index = re.search(r"whl/cu(\d+)(\d)\b", dockerfile.args["TORCH_INDEX"])
    assert index, dockerfile.args["TORCH_INDEX"]
    pins["cuda"] = f"{index.group(1)}.{index.group(2)}"
    return pins


def test_trainer_image_pins_the_ml_stack_on_a_matching_cuda() -> None:
    dockerfile = parse(DOCKERFILES["trainer"])
    pins = _trainer_pins()
    assert "cuda" in dockerfile.final().base
    assert "runtime" in dockerfile.final().base, "the final stage carries no compiler toolchain"
    # torch's CUDA build and the CUDA images (the devel one compiles DeepSpeed's ops) are one release.
    for stage in [*dockerfile.stages[:1], dockerfile.final()]:
        assert f"nvidia/cuda:{pins['cuda']}." in stage.base, (stage.base, pins["cuda"])
    assert re.search(
        r"\b9\.0\b",
        dockerfile.args.get("TORCH_CUDA_ARCH_LIST", "")
        + " ".join(value for stage in dockerfile.stages for keyword, value in stage.instructions if keyword == "ARG"),
    ), "DeepSpeed's ops are built for Hopper (9.0)"


def test_trainer_image_pins_what_the_gpu_suite_ran_with() -> None:
    if not LAST_GPU_RUN.exists():
        pytest.skip("tests/gpu has not recorded a run yet (make gpu-check on a GPU machine writes it)")
    ran = yaml.safe_load(LAST_GPU_RUN.read_text())
    pins = _trainer_pins()
    for package in ("torch", "deepspeed", "transformers", "peft"):
        assert pins[package] == ran[package], (package, pins[package], ran[package])
    assert ran["cuda"].startswith(pins["cuda"]), (pins["cuda"], ran["cuda"])


def test_trainer_entrypoint_matches_the_operator_builder() -> None:
    dockerfile = parse(DOCKERFILES["trainer"])
    entrypoint = [_exec_form(v) for k, v in dockerfile.final().instructions if k == "ENTRYPOINT"][-1]
    assert entrypoint == ["python", "-m", "kubetune_trainer.launch"]
    builders = pytest.importorskip("kubetune_operator.builders", reason="the operator's builders are not there yet")
    resolve: Any = pytest.importorskip("kubetune_operator.resolve")
    settings = pytest.importorskip("kubetune_operator.settings").OperatorSettings(
        default_checkpoint_uri="s3://kubetune-checkpoints"
    )
    manifest = yaml.safe_load((REPO / "examples" / "lora-sequence-classification.yaml").read_text())
    manifest["metadata"].setdefault("uid", "0b5c6a0e-7d3c-4c1e-9b1a-3f7e2d9c1a00")
    job = resolve.load_job(manifest, settings)
    (attempt_job,) = [c for c in builders.desired_children(job, attempt=1) if c["kind"] == "Job"]
    container = attempt_job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == entrypoint, "the pod command and the image entrypoint must agree"
    assert "-m" in container["args"]
    assert container["args"][container["args"].index("-m") + 1] == "kubetune_trainer"
    pod_user = attempt_job["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
    user = next(v for k, v in dockerfile.final().instructions if k == "USER")
    assert user.split(":")[0] == str(pod_user), "the image user and the pod's runAsUser should be the same uid"
    env = " ".join(v for k, v in dockerfile.final().instructions if k == "ENV")
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    for path in re.findall(r"=(/[\w/.-]+)", env):
        if path.startswith("/opt/venv"):
            continue
        assert any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts), (
            f"{path} (from the image ENV) is not on a writable volume of the trainer pod"
        )


def test_dockerignore_sends_only_the_packages() -> None:
    lines = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines() if ln.strip() and ln[0] != "#"]
    assert lines[0] == "*", "the context is an allowlist"
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "operator/kubetune_operator", "trainer_image/kubetune_trainer"}
    copied = set()
    for image in DOCKERFILES:
        for stage in parse(DOCKERFILES[image]).stages:
            for keyword, value in stage.instructions:
                if keyword == "COPY" and "--from" not in value:
                    copied.update(shlex.split(value)[:-1])
    assert {c.rstrip("/") for c in copied} <= allowed
