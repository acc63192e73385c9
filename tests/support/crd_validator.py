"""Validate objects against a CRD the way the Kubernetes API server would, offline.

Steps, in the API server's order: apply structural defaults; reject unknown
fields (kubectl's strict field validation); check the OpenAPI v3 schema
(jsonschema, draft 4 semantics as Kubernetes uses them, plus
``x-kubernetes-list-type: set`` uniqueness and int-or-string); then evaluate every
``x-kubernetes-validations`` CEL rule with cel-python, with values typed by the
schema (``number`` fields are doubles in Kubernetes CEL).  Transition rules
(``oldSelf``) run only when an old object is given.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import celpy
import jsonschema

Schema = dict[str, Any]


@dataclass(frozen=True)
class CrdError:
    """One rejection: the dotted field path and the message."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


def apply_defaults(schema: Schema, value: Any) -> Any:
    """Structural defaulting: drop nulls of non-nullable fields, then fill absent
    properties that have a default, top-down (as the API server does)."""
    if isinstance(value, dict) and "properties" in schema:
        for key in [k for k, v in value.items() if v is None and not schema["properties"].get(k, {}).get("nullable")]:
            del value[key]
        for key, sub in schema["properties"].items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                value[key] = apply_defaults(sub, value[key])
    elif isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        for key in value:
            value[key] = apply_defaults(schema["additionalProperties"], value[key])
    elif isinstance(value, list) and "items" in schema:
        return [apply_defaults(schema["items"], item) for item in value]
    return value


def _end_of_text(pattern: str) -> str:
    """Go's RE2 (the API server) reads a final ``$`` as end of text; Python's ``re`` also
    lets it match before a trailing newline, so use ``\\Z`` to get RE2's meaning."""
    return pattern[:-1] + r"\Z" if pattern.endswith("$") and not pattern.endswith(r"\$") else pattern


def _strict(schema: Schema) -> Schema:
    """A jsonschema-checkable copy: unknown fields rejected, Kubernetes extensions mapped."""
    node = copy.deepcopy(schema)
    if "pattern" in node:
        node["pattern"] = _end_of_text(node["pattern"])
    node.pop("x-kubernetes-validations", None)
    node.pop("default", None)
    if node.get("x-kubernetes-int-or-string"):
        node.pop("anyOf", None)
        node["type"] = ["integer", "string"]
    if node.get("x-kubernetes-list-type") == "set":
        node["uniqueItems"] = True
    if "properties" in node:
        node["properties"] = {k: _strict(v) for k, v in node["properties"].items()}
        if not node.get("x-kubernetes-preserve-unknown-fields"):
            node["additionalProperties"] = False
    if isinstance(node.get("additionalProperties"), dict):
        node["additionalProperties"] = _strict(node["additionalProperties"])
    if "items" in node:
        node["items"] = _strict(node["items"])
    return node


def _path(parts: Any) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else ("." if text else "") + str(part)
    return text


def _typed(schema: Schema, value: Any) -> Any:
    """Convert JSON values to what Kubernetes CEL sees: ``number`` fields as doubles."""
    if isinstance(value, dict):
        if "properties" in schema:
            return {k: _typed(schema["properties"].get(k, {}), v) for k, v in value.items()}
        sub = schema.get("additionalProperties")
        return {k: _typed(sub if isinstance(sub, dict) else {}, v) for k, v in value.items()}
    if isinstance(value, list):
        return [_typed(schema.get("items", {}), v) for v in value]
    if schema.get("type") == "number" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


class CrdValidator:
    """Offline API-server validation for one CRD version's openAPIV3Schema."""

    def __init__(self, schema: Schema) -> None:
        self.schema = schema
        self._checker = jsonschema.Draft4Validator(_strict(schema))
        self._env = celpy.Environment()
        self._programs: dict[str, Any] = {}

    def _program(self, rule: str) -> Any:
        if rule not in self._programs:
            # cel-python evaluates matches() with RE2, as the API server does.
            self._programs[rule] = self._env.program(self._env.compile(rule))
        return self._programs[rule]

    def defaulted(self, obj: dict[str, Any]) -> dict[str, Any]:
        """The object after the API server's defaulting."""
        return apply_defaults(self.schema, copy.deepcopy(obj))

    def schema_errors(self, obj: dict[str, Any]) -> list[CrdError]:
        """OpenAPI schema violations (after defaulting)."""
        errors = []
        for err in self._checker.iter_errors(self.defaulted(obj)):
            path = _path(err.absolute_path)
            if err.validator == "required":
                missing = err.message.split("'")[1]
                path = f"{path}.{missing}" if path else missing
            elif err.validator == "additionalProperties":
                extra = err.message.split("'")[1] if "'" in err.message else ""
                path = f"{path}.{extra}" if path else extra
            errors.append(CrdError(path, err.message))
        return errors

    def cel_errors(self, obj: dict[str, Any], old: dict[str, Any] | None = None) -> list[CrdError]:
        """CEL rule violations (after defaulting; transition rules only with ``old``)."""
        errors: list[CrdError] = []
        new_obj = self.defaulted(obj)
        old_obj = self.defaulted(old) if old is not None else None
        self._walk(self.schema, new_obj, old_obj, [], errors)
        return errors

    def errors(self, obj: dict[str, Any], old: dict[str, Any] | None = None) -> list[CrdError]:
        """Everything the API server would reject; CEL runs only on schema-valid objects (as it does)."""
        found = self.schema_errors(obj)
        return found or self.cel_errors(obj, old)

    def _walk(self, schema: Schema, value: Any, old: Any, path: list[Any], errors: list[CrdError]) -> None:
        for rule in schema.get("x-kubernetes-validations", []):
            uses_old = "oldSelf" in rule["rule"]
            if uses_old and old is None:
                continue
            activation = {"self": celpy.json_to_cel(_typed(schema, value))}
            if uses_old:
                activation["oldSelf"] = celpy.json_to_cel(_typed(schema, old))
            try:
                ok = bool(self._program(rule["rule"]).evaluate(activation))
            except celpy.CELEvalError as err:
                ok = False
                rule = {**rule, "message": f"{rule.get('message', '')} (CEL error: {err.args[0]})"}
            if not ok:
                field = rule.get("fieldPath", "").lstrip(".")
                full = _path([*path, *([field] if field else [])])
                errors.append(CrdError(full, rule.get("message", rule["rule"])))
        if isinstance(value, dict) and "properties" in schema:
            for key, sub in schema["properties"].items():
                if key in value:
                    sub_old = old.get(key) if isinstance(old, dict) else None
                    self._walk(sub, value[key], sub_old, [*path, key], errors)
        elif isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
            for key, item in value.items():
                self._walk(schema["additionalProperties"], item, None, [*path, key], errors)
        elif isinstance(value, list) and "items" in schema:
            for index, item in enumerate(value):
                self._walk(schema["items"], item, None, [*path, index], errors)
