"""The FineTuneJob API contract: pydantic models, the generated CRD and its CEL rules agree.

Every shipped example must pass all three validators (pydantic via
``kubetune validate``, the CRD's OpenAPI schema, and every CEL rule evaluated
offline); every file of the bad-input corpus must be rejected by both pydantic
and the CRD with a message naming the annotated field; and for generated specs
the two sides must agree (hypothesis).
"""

from __future__ import annotations

import contextlib
import copy
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from kubetune_operator.crd import CRD_FILE_NAME, custom_resource_definition, render_crd_yaml
from kubetune_operator.validate import problems_of_document, validate_files
from kubetune_trainer.spec import FineTuneJob
from tests.support.crd_validator import CrdValidator, apply_defaults

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").rglob("*.yaml"))
INVALID = sorted((ROOT / "tests" / "data" / "invalid").glob("*.yaml"))


def _schema() -> dict[str, Any]:
    return custom_resource_definition()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


VALIDATOR = CrdValidator(_schema())


def _annotated_field(path: Path) -> str:
    for line in path.read_text().splitlines():
        if line.startswith("# field:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"{path} has no '# field:' annotation")


def _pydantic_accepts(document: dict[str, Any]) -> bool:
    try:
        FineTuneJob.model_validate(document)
    except ValidationError:
        return False
    return True


# --------------------------------------------------------------------------- examples


def test_examples_cover_every_strategy_and_task() -> None:
    jobs = [FineTuneJob.model_validate(yaml.safe_load(p.read_text())) for p in EXAMPLES]
    assert {j.spec.strategy.type for j in jobs} >= {
        "full",
        "partial",
        "lora",
        "adalora",
        "ia3",
        "adapter",
        "prefix",
        "prompt",
    }
    assert {j.spec.model.task.value for j in jobs} >= {
        "sequence-classification",
        "token-classification",
        "causal-lm",
        "masked-lm",
    }
    for path in EXAMPLES:
        assert path.read_text().startswith("#"), f"{path.name} must start with a comment saying what it shows"


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_passes_pydantic_schema_and_cel(path: Path) -> None:
    assert validate_files([path]) == []
    for document in yaml.safe_load_all(path.read_text()):
        assert VALIDATOR.schema_errors(document) == []
        assert VALIDATOR.cel_errors(document) == []
        # The transition (immutability) rules hold for an unchanged update.
        assert VALIDATOR.cel_errors(document, old=document) == []


def test_cli_validate_accepts_examples_and_reports_bad_files(tmp_path: Path) -> None:
    ok = subprocess.run(
        [sys.executable, "-m", "kubetune_operator.cli", "validate", *map(str, EXAMPLES)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    bundle = tmp_path / "bundle.yaml"
    bundle.write_text(
        (ROOT / "examples/lora-sequence-classification.yaml").read_text()
        + "\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n---\n"
        + (ROOT / "tests/data/invalid/lora-r-zero.yaml").read_text()
    )
    bad = subprocess.run(
        [sys.executable, "-m", "kubetune_operator.cli", "validate", str(bundle)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 1
    lines = bad.stderr.strip().splitlines()
    assert f"{bundle}#2: not a FineTuneJob: apiVersion 'v1', kind 'ConfigMap'" in lines[0]
    assert lines[1] == f"{bundle}#3: spec.strategy.lora.r: must be >= 1, got 0"
    assert len(lines) == 2


# --------------------------------------------------------------------------- bad input


def test_invalid_corpus_is_large_and_annotated() -> None:
    assert len(INVALID) >= 30
    for path in INVALID:
        _annotated_field(path)


@pytest.mark.parametrize("path", INVALID, ids=[p.name for p in INVALID])
def test_invalid_spec_rejected_by_pydantic_and_crd_naming_the_field(path: Path) -> None:
    field = _annotated_field(path)
    document = yaml.safe_load(path.read_text())

    problems = problems_of_document(document, path.name)
    assert problems, "pydantic accepted an invalid spec"
    assert any(field in str(p) for p in problems), [str(p) for p in problems]

    crd_errors = VALIDATOR.errors(document)
    assert crd_errors, "the CRD schema and CEL rules accepted an invalid spec"
    assert any(field in str(e) for e in crd_errors), [str(e) for e in crd_errors]


def test_spec_is_immutable_but_run_policy_is_not() -> None:
    document = yaml.safe_load((ROOT / "examples/lora-sequence-classification.yaml").read_text())
    changed = copy.deepcopy(document)
    changed["spec"]["strategy"]["lora"]["r"] = 16
    errors = VALIDATOR.cel_errors(changed, old=document)
    assert [e.path for e in errors] == ["spec.strategy"]
    suspended = copy.deepcopy(document)
    suspended["spec"]["runPolicy"] = {"suspend": True}
    assert VALIDATOR.cel_errors(suspended, old=document) == []


# --------------------------------------------------------------------------- CRD shape


def _walk(node: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    found = [(path, node)]
    for key, sub in node.get("properties", {}).items():
        found += _walk(sub, f"{path}.{key}" if path else key)
    if isinstance(node.get("additionalProperties"), dict):
        found += _walk(node["additionalProperties"], f"{path}.*")
    if "items" in node:
        found += _walk(node["items"], f"{path}[]")
    return found


def test_every_property_has_a_description() -> None:
    missing = []
    for path, node in _walk(_schema()):
        for key, sub in node.get("properties", {}).items():
            if not sub.get("description"):
                missing.append(f"{path}.{key}" if path else key)
    assert missing == []


def test_crd_schema_is_structural() -> None:
    """The rules of https://kubernetes.io/docs/tasks/extend-kubernetes/custom-resources/custom-resource-definitions/#specifying-a-structural-schema."""
    schema = _schema()
    assert "$ref" not in yaml.safe_dump(schema)
    assert set(schema["properties"]["metadata"]) <= {"type", "description"}
    for path, node in _walk(schema):
        int_or_string = node.get("x-kubernetes-int-or-string") is True
        preserve = node.get("x-kubernetes-preserve-unknown-fields") is True
        assert node.get("type") or int_or_string or preserve, f"{path} has no type"
        assert not ("properties" in node and "additionalProperties" in node), path
        assert node.get("additionalProperties") is not False, path
        assert node.get("uniqueItems") is not True, path
        for junctor in ("anyOf", "allOf", "oneOf", "not"):
            for branch in node.get(junctor, []) if junctor != "not" else [node.get("not", {})]:
                forbidden = {"description", "default", "additionalProperties", "nullable"} & set(branch)
                assert not forbidden, f"{path}: {junctor} may not carry {forbidden}"
                if "type" in branch:
                    assert int_or_string, path
                    assert branch["type"] in ("integer", "string"), path
        if "default" in node:
            # Defaults must themselves be valid (after their own nested defaulting).
            defaulted = apply_defaults(node, copy.deepcopy(node["default"]))
            assert list(CrdValidator(node).schema_errors(defaulted)) == [], path
        for rule in node.get("x-kubernetes-validations", []):
            field = rule.get("fieldPath", "").lstrip(".")
            target = node
            for part in field.split(".") if field else []:
                target = target["properties"][part]  # fieldPath must name a real field
            VALIDATOR._program(rule["rule"])  # compiles


def test_crd_is_a_valid_customresourcedefinition(tmp_path: Path) -> None:
    crd_file = ROOT / "crds" / CRD_FILE_NAME
    for version in ("1.30.0", "1.37.0"):
        result = subprocess.run(
            [str(Path(sys.executable).parent / "kubernetes-validate"), "--strict", "-k", version, str(crd_file)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
    crd = yaml.safe_load(crd_file.read_text())
    version = crd["spec"]["versions"][0]
    assert crd["spec"]["names"]["shortNames"] == ["ftj"]
    assert crd["spec"]["names"]["categories"] == ["kubetune"]
    assert version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"]][:6] == [
        "Phase",
        "Strategy",
        "Nodes",
        "Step",
        "Total",
        "Loss",
    ]
    assert (
        version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["deepspeed"]["properties"]["config"][
            "x-kubernetes-preserve-unknown-fields"
        ]
        is True
    )


def test_committed_crd_matches_models() -> None:
    assert (ROOT / "crds" / CRD_FILE_NAME).read_text() == render_crd_yaml()


def test_make_verify_fails_when_a_model_changes_without_regeneration(tmp_path: Path) -> None:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    copy_root = tmp_path / "repo"
    for name in ("operator", "trainer_image", "crds", "charts", "Makefile", "pyproject.toml"):
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, copy_root / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif source.exists():
            shutil.copy(source, copy_root / name)
    env_python = f"PY={sys.executable}"
    clean = subprocess.run(
        ["make", "-s", "verify", env_python], cwd=copy_root, capture_output=True, text=True, check=False
    )
    assert clean.returncode == 0, clean.stdout + clean.stderr

    job_py = copy_root / "trainer_image/kubetune_trainer/spec/strategy.py"
    text = job_py.read_text()
    assert 'description="Rank of the update matrices."' in text
    job_py.write_text(text.replace('description="Rank of the update matrices."', 'description="LoRA rank."'))
    dirty = subprocess.run(
        ["make", "-s", "verify", env_python], cwd=copy_root, capture_output=True, text=True, check=False
    )
    assert dirty.returncode != 0
    assert CRD_FILE_NAME in dirty.stdout + dirty.stderr


# --------------------------------------------------------------------------- differential


def _leaf_paths(node: dict[str, Any], path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], dict[str, Any]]]:
    found = []
    for key, sub in node.get("properties", {}).items():
        here = (*path, key)
        found.append((here, sub))
        found += _leaf_paths(sub, here)
    return found


SPEC_PATHS = [(("spec", *p), node) for p, node in _leaf_paths(_schema()["properties"]["spec"])]
BASES = [yaml.safe_load(p.read_text()) for p in EXAMPLES]

_any_scalar = st.one_of(
    st.integers(min_value=-5, max_value=70000),
    st.floats(min_value=-2, max_value=5000, allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.text(max_size=12),
    st.sampled_from(["", "lora", "full", "cpu", "none", "f1", "loss", "s3://b/k", "hf://a/b", "8Gi", "a;b", "x\n"]),
)


@st.composite
def _value_for(draw: st.DrawFn, node: dict[str, Any]) -> Any:
    """A value near the edges of what the schema node allows, or of another type."""
    choices: list[st.SearchStrategy[Any]] = [_any_scalar]
    if "enum" in node:
        choices.append(st.sampled_from(node["enum"]))
    kind = node.get("type")
    if kind in ("integer", "number"):
        edges = [node.get("minimum"), node.get("maximum")]
        for edge in [e for e in edges if e is not None]:
            choices.append(
                st.sampled_from([edge, edge - 1, edge + 1] if kind == "integer" else [edge, edge - 0.5, edge + 0.5])
            )
    if kind == "object" and "properties" in node:
        choices.append(st.just({}))
        choices.append(st.fixed_dictionaries({k: _value_for(v) for k, v in list(node["properties"].items())[:2]}))
    if kind == "object" and "additionalProperties" in node:
        choices.append(
            st.dictionaries(st.sampled_from(["cpu", "nvidia.com/gpu", "a b", "x;y"]), _any_scalar, max_size=2)
        )
    if kind == "array":
        item = node.get("items", {})
        choices.append(st.lists(_value_for(item) if item else _any_scalar, max_size=3))
    return draw(st.one_of(choices))


@st.composite
def _mutated_spec(draw: st.DrawFn) -> dict[str, Any]:
    document = copy.deepcopy(draw(st.sampled_from(BASES)))
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        path, node = draw(st.sampled_from(SPEC_PATHS))
        parent = document
        for part in path[:-1]:
            if not isinstance(parent.get(part), dict):
                parent[part] = {}
            parent = parent[part]
        if draw(st.booleans()) and path[-1] in parent:
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(_value_for(node))
    return document


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_mutated_spec())
def test_pydantic_and_crd_agree_on_generated_specs(document: dict[str, Any]) -> None:
    crd_errors = VALIDATOR.errors(document)
    assert _pydantic_accepts(document) == (not crd_errors), (
        f"pydantic {'accepts' if _pydantic_accepts(document) else 'rejects'}, CRD says {[str(e) for e in crd_errors]}"
    )


@settings(max_examples=300, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
        max_leaves=12,
    )
)
def test_pydantic_raises_only_validation_error_on_arbitrary_input(value: Any) -> None:
    for candidate in (value, {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "spec": value}):
        with contextlib.suppress(ValidationError):
            FineTuneJob.model_validate(candidate)
        problems_of_document(candidate, "generated")  # never raises
