"""A minimal Kubernetes API server for running the real ``kubectl`` against, offline.

``kubectl apply --dry-run=client`` needs an API server even though it changes
nothing: it discovers the resource (``/api``, ``/apis``, ``/apis/<group>/<version>``),
GETs the live object (a 404 means "would be created") and, unless told
``--validate=false``, validates every manifest against the server's OpenAPI schema.
This module serves exactly that, from data that ships with the test dependencies:

* discovery and object storage: :class:`kmock.KubernetesEmulator`, with the
  declared :class:`ApiResource` entries (by default only CustomResourceDefinition);
* the Kubernetes API schemas: the definitions that ``kubernetes-validate``
  bundles (``kubernetes-json-schema/v1.32.0-local/_definitions.json``, JSON Schema
  converted from the upstream OpenAPI, with ``x-kubernetes-group-version-kind``),
  converted back to OpenAPI and served twice:

  - ``/openapi/v3`` (index) and ``/openapi/v3/apis/<group>/<version>`` (JSON).
    kubectl 1.32 reads these first, to decide whether the server does the field
    validation itself: it looks for a ``fieldValidation`` query parameter on the
    PATCH operation of the object's kind.  Our PATCH operations have none, as an
    API server before 1.25 would, so kubectl falls back to its client-side schema
    validation with ``--validate=strict`` (the default ``--validate=true`` means
    strict too).  Were the parameter advertised (``field_validation=True``, as
    every real API server since 1.25 does), kubectl would leave validation to the
    server, and a client dry-run sends nothing, so nothing would be checked.
  - ``/openapi/v2`` as protobuf.  kubectl 1.32's client-side validator
    (``k8s.io/kube-openapi/pkg/util/proto``) reads only this document, and only
    as protobuf: :func:`encode_openapi_v2` writes the gnostic ``openapi.v2.Document``
    message by hand, since the ``protobuf`` package is not a test dependency.
    kubectl asks for ``application/com.github.proto-openapi.spec.v2@v1.0+protobuf``
    but Go's MIME parser rejects that ``@`` in a response, so the response says
    ``...spec.v2.v1.0+protobuf``.

The validator rejects unknown fields, missing required fields and wrong primitive
types; it does not evaluate patterns, enums, formats or CEL.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import struct
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kmock
import kubernetes_validate

Schema = dict[str, Any]

KUBERNETES_VERSION = "v1.32.0"
OPENAPI_V2_PROTOBUF = "application/com.github.proto-openapi.spec.v2.v1.0+protobuf"


@dataclass(frozen=True)
class ApiResource:
    """One resource served by the fake API server (discovery + OpenAPI paths)."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool

    @property
    def api_prefix(self) -> str:
        """``api/v1`` for the core group, ``apis/<group>/<version>`` otherwise (no leading slash)."""
        return f"apis/{self.group}/{self.version}" if self.group else f"api/{self.version}"

    @property
    def object_path(self) -> str:
        namespace = "namespaces/{namespace}/" if self.namespaced else ""
        return f"/{self.api_prefix}/{namespace}{self.plural}/{{name}}"

    @property
    def gvk(self) -> dict[str, str]:
        return {"group": self.group, "version": self.version, "kind": self.kind}


CUSTOM_RESOURCE_DEFINITIONS = ApiResource(
    group="apiextensions.k8s.io",
    version="v1",
    plural="customresourcedefinitions",
    kind="CustomResourceDefinition",
    namespaced=False,
)

VERBS = frozenset({"create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"})


# ---------------------------------------------------------------------------------------------------------------------
# Definitions: JSON Schema (as bundled by kubernetes-validate) -> OpenAPI (as served by the API server).


@functools.cache
def kubernetes_definitions(version: str = KUBERNETES_VERSION) -> dict[str, Schema]:
    """The Kubernetes API definitions bundled with ``kubernetes-validate``, by model name."""
    path = (
        Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema" / f"{version}-local" / "_definitions.json"
    )
    return dict(json.loads(path.read_text())["$defs"])


def _openapi_type(types: str | list[str], where: str) -> str | None:
    """``["string", "null"]`` -> ``"string"``: the API server's OpenAPI has one type per schema."""
    names = [types] if isinstance(types, str) else [name for name in types if name != "null"]
    if len(names) > 1:
        raise ValueError(f"{where}: more than one type: {types!r}")
    return names[0] if names else None


def to_openapi(schema: Schema, ref_prefix: str, where: str = "") -> Schema:
    """Convert one JSON Schema from ``kubernetes-validate`` to the API server's OpenAPI form.

    ``$ref`` targets move from ``#/$defs/`` to ``ref_prefix`` (``#/definitions/`` for v2,
    ``#/components/schemas/`` for v3); nullable type lists become single types; and the
    two ``oneOf`` primitives become what Kubernetes publishes: IntOrString is
    ``{"type": "string", "format": "int-or-string"}``, Quantity ``{"type": "string"}``.
    """
    out: Schema = {}
    for key, value in schema.items():
        if key == "$ref":
            out[key] = value.replace("#/$defs/", ref_prefix)
        elif key == "type":
            single = _openapi_type(value, where)
            if single is not None:
                out[key] = single
        elif key == "properties":
            out[key] = {name: to_openapi(sub, ref_prefix, f"{where}.{name}") for name, sub in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = to_openapi(value, ref_prefix, f"{where}[]")
        elif key in ("oneOf", "anyOf"):
            types = {_openapi_type(alt.get("type", []), where) for alt in value}
            if not types <= {"string", "integer", "number"} or "string" not in types or any(len(a) > 1 for a in value):
                raise ValueError(f"{where}: unsupported {key}: {value!r}")
            out["type"] = "string"
            if "integer" in types:
                out["format"] = "int-or-string"
        else:
            out[key] = copy.deepcopy(value)
    return out


def group_version_kinds(definition: Schema) -> list[dict[str, str]]:
    return list(definition.get("x-kubernetes-group-version-kind", []))


def _patch_operation(resource: ApiResource, field_validation: bool) -> Schema:
    """A PATCH operation like the API server's; ``fieldValidation`` only if asked for."""
    names = ["dryRun", "fieldManager", *(["fieldValidation"] if field_validation else [])]
    parameters = [{"name": name, "in": "query", "type": "string", "uniqueItems": True} for name in names]
    return {
        "operationId": f"patch{resource.kind}",
        "parameters": parameters,
        "x-kubernetes-action": "patch",
        "x-kubernetes-group-version-kind": resource.gvk,
    }


@functools.cache
def openapi_v2_document(
    resources: tuple[ApiResource, ...], version: str = KUBERNETES_VERSION, field_validation: bool = False
) -> Schema:
    """The Swagger 2.0 document of ``/openapi/v2``: all definitions, PATCH paths of ``resources``."""
    definitions = kubernetes_definitions(version)
    return {
        "swagger": "2.0",
        "info": {"title": "Kubernetes", "version": version},
        "paths": {
            resource.object_path: {"patch": _patch_operation(resource, field_validation)} for resource in resources
        },
        "definitions": {name: to_openapi(d, "#/definitions/", name) for name, d in sorted(definitions.items())},
    }


def _v3_operation(resource: ApiResource, field_validation: bool) -> Schema:
    operation = _patch_operation(resource, field_validation)
    operation["parameters"] = [
        {"name": param["name"], "in": "query", "schema": {"type": param["type"], "uniqueItems": True}}
        for param in operation["parameters"]
    ]
    return operation


@functools.cache
def openapi_v3_documents(
    resources: tuple[ApiResource, ...], version: str = KUBERNETES_VERSION, field_validation: bool = False
) -> dict[str, bytes]:
    """``{"apis/<group>/<version>": JSON}`` for the group-versions of the served ``resources``.

    Each document has the PATCH paths of its resources and, for simplicity, all component
    schemas (the real server trims them to those referenced).  Group-versions that serve
    nothing here are left out: kubectl could not discover their kinds anyway.
    """
    schemas = {
        name: to_openapi(d, "#/components/schemas/", name) for name, d in kubernetes_definitions(version).items()
    }
    documents: dict[str, bytes] = {}
    for group_version in sorted({resource.api_prefix for resource in resources}):
        document = {
            "openapi": "3.0.0",
            "info": {"title": "Kubernetes", "version": version},
            "paths": {
                resource.object_path: {"patch": _v3_operation(resource, field_validation)}
                for resource in resources
                if resource.api_prefix == group_version
            },
            "components": {"schemas": schemas},
        }
        documents[group_version] = json.dumps(document, sort_keys=True).encode()
    return documents


def openapi_v3_index(documents: dict[str, bytes]) -> Schema:
    """The ``/openapi/v3`` discovery: each group-version with a content-hashed URL."""
    return {
        "paths": {
            group_version: {
                "serverRelativeURL": f"/openapi/v3/{group_version}?hash={hashlib.sha512(body).hexdigest().upper()}"
            }
            for group_version, body in documents.items()
        }
    }


# ---------------------------------------------------------------------------------------------------------------------
# Protobuf: the subset of gnostic's openapi.v2.Document (OpenAPIv2.proto) that kubectl reads.


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (strings, bytes, sub-messages)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _string(number: int, value: str) -> bytes:
    return _field(number, value.encode())


def _bool(number: int, value: bool) -> bytes:
    return _varint(number << 3) + _varint(int(value))


def _int64(number: int, value: int) -> bytes:
    if value < 0:
        raise ValueError(f"negative int64 field {number}: {value}")
    return _varint(number << 3) + _varint(value)


def _double(number: int, value: float) -> bytes:
    return _varint(number << 3 | 1) + struct.pack("<d", float(value))


def _any(value: Any) -> bytes:
    """``Any{yaml: ...}`` (JSON is YAML), as gnostic stores extensions, defaults and enums."""
    return _string(2, json.dumps(value, sort_keys=True))


def _named(number: int, name: str, value: bytes) -> bytes:
    """``Named*{name: 1, value: 2}``, gnostic's ordered map entries."""
    return _field(number, _string(1, name) + _field(2, value))


def _vendor_extensions(number: int, obj: Schema) -> bytes:
    return b"".join(_named(number, key, _any(value)) for key, value in obj.items() if key.startswith("x-"))


# Schema fields by kind, from OpenAPIv2.proto ``message Schema``.
_SCHEMA_STRINGS = {"$ref": 1, "format": 2, "title": 3, "description": 4, "pattern": 13, "discriminator": 26}
_SCHEMA_DOUBLES = {"multipleOf": 6, "maximum": 7, "minimum": 9}
_SCHEMA_BOOLS = {"exclusiveMaximum": 8, "exclusiveMinimum": 10, "uniqueItems": 16, "readOnly": 27}
_SCHEMA_INT64S = {
    "maxLength": 11,
    "minLength": 12,
    "maxItems": 14,
    "minItems": 15,
    "maxProperties": 17,
    "minProperties": 18,
}


def encode_schema(schema: Schema) -> bytes:
    """``openapi.v2.Schema``; keys that Swagger 2.0 has no field for are an error."""
    out = bytearray()
    for key, value in schema.items():
        if key in _SCHEMA_STRINGS:
            out += _string(_SCHEMA_STRINGS[key], value)
        elif key in _SCHEMA_DOUBLES:
            out += _double(_SCHEMA_DOUBLES[key], value)
        elif key in _SCHEMA_BOOLS:
            out += _bool(_SCHEMA_BOOLS[key], value)
        elif key in _SCHEMA_INT64S:
            out += _int64(_SCHEMA_INT64S[key], value)
        elif key == "default":
            out += _field(5, _any(value))
        elif key == "example":
            out += _field(30, _any(value))
        elif key == "required":
            out += b"".join(_string(19, name) for name in value)
        elif key == "enum":
            out += b"".join(_field(20, _any(item)) for item in value)
        elif key == "additionalProperties":  # AdditionalPropertiesItem{schema: 1 | boolean: 2}
            item = _bool(2, value) if isinstance(value, bool) else _field(1, encode_schema(value))
            out += _field(21, item)
        elif key == "type":  # TypeItem{repeated string value: 1}
            out += _field(22, _string(1, value))
        elif key == "items":  # ItemsItem{repeated Schema schema: 1}
            out += _field(23, _field(1, encode_schema(value)))
        elif key == "allOf":
            out += b"".join(_field(24, encode_schema(sub)) for sub in value)
        elif key == "properties":  # Properties{repeated NamedSchema additional_properties: 1}
            out += _field(25, b"".join(_named(1, name, encode_schema(sub)) for name, sub in value.items()))
        elif key.startswith("x-"):
            out += _named(31, key, _any(value))
        else:
            raise ValueError(f"no Swagger 2.0 schema field for {key!r}")
    return bytes(out)


def _encode_parameter(parameter: Schema) -> bytes:
    """``ParametersItem{parameter: Parameter{non_body_parameter: NonBodyParameter{query_parameter_sub_schema}}}``."""
    if parameter["in"] != "query":
        raise ValueError(f"only query parameters are supported: {parameter!r}")
    query = _string(2, "query") + _string(4, parameter["name"]) + _string(6, parameter["type"])
    if parameter.get("uniqueItems"):
        query += _bool(20, True)
    return _field(1, _field(2, _field(3, query)))


def _encode_operation(operation: Schema) -> bytes:
    out = _string(5, operation["operationId"])
    out += b"".join(_field(8, _encode_parameter(parameter)) for parameter in operation.get("parameters", []))
    return out + _vendor_extensions(13, operation)


_PATH_ITEM_OPERATIONS = {"get": 2, "put": 3, "post": 4, "delete": 5, "options": 6, "head": 7, "patch": 8}


def encode_openapi_v2(document: Schema) -> bytes:
    """``openapi.v2.Document`` (swagger, info, paths, definitions) as protobuf bytes."""
    info = _string(1, document["info"]["title"]) + _string(2, document["info"]["version"])
    paths = b"".join(
        _named(
            2,
            path,
            b"".join(_field(_PATH_ITEM_OPERATIONS[verb], _encode_operation(op)) for verb, op in item.items()),
        )
        for path, item in document["paths"].items()
    )
    definitions = b"".join(_named(1, name, encode_schema(schema)) for name, schema in document["definitions"].items())
    return _string(1, document["swagger"]) + _field(2, info) + _field(8, paths) + _field(9, definitions)


# ---------------------------------------------------------------------------------------------------------------------
# The server.


def _server_version(version: str) -> Schema:
    major, minor, _ = version.lstrip("v").split(".")
    return {
        "major": major,
        "minor": minor,
        "gitVersion": version,
        "gitCommit": "0" * 40,
        "gitTreeState": "clean",
        "buildDate": "2025-01-01T00:00:00Z",
        "goVersion": "go1.23.0",
        "compiler": "gc",
        "platform": "linux/amd64",
    }


def missing_models(resources: Iterable[ApiResource], version: str = KUBERNETES_VERSION) -> list[ApiResource]:
    """The resources whose kind has no model in the definitions.

    kubectl skips schema validation, silently, for a kind it finds no model for,
    so the server refuses to serve such resources rather than let a test pass vacuously.
    """
    known = {
        (gvk["group"], gvk["version"], gvk["kind"])
        for definition in kubernetes_definitions(version).values()
        for gvk in group_version_kinds(definition)
    }
    return [resource for resource in resources if (resource.group, resource.version, resource.kind) not in known]


@contextlib.asynccontextmanager
async def kubectl_api_server(
    resources: Iterable[ApiResource] = (CUSTOM_RESOURCE_DEFINITIONS,),
    version: str = KUBERNETES_VERSION,
    field_validation: bool = False,
) -> AsyncIterator[kmock.KubernetesEmulator]:
    """Run the fake API server on 127.0.0.1 (random port) in the current event loop.

    Yields the emulator: ``str(emulator.url)`` is the address for ``kubectl --server``,
    and iterating it (or a view such as ``emulator["get /openapi/v2"]``) gives the requests
    kubectl made.  ``field_validation=True`` advertises server-side field validation, as a
    real API server since 1.25 does, which makes kubectl skip its own schema validation.
    """
    served = tuple(resources)
    if missing := missing_models(served, version):
        raise ValueError(f"no OpenAPI model for {missing}: kubectl would skip validating them")
    v2 = encode_openapi_v2(openapi_v2_document(served, version, field_validation))
    v3 = openapi_v3_documents(served, version, field_validation)

    async with kmock.KubernetesEmulator() as emulator, kmock.Server(emulator):
        for resource in served:
            emulator.resources[kmock.resource(resource.group, resource.version, resource.plural)] = kmock.ResourceInfo(
                kind=resource.kind, namespaced=resource.namespaced, verbs=set(VERBS)
            )
        # kubectl here is Google Cloud SDK's dispatcher, which picks the kubectl build matching
        # the server's minor version (it asks /version first); 1.32 is what it ships as default.
        emulator["get /version"] << _server_version(version)
        emulator["get /openapi/v2"] << kmock.headers({"Content-Type": OPENAPI_V2_PROTOBUF}) << v2
        emulator["get /openapi/v3"] << openapi_v3_index(v3)
        for group_version, body in v3.items():
            emulator[f"get /openapi/v3/{group_version}"] << kmock.headers({"Content-Type": "application/json"}) << body
        yield emulator
