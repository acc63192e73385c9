"""The Grafana dashboard model kubetune writes its dashboards in, and its JSON rendering (schemaVersion 39).

:mod:`kubetune_operator.monitoring.dashboards` states the dashboards with these classes; :func:`to_json`
lays their panels out on Grafana's 24-column grid.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from kubetune_trainer.spec.catalog import JOB_NAME_LABEL, OPERATOR_SCRAPE_JOB

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
#: Grafana's own interval variable; tests substitute it with a duration.
RATE = "$__rate_interval"
#: The label selector every Training panel uses (template variables namespace and job).
JOB_SELECTOR = f'namespace="$namespace", {JOB_NAME_LABEL}="$job"'
PanelKind = Literal["timeseries", "stat", "table"]


@dataclass(frozen=True)
class Query:
    """One PromQL target of a panel."""

    expr: str
    legend: str = ""


@dataclass(frozen=True)
class Panel:
    """A panel: its queries, display kind, unit and width in grid columns (24 per row)."""

    title: str
    description: str
    queries: tuple[Query, ...]
    kind: PanelKind = "timeseries"
    unit: str = "short"
    width: int = 12
    height: int = 8


@dataclass(frozen=True)
class Row:
    """A titled group of panels laid out left to right."""

    title: str
    panels: tuple[Panel, ...]


@dataclass(frozen=True)
class Dashboard:
    """A whole dashboard: identity, template variables and rows."""

    uid: str
    title: str
    description: str
    rows: tuple[Row, ...]
    variables: tuple[dict[str, Any], ...] = field(default_factory=tuple)


def quantiles(metric: str, selector: str, by: str = "", qs: tuple[float, ...] = (0.5, 0.95)) -> tuple[Query, ...]:
    """histogram_quantile targets for one histogram, one query per quantile."""
    group = f"le, {by}" if by else "le"
    suffix = f"{{{{{by}}}}} " if by else ""
    return tuple(
        Query(
            f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{{{selector}}}[{RATE}])))",
            f"{suffix}p{round(q * 100)}",
        )
        for q in qs
    )


def trainer(metric: str) -> str:
    return f"{metric}{{{JOB_SELECTOR}}}"


OPERATOR = f'job="{OPERATOR_SCRAPE_JOB}"'


def query_variable(name: str, label: str, query: str) -> dict[str, Any]:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "definition": query,
        "query": {"query": query, "refId": f"{name}-variable"},
        "refresh": 2,
        "sort": 1,
        "includeAll": False,
        "multi": False,
        "hide": 0,
        "current": {},
        "options": [],
    }


def _panel_json(panel: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    options: dict[str, Any]
    if panel.kind == "stat":
        options = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}, "colorMode": "value"}
    elif panel.kind == "table":
        options = {"showHeader": True}
    else:
        options = {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi"},
        }
    targets = []
    for index, query in enumerate(panel.queries):
        target: dict[str, Any] = {"refId": chr(ord("A") + index), "datasource": DATASOURCE, "expr": query.expr}
        if query.legend:
            target["legendFormat"] = query.legend
        if panel.kind == "table":
            target["format"] = "table"
            target["instant"] = True
        targets.append(target)
    result: dict[str, Any] = {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": panel.height, "w": panel.width, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
        "options": options,
        "targets": targets,
    }
    if panel.kind == "table":
        result["transformations"] = [{"id": "merge", "options": {}}]
    return result


def to_json(dashboard: Dashboard) -> dict[str, Any]:
    """The Grafana dashboard model (schemaVersion 39) of ``dashboard``, with grid positions laid out."""
    panels: list[dict[str, Any]] = []
    panel_id = 1
    y = 0
    for row in dashboard.rows:
        panels.append(
            {
                "id": panel_id,
                "type": "row",
                "title": row.title,
                "collapsed": False,
                "panels": [],
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
            }
        )
        panel_id += 1
        y += 1
        x = 0
        row_height = 0
        for panel in row.panels:
            if x + panel.width > 24:
                x, y, row_height = 0, y + row_height, 0
            panels.append(_panel_json(panel, panel_id, x, y))
            panel_id += 1
            x += panel.width
            row_height = max(row_height, panel.height)
        y += row_height
    datasource_variable = {
        "name": "datasource",
        "label": "Data source",
        "type": "datasource",
        "query": "prometheus",
        "current": {},
        "hide": 0,
        "options": [],
        "refresh": 1,
    }
    return {
        "uid": dashboard.uid,
        "title": dashboard.title,
        "description": dashboard.description,
        "tags": ["kubetune"],
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "timezone": "browser",
        "annotations": {"list": []},
        "links": [],
        "templating": {"list": [datasource_variable, *dashboard.variables]},
        "panels": panels,
    }
