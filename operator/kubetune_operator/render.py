"""``kubetune render FILE``: the objects the operator would create, as multi-document YAML."""

from __future__ import annotations

from typing import Any

import yaml

from kubetune_operator.builders import desired_children
from kubetune_operator.resolve import load_job
from kubetune_operator.settings import OperatorSettings


class _Dumper(yaml.SafeDumper):
    """Writes multi-line strings (the trainer config) as literal blocks, for review."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def render_manifests(docs: list[dict[str, Any]], settings: OperatorSettings) -> str:
    """Multi-document YAML of attempt 1's ConfigMap, Service and Job for every FineTuneJob
    in ``docs`` (exactly what the operator creates; owner references appear once the
    object has a uid)."""
    objects: list[dict[str, Any]] = []
    for doc in docs:
        objects.extend(desired_children(load_job(doc, settings), attempt=1))
    return yaml.dump_all(objects, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120)
