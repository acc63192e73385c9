"""The generated monitoring files are current, and dashboards, alerts, docs and the catalog agree."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from kubetune_operator.monitoring import __main__ as generate_all
from kubetune_operator.monitoring import alerts, chart_readme, dashboards
from kubetune_trainer.spec.catalog import ALL_METRICS, series_names

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "kubetune"
CATALOG_SERIES = {name for spec in ALL_METRICS for name in series_names(spec)}
#: Series Prometheus itself provides.
PROMETHEUS_SERIES = {"up"}


def test_committed_files_are_current(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    assert generate_all.main(["--check"]) == 0, "run: python -m kubetune_operator.monitoring"


def test_check_mode_reports_a_stale_file(tmp_path: Path) -> None:
    stale = tmp_path / "kubetune-alerts.yaml"
    stale.write_text("groups: []\n")
    assert alerts.main(["--check", str(stale)]) == 1
    assert alerts.main([str(stale)]) == 0
    assert alerts.main(["--check", str(stale)]) == 0


def _metric_names(expr: str) -> set[str]:
    without_strings = re.sub(r'"[^"]*"', "", expr)
    without_ranges = re.sub(r"\[[^\]]*\]", "", without_strings)
    words = set(re.findall(r"\b[a-z_][a-z0-9_]*\b", without_ranges))
    return {w for w in words if w.startswith("kubetune_") or w in PROMETHEUS_SERIES}


def _dashboard_models() -> dict[str, dict[str, object]]:
    return {p.name: json.loads(p.read_text()) for p in sorted((CHART / "dashboards").glob("*.json"))}


def test_dashboards_use_only_catalog_metrics() -> None:
    for name, model in _dashboard_models().items():
        for title, expr in dashboards.panel_queries(model):  # type: ignore[arg-type]
            unknown = _metric_names(expr) - CATALOG_SERIES - PROMETHEUS_SERIES
            assert not unknown, f"{name} / {title}: {sorted(unknown)} not in the metric catalog"


def test_training_panels_are_scoped_to_the_selected_job() -> None:
    model = json.loads((CHART / "dashboards" / "kubetune-training.json").read_text())
    for title, expr in dashboards.panel_queries(model):
        for metric in _metric_names(expr):
            assert re.search(rf'{metric}(_bucket)?\{{namespace="\$namespace", job_name="\$job"\}}', expr), (
                f"Training / {title}: {metric} is not filtered by $namespace and $job"
            )
    variables = {v["name"] for v in model["templating"]["list"]}
    assert {"datasource", "namespace", "job"} <= variables


def test_dashboard_layout_is_valid() -> None:
    uids = set()
    for name, model in _dashboard_models().items():
        uids.add(model["uid"])
        ids = [p["id"] for p in model["panels"]]  # type: ignore[index]
        assert len(ids) == len(set(ids)), name
        for panel in model["panels"]:  # type: ignore[attr-defined]
            grid = panel["gridPos"]
            assert grid["x"] >= 0, f"{name} / {panel['title']}"
            assert grid["x"] + grid["w"] <= 24, f"{name} / {panel['title']}"
            if panel["type"] != "row":
                assert panel["targets"], f"{name} / {panel['title']} has no query"
                assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    assert uids == {"kubetune-overview", "kubetune-training"}


def test_every_catalog_metric_is_on_a_dashboard_or_in_an_alert() -> None:
    used: set[str] = set()
    for model in _dashboard_models().values():
        for _, expr in dashboards.panel_queries(model):  # type: ignore[arg-type]
            used |= _metric_names(expr)
    for alert in alerts.ALERTS:
        used |= _metric_names(alert.expr)
    unused = [spec.name for spec in ALL_METRICS if not set(series_names(spec)) & used]
    assert unused == []


def test_alerts_are_documented_with_a_runbook_section() -> None:
    runbooks = (REPO / "docs" / "runbooks.md").read_text()
    anchors = {heading.strip().lower() for heading in re.findall(r"^## (.+)$", runbooks, flags=re.MULTILINE)}
    required = {"FineTuneJobFailed", "TrainingStalled", "LossNotFinite", "CheckpointOverdue",
                "KubetuneOperatorDown", "ReconcileErrors"}  # fmt: skip
    assert required <= {a.name for a in alerts.ALERTS}
    rules = yaml.safe_load((CHART / "rules" / "kubetune-alerts.yaml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            annotations = rule["annotations"]
            assert annotations["summary"]
            assert annotations["description"]
            anchor = annotations["runbook_url"].rsplit("#", 1)[1]
            assert anchor in anchors, f"docs/runbooks.md has no '## {rule['alert']}' section"
            assert rule["labels"]["severity"] in ("critical", "warning", "info")


def test_observability_doc_lists_every_alert_and_dashboard() -> None:
    doc = (REPO / "docs" / "observability.md").read_text()
    for alert in alerts.ALERTS:
        assert f"| {alert.name} | {alert.severity} | {alert.brief} |" in doc
    for dashboard in dashboards.dashboards():
        assert dashboard.title in doc


def test_chart_readme_refuses_undocumented_values(tmp_path: Path) -> None:
    text = "# -- Documented.\nfoo: 1\nbar:\n  baz: 2\n"
    with pytest.raises(chart_readme.UndocumentedValueError, match=r"bar\.baz"):
        chart_readme.parse_values(text)
    docs = chart_readme.parse_values("# -- A map.\n# Second line.\nmap:\n  inner: 1\n")
    assert [(d.key, d.description, d.default) for d in docs] == [("map", "A map. Second line.", {"inner": 1})]


def test_chart_readme_documents_every_values_leaf() -> None:
    readme = (CHART / "README.md").read_text()
    for doc in chart_readme.parse_values((CHART / "values.yaml").read_text()):
        assert f"| `{doc.key}` |" in readme
