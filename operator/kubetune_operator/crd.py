"""Generate the FineTuneJob CustomResourceDefinition from the pydantic models.

The models in :mod:`kubetune_trainer.spec` are the single source of truth.  This
module turns their JSON schema into a Kubernetes *structural* OpenAPI v3 schema:
``$ref`` inlined, ``null`` branches of optional fields dropped, draft-2020
keywords rewritten to the OpenAPI v3 (draft 4) forms Kubernetes accepts, map-key
constraints turned into CEL, defaults for nested objects (``{}``) so that the
API server applies field defaults, and every model's cross-field :class:`Rule`
emitted as ``x-kubernetes-validations``.

``python -m kubetune_operator.crd [OUT]`` writes ``crds/kubetune.io_finetunejobs.yaml``.
"""

from __future__ import annotations

import copy
import difflib
import sys
from pathlib import Path
from typing import Any

import yaml

from kubetune_operator import names
from kubetune_trainer.spec import API_VERSION, GROUP, KIND, NAME_PATTERN, PLURAL, VERSION, FineTuneJob, KubeModel
from kubetune_trainer.spec._base import Rule
from kubetune_trainer.spec.plugins import load_plugins
from kubetune_trainer.spec.strategy import strategy_definitions

CRD_FILE_NAME = f"{GROUP}_{PLURAL}.yaml"
SHORT_NAMES = ["ftj"]
CATEGORIES = ["kubetune"]

JsonSchema = dict[str, Any]

# Keywords that Kubernetes rejects or ignores in CRD schemas.
_DROPPED_KEYWORDS = ("title", "$defs", "propertyNames", "patternProperties", "const")


def _model_classes() -> dict[str, type[KubeModel]]:
    """Every model reachable from FineTuneJob, by the name pydantic gives its schema."""
    found: dict[str, type[KubeModel]] = {}

    def visit(annotation: Any) -> None:
        if isinstance(annotation, type) and issubclass(annotation, KubeModel):
            if annotation.__name__ in found:
                return
            found[annotation.__name__] = annotation
            for field in annotation.model_fields.values():
                visit(field.annotation)
        for arg in getattr(annotation, "__args__", ()) or ():
            visit(arg)
        origin_meta = getattr(annotation, "__metadata__", None)
        if origin_meta is not None:
            visit(getattr(annotation, "__origin__", None))

    visit(FineTuneJob)
    for definition in strategy_definitions():  # settings blocks come from the registry, not from fields
        visit(definition.settings)
    return found


def _cel_string(value: str) -> str:
    """A CEL raw string literal for a regular expression."""
    if "'" not in value:
        return "r'" + value + "'"
    return 'r"' + value + '"'


def _convert(node: JsonSchema, defs: dict[str, JsonSchema], rules_by_name: dict[str, tuple[Rule, ...]]) -> JsonSchema:
    """Convert one pydantic JSON-schema node (recursively) into a structural CRD schema node."""
    node = copy.deepcopy(node)
    ref_rules: tuple[Rule, ...] = ()

    if "$ref" in node:
        name = node.pop("$ref").rsplit("/", 1)[-1]
        target = copy.deepcopy(defs[name])
        ref_rules = rules_by_name.get(name, ())
        # The field's own description wins over the model's docstring.
        if "description" in node:
            target["description"] = node.pop("description")
        target.update({k: v for k, v in node.items() if k not in ("description",)})
        node = target

    if "anyOf" in node:
        branches = [b for b in node["anyOf"] if b.get("type") != "null"]
        rest = {k: v for k, v in node.items() if k != "anyOf"}
        if rest.get("default", 0) is None:
            rest.pop("default")
        if len(branches) == 1:
            merged = _convert(branches[0], defs, rules_by_name)
            if ("description" in rest and "description" not in merged) or "description" in rest:
                merged["description"] = rest["description"]
            for key, value in rest.items():
                if key != "description" and key not in _DROPPED_KEYWORDS:
                    merged[key] = value
            # The branch is converted already: converting it again would give optional models inside
            # optional models a `default: {}` (their `default: null` was dropped above).
            return merged
        types = sorted(b.get("type", "") for b in branches)
        if types != ["integer", "string"]:
            raise ValueError(f"unsupported union in CRD schema: {branches}")
        # int-or-string (Kubernetes quantities): value validations move to the node.
        node = dict(rest)
        node["x-kubernetes-int-or-string"] = True
        node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        for branch in branches:
            for key in ("minimum", "pattern", "maxLength"):
                if key in branch:
                    node[key] = branch[key]

    if "const" in node:
        node["enum"] = [node["const"]]
        node.setdefault("type", "string")

    for bound in ("Minimum", "Maximum"):
        exclusive = "exclusive" + bound
        if exclusive in node and not isinstance(node[exclusive], bool):
            node[bound.lower()] = node[exclusive]
            node[exclusive] = True

    rules: list[dict[str, str]] = [r.crd_entry() for r in ref_rules if r.cel is not None]

    if node.get("type") == "object":
        props = node.get("properties")
        if props is not None:
            node["properties"] = {key: _convert(value, defs, rules_by_name) for key, value in props.items()}
            node.pop("additionalProperties", None)
            # A nested model with a default factory (pydantic states no default)
            # gets `default: {}` so the API server fills in its fields' defaults;
            # optional models (`default: None`) stay absent.
            required = set(node.get("required", []))
            for key, value in node["properties"].items():
                if key not in required and "default" not in props[key] and "properties" in value:
                    value["default"] = {}
        elif node.get("x-kubernetes-preserve-unknown-fields"):
            node.pop("additionalProperties", None)
        else:
            value_schemas = list(node.get("patternProperties", {}).values())
            key_patterns = list(node.get("patternProperties", {}).keys())
            if value_schemas:
                node["additionalProperties"] = _convert(value_schemas[0], defs, rules_by_name)
            elif isinstance(node.get("additionalProperties"), dict):
                node["additionalProperties"] = _convert(node["additionalProperties"], defs, rules_by_name)
            key_max = node.get("propertyNames", {}).get("maxLength")
            key_checks = [f"k.matches({_cel_string(p)})" for p in key_patterns]
            if key_max is not None:
                key_checks.append(f"size(k) <= {key_max}")
            if key_checks:
                rules.append(
                    {
                        "rule": "self.all(k, " + " && ".join(key_checks) + ")",
                        "message": "keys must match "
                        + (key_patterns[0] if key_patterns else "the allowed form")
                        + (f" and be at most {key_max} characters" if key_max is not None else ""),
                    }
                )
    elif node.get("type") == "array" and "items" in node:
        node["items"] = _convert(node["items"], defs, rules_by_name)

    for key in _DROPPED_KEYWORDS:
        node.pop(key, None)
    if rules:
        node["x-kubernetes-validations"] = rules
    return node


def openapi_schema() -> JsonSchema:
    """The structural openAPIV3Schema of the FineTuneJob CRD."""
    raw = FineTuneJob.model_json_schema(by_alias=True, mode="validation")
    defs = raw.get("$defs", {})
    classes = _model_classes()
    rules_by_name = {name: cls.rules() for name, cls in classes.items() if cls.rules()}
    schema = _convert({k: v for k, v in raw.items() if k != "$defs"}, defs, rules_by_name)

    # Kubernetes owns metadata: only name restrictions may be stated, and only via CEL.
    schema["properties"]["metadata"] = {"type": "object", "description": "Standard object metadata."}
    schema["properties"]["apiVersion"] = {"type": "string", "description": API_VERSION}
    schema["properties"]["kind"] = {"type": "string", "description": "FineTuneJob"}
    schema["required"] = ["spec"]
    schema.setdefault("x-kubernetes-validations", []).append(
        {
            "rule": f"self.metadata.name.matches({_cel_string(NAME_PATTERN)})",
            "message": "metadata.name must be a lower-case DNS label of at most 40 characters "
            "(child objects append -a<attempt>-<index>)",
            "reason": "FieldValueInvalid",
        }
    )
    # Status is written by the operator; keep it from being pruned even if the
    # operator is newer than the installed CRD.
    schema["properties"]["status"]["x-kubernetes-preserve-unknown-fields"] = True
    schema["properties"]["status"].pop("default", None)
    return schema


def printer_columns() -> list[dict[str, Any]]:
    """Columns shown by ``kubectl get ftj`` (priority 1: with ``-o wide``)."""
    return [
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {"name": "Strategy", "type": "string", "jsonPath": ".spec.strategy.type"},
        {"name": "Nodes", "type": "integer", "jsonPath": ".spec.resources.nodes"},
        {"name": "Step", "type": "integer", "jsonPath": ".status.progress.step"},
        {"name": "Total", "type": "integer", "jsonPath": ".status.progress.totalSteps"},
        {"name": "Loss", "type": "number", "jsonPath": ".status.progress.loss"},
        {"name": "Restarts", "type": "integer", "jsonPath": ".status.restarts", "priority": 1},
        {"name": "Preemptions", "type": "integer", "jsonPath": ".status.preemptions", "priority": 1},
        # An absolute time in the future: kubectl's date type would print it as an (invalid) age.
        {"name": "ETA", "type": "string", "jsonPath": ".status.progress.eta", "priority": 1},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]


def custom_resource_definition() -> JsonSchema:
    """The whole CustomResourceDefinition object."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{PLURAL}.{GROUP}",
            "labels": {names.LABEL_NAME: names.APP_NAME, names.LABEL_PART_OF: names.APP_NAME},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": KIND.lower(),
                "shortNames": SHORT_NAMES,
                "categories": CATEGORIES,
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": printer_columns(),
                    "schema": {"openAPIV3Schema": openapi_schema()},
                }
            ],
        },
    }


def render_crd_yaml() -> str:
    """The CRD as the YAML text committed under ``crds/``."""
    header = "# Generated from kubetune_trainer.spec by `make crds`; do not edit.\n"
    return header + yaml.safe_dump(custom_resource_definition(), sort_keys=False, width=120)


def main(argv: list[str] | None = None) -> int:
    """Write the CRD YAML into a directory (default ``crds``); with ``--check``
    only compare and report a stale file (exit 1), for ``make verify``."""
    args = list(sys.argv[1:] if argv is None else argv)
    check = "--check" in args
    args = [a for a in args if a != "--check"]
    target = (Path(args[0]) if args else Path("crds")) / CRD_FILE_NAME
    load_plugins()  # a platform's own strategies belong in its CRD
    fresh = render_crd_yaml()
    if check:
        current = target.read_text() if target.exists() else ""
        if current != fresh:
            diff = difflib.unified_diff(
                current.splitlines(keepends=True), fresh.splitlines(keepends=True), str(target), "generated"
            )
            sys.stdout.writelines(list(diff)[:60])
            print(f"{target} is stale: run `make crds`", file=sys.stderr)
            return 1
        return 0
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
