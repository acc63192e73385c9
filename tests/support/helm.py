"""Render and lint the kubetune chart with Helm's own engine (the ``helm-python-sdk`` package, no cluster).

``render(values)`` returns the parsed objects a ``helm install`` would send (templates only; the CRDs in
``crds/`` are returned by :func:`chart_crds`).  ``scenarios()`` lists the value files in ``charts/kubetune/ci``.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import helm_python
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART_DIR = REPO / "charts" / "kubetune"
RELEASE = "kt"
NAMESPACE = "kubetune-system"


def scenarios() -> dict[str, dict[str, Any]]:
    """Scenario name (file stem without ``-values``) → values, for every file in ``charts/kubetune/ci``."""
    found = {}
    for path in sorted((CHART_DIR / "ci").glob("*-values.yaml")):
        found[path.name.removesuffix("-values.yaml")] = yaml.safe_load(path.read_text()) or {}
    return found


def load_chart() -> helm_python.Chart:
    """The chart, loaded from its directory."""
    return helm_python.Chart.load(CHART_DIR)


def render_manifests(values: dict[str, Any], *, name: str = RELEASE, namespace: str = NAMESPACE) -> dict[str, str]:
    """Template path → rendered text (Helm validates ``values`` against values.schema.json first)."""
    return dict(_render_cached(json.dumps(values, sort_keys=True), name, namespace))


@functools.lru_cache(maxsize=64)
def _render_cached(values_json: str, name: str, namespace: str) -> tuple[tuple[str, str], ...]:
    # Rendering is pure; the cache keeps the many tests over the same scenarios fast on a busy machine.
    return tuple(sorted(load_chart().render(json.loads(values_json), name=name, namespace=namespace).items()))


def render(values: dict[str, Any], *, name: str = RELEASE, namespace: str = NAMESPACE) -> list[dict[str, Any]]:
    """Every Kubernetes object the chart renders for ``values`` (NOTES.txt and empty documents left out)."""
    objects: list[dict[str, Any]] = []
    for path, text in sorted(render_manifests(values, name=name, namespace=namespace).items()):
        if path.endswith("NOTES.txt"):
            continue
        for document in yaml.safe_load_all(text):
            if document:
                objects.append(document)
    return objects


def notes(values: dict[str, Any]) -> str:
    """The rendered NOTES.txt."""
    manifests = render_manifests(values)
    return next(text for path, text in manifests.items() if path.endswith("NOTES.txt"))


def chart_crds() -> list[dict[str, Any]]:
    """The CRDs shipped in the chart's ``crds/`` directory."""
    crds: list[dict[str, Any]] = []
    for path in sorted((CHART_DIR / "crds").glob("*.yaml")):
        crds.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
    return crds


def lint(values: dict[str, Any] | None = None) -> dict[str, Any]:
    """``helm lint --strict`` report for the chart with ``values``."""
    return helm_python.lint(CHART_DIR, values, strict=True, namespace=NAMESPACE)


def find(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    """Objects of ``kind`` (and ``name`` when given)."""
    return [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    """The single object of ``kind``; AssertionError when there are none or several."""
    matches = find(objects, kind)
    assert len(matches) == 1, f"expected one {kind}, found {len(matches)}"
    return matches[0]
