"""``kubetune validate``: check FineTuneJob manifests against the API models.

Reads YAML files (several documents each), validates every FineTuneJob with the
pydantic models and reports one line per problem naming the file, the field
path and what was expected, e.g.
``job.yaml: spec.strategy.lora.r: must be >= 1, got 0``.
Documents of other kinds are reported, not crashed on.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from kubetune_trainer.spec import API_VERSION, KIND, FineTuneJob


@dataclass(frozen=True)
class Problem:
    """One reason a manifest is not a valid FineTuneJob."""

    source: str  # file name, with "#N" for the N-th document of a multi-document file
    path: str  # dotted field path, "" for the document itself
    message: str

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path else ""
        return f"{self.source}: {where}{self.message}"


# pydantic inserts the names of union members and validators into error
# locations ("int", "constrained-str", "function-after[...]", "[key]"); they are
# not field names, so they are dropped from the paths users see.
_LOC_TAG = re.compile(r"^(\[key\]|int|str|float|bool|[a-z-]+\[.*\]|constrained-\w+|lax-\w+|strict-\w+)$")


def format_location(loc: Iterable[int | str]) -> str:
    """``('spec', 'resources', 'tolerations', 0, 'key')`` → ``spec.resources.tolerations[0].key``."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif _LOC_TAG.match(part):
            continue
        else:
            path += ("." if path else "") + part
    return path


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def describe_error(error: ErrorDetails) -> tuple[str, str]:
    """The field path and a short human message for one pydantic error."""
    kind = error["type"]
    ctx: dict[str, Any] = dict(error.get("ctx") or {})
    got = error.get("input")
    path = format_location(error["loc"])
    if kind == "cross_field":
        return str(ctx["path"]), str(ctx["message"])
    messages = {
        "missing": "is required",
        "extra_forbidden": "is not a known field",
        "greater_than_equal": f"must be >= {ctx.get('ge')}, got {_shown(got)}",
        "greater_than": f"must be > {ctx.get('gt')}, got {_shown(got)}",
        "less_than_equal": f"must be <= {ctx.get('le')}, got {_shown(got)}",
        "less_than": f"must be < {ctx.get('lt')}, got {_shown(got)}",
        "string_pattern_mismatch": f"must match {ctx.get('pattern')}, got {_shown(got)}",
        "string_too_long": f"must be at most {ctx.get('max_length')} characters",
        "string_too_short": f"must be at least {ctx.get('min_length')} characters",
        "too_short": f"must have at least {ctx.get('min_length')} items",
        "too_long": f"must have at most {ctx.get('max_length')} items",
        "enum": f"must be one of {ctx.get('expected')}, got {_shown(got)}",
        "literal_error": f"must be one of {ctx.get('expected')}, got {_shown(got)}",
        "int_type": f"must be an integer, got {_shown(got)}",
        "float_type": f"must be a number, got {_shown(got)}",
        "bool_type": f"must be true or false, got {_shown(got)}",
        "string_type": f"must be a string, got {_shown(got)}",
        "list_type": f"must be a list, got {_shown(got)}",
        "dict_type": f"must be a mapping, got {_shown(got)}",
        "model_type": f"must be a mapping, got {_shown(got)}",
        "model_attributes_type": f"must be a mapping, got {_shown(got)}",
    }
    return path, messages.get(kind, f"{error['msg']}, got {_shown(got)}")


def problems_of_document(document: Any, source: str) -> list[Problem]:
    """Validate one parsed YAML document; an empty list means it is a valid FineTuneJob."""
    if not isinstance(document, dict):
        return [Problem(source, "", f"expected a FineTuneJob mapping, got {type(document).__name__}")]
    kind, api_version = document.get("kind"), document.get("apiVersion")
    if kind != KIND or api_version != API_VERSION:
        return [
            Problem(
                source,
                "",
                f"not a FineTuneJob: apiVersion {api_version!r}, kind {kind!r} (expected {API_VERSION}, {KIND})",
            )
        ]
    try:
        FineTuneJob.model_validate(document)
    except ValidationError as err:
        seen: list[Problem] = []
        for error in err.errors():
            path, message = describe_error(error)
            problem = Problem(source, path, message)
            if problem not in seen:
                seen.append(problem)
        return seen
    return []


def load_documents(path: Path) -> Iterator[tuple[str, Any]]:
    """``(source, document)`` for each non-empty YAML document of a file."""
    text = path.read_text(encoding="utf-8")
    documents = [d for d in yaml.safe_load_all(text) if d is not None]
    for index, document in enumerate(documents):
        source = str(path) if len(documents) == 1 else f"{path}#{index + 1}"
        yield source, document


def validate_files(paths: Iterable[Path]) -> list[Problem]:
    """Every problem in every FineTuneJob of the given files."""
    problems: list[Problem] = []
    for path in paths:
        try:
            documents = list(load_documents(path))
        except FileNotFoundError:
            problems.append(Problem(str(path), "", "file not found"))
            continue
        except OSError as err:  # a directory, no permission, ...
            problems.append(Problem(str(path), "", f"cannot read it: {err.strerror or err}"))
            continue
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            problems.append(Problem(str(path), "", f"not valid YAML: {err}".replace("\n", " ")))
            continue
        if not documents:
            problems.append(Problem(str(path), "", "no YAML documents found"))
        for source, document in documents:
            problems.extend(problems_of_document(document, source))
    return problems
