"""Run the real ``prometheus`` binary on loopback and check the dashboards' panel queries against it.

``run_prometheus(targets, extra_labels)`` starts Prometheus with a temporary config scraping
``targets`` (scrape job name → ``host:port`` list) every second and yields a client.
``assert_every_panel_has_data(targets, extra_labels)`` is the reusable check: every panel query of both
dashboards, with the template variables substituted, returns at least one series; point it at
synthetic endpoints, or at a real training run and operator (see ``targets_from_env``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kubetune_trainer.spec.catalog import JOB_NAME_LABEL, OPERATOR_SCRAPE_JOB, TRAINER_SCRAPE_JOB

REPO = Path(__file__).resolve().parents[2]
DASHBOARD_DIR = REPO / "charts" / "kubetune" / "dashboards"
ENV_TRAINER_TARGETS = "KUBETUNE_TEST_TRAINER_METRICS"
ENV_OPERATOR_TARGETS = "KUBETUNE_TEST_OPERATOR_METRICS"


def prometheus_binary() -> str | None:
    """Path of the ``prometheus`` server binary, or None when it is not installed."""
    return shutil.which("prometheus")


def promtool_binary() -> str | None:
    """Path of ``promtool``, or None when it is not installed."""
    return shutil.which("promtool")


def targets_from_env() -> dict[str, list[str]]:
    """Scrape targets named by KUBETUNE_TEST_TRAINER_METRICS / KUBETUNE_TEST_OPERATOR_METRICS (comma lists)."""
    targets: dict[str, list[str]] = {}
    for job, variable in ((TRAINER_SCRAPE_JOB, ENV_TRAINER_TARGETS), (OPERATOR_SCRAPE_JOB, ENV_OPERATOR_TARGETS)):
        value = os.environ.get(variable, "").strip()
        if value:
            targets[job] = [part.strip() for part in value.split(",") if part.strip()]
    return targets


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Prometheus:
    """A running Prometheus: its base URL and a few API helpers."""

    url: str
    log_path: Path

    def _get(self, path: str, params: Mapping[str, str] | None = None) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=10) as response:  # noqa: S310 (loopback)
            body = json.load(response)
        if body.get("status") != "success":
            raise RuntimeError(f"Prometheus {path} failed: {body}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """Instant query at ``at`` (Unix seconds; now when None); the result vector (empty when nothing matches)."""
        params = {"query": expr} if at is None else {"query": expr, "time": f"{at:.3f}"}
        data = self._get("/api/v1/query", params)
        result = data["result"]
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": result}]
        return list(result)

    def targets(self) -> list[dict[str, Any]]:
        """Active scrape targets with their health."""
        return list(self._get("/api/v1/targets")["activeTargets"])

    def alerts(self) -> list[dict[str, Any]]:
        """Alerts currently pending or firing."""
        return list(self._get("/api/v1/alerts")["alerts"])

    def log(self) -> str:
        """The server's log so far (for failure messages)."""
        return self.log_path.read_text(errors="replace")[-4000:]


def _config(
    targets: Mapping[str, list[str]], extra_labels: Mapping[str, str], interval: str, rule_files: list[str]
) -> dict[str, Any]:
    scrape_configs = []
    for job, addresses in targets.items():
        static: dict[str, Any] = {"targets": list(addresses)}
        if extra_labels:
            static["labels"] = dict(extra_labels)
        scrape_configs.append({"job_name": job, "scrape_interval": interval, "static_configs": [static]})
    return {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": rule_files,
        "scrape_configs": scrape_configs,
    }


@contextlib.contextmanager
def run_prometheus(
    targets: Mapping[str, list[str]],
    extra_labels: Mapping[str, str] | None = None,
    *,
    interval: str = "1s",
    rule_files: list[str] | None = None,
    startup_timeout: float = 60.0,
) -> Iterator[Prometheus]:
    """Start ``prometheus`` on 127.0.0.1 with a temp config and TSDB; stop it (and only it) on exit."""
    binary = prometheus_binary()
    if binary is None:
        raise RuntimeError("the prometheus binary is not installed (make system-deps)")
    with tempfile.TemporaryDirectory(prefix="kubetune-prometheus-") as tmp:
        work = Path(tmp)
        config = work / "prometheus.yml"
        config.write_text(yaml.safe_dump(_config(targets, extra_labels or {}, interval, rule_files or [])))
        port = _free_port()
        log_path = work / "prometheus.log"
        with log_path.open("w") as log:
            process = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={work / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--storage.tsdb.retention.time=1h",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        server = Prometheus(f"http://127.0.0.1:{port}", log_path)
        try:
            _wait_ready(server, process, startup_timeout)
            yield server
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)


def _wait_ready(server: Prometheus, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"prometheus exited with {process.returncode}:\n{server.log()}")
        try:
            with urllib.request.urlopen(f"{server.url}/-/ready", timeout=2) as response:  # noqa: S310 (loopback)
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"prometheus not ready after {timeout}s:\n{server.log()}")


def wait_for_targets_up(server: Prometheus, timeout: float = 30.0) -> None:
    """Block until every target has been scraped successfully; AssertionError listing the unhealthy ones."""
    deadline = time.monotonic() + timeout
    unhealthy: list[str] = []
    while time.monotonic() < deadline:
        targets = server.targets()
        unhealthy = [
            f"{t['labels'].get('job')} {t['scrapeUrl']}: {t['health']} {t.get('lastError', '')}"
            for t in targets
            if t["health"] != "up"
        ]
        if targets and not unhealthy:
            return
        time.sleep(0.5)
    raise AssertionError("scrape targets not up: " + "; ".join(unhealthy))


def load_dashboards(directory: Path = DASHBOARD_DIR) -> dict[str, dict[str, Any]]:
    """Committed dashboard JSON models by title."""
    dashboards = {}
    for path in sorted(directory.glob("*.json")):
        model = json.loads(path.read_text())
        dashboards[model["title"]] = model
    return dashboards


def substitute(expr: str, variables: Mapping[str, str]) -> str:
    """Replace Grafana variables (``$name``, ``${name}``, ``$__rate_interval``) in a query."""

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in variables:
            raise KeyError(f"no value for dashboard variable ${name} in {expr!r}")
        return variables[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", replace, expr)


def panel_queries(dashboards: Mapping[str, dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(dashboard title, panel title, expr) for every target of every panel."""
    return [
        (title, panel["title"], target["expr"])
        for title, model in dashboards.items()
        for panel in model["panels"]
        for target in panel.get("targets", [])
    ]


def variable_queries(dashboards: Mapping[str, dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(dashboard title, variable name, label_values(...) definition) of every query variable."""
    return [
        (title, variable["name"], variable["definition"])
        for title, model in dashboards.items()
        for variable in model["templating"]["list"]
        if variable["type"] == "query"
    ]


_LABEL_VALUES = re.compile(r"^label_values\((?P<selector>.+),\s*(?P<label>\w+)\)$")


def label_values_as_promql(definition: str) -> tuple[str, str]:
    """``label_values(metric{sel}, label)`` → (``group by (label) (metric{sel})``, label)."""
    match = _LABEL_VALUES.match(definition.strip())
    if not match:
        raise ValueError(f"unsupported variable query {definition!r}")
    return f"group by ({match['label']}) ({match['selector']})", match["label"]


def dashboard_variables(extra_labels: Mapping[str, str], rate_interval: str = "15s") -> dict[str, str]:
    """Values of the dashboards' variables for a job labelled ``extra_labels`` (namespace, job_name)."""
    return {
        "namespace": extra_labels.get("namespace", ""),
        "job": extra_labels.get(JOB_NAME_LABEL, ""),
        "__rate_interval": rate_interval,
        "datasource": "prometheus",
    }


def panel_problems(
    server: Prometheus,
    extra_labels: Mapping[str, str],
    *,
    at: float | None = None,
    rate_interval: str = "15s",
    finite: bool = False,
    dashboards: Mapping[str, dict[str, Any]] | None = None,
) -> list[str]:
    """One line per panel query that returns no series at ``at`` (with ``finite``: only NaN/Inf values),
    and per variable query that does not offer the job's namespace and name."""
    models = dict(dashboards) if dashboards is not None else load_dashboards()
    variables = dashboard_variables(extra_labels, rate_interval)
    problems: list[str] = []
    for dashboard, panel, expr in panel_queries(models):
        query = substitute(expr, variables)
        result = server.query(query, at)
        if not result:
            problems.append(f"{dashboard} / {panel}: {query} returned no series")
        elif finite and not any(_finite(sample["value"][1]) for sample in result):
            problems.append(f"{dashboard} / {panel}: {query} returned only non-finite values")
    for dashboard, name, definition in variable_queries(models):
        query, label = label_values_as_promql(substitute(definition, variables))
        offered = {sample["metric"].get(label) for sample in server.query(query, at)}
        if variables.get(name) not in offered:
            problems.append(f"{dashboard} / variable ${name}: {definition} offers {sorted(map(str, offered))}")
    return problems


def _finite(value: str) -> bool:
    return value.lower() not in ("nan", "+inf", "-inf", "inf")


def assert_panels_have_data(
    server: Prometheus,
    extra_labels: Mapping[str, str],
    *,
    at: float | None = None,
    timeout: float = 60.0,
    rate_interval: str = "15s",
    finite: bool = False,
    dashboards: Mapping[str, dict[str, Any]] | None = None,
) -> None:
    """Poll ``server`` until every panel has data (at ``at``, or now), else AssertionError listing the empty ones.

    Use ``at`` after a run has ended: Prometheus marks the series of a vanished target stale, so an
    instant query at "now" finds nothing; evaluate at a time the run was still scraped.
    """
    deadline = time.monotonic() + timeout
    while True:
        problems = panel_problems(
            server, extra_labels, at=at, rate_interval=rate_interval, finite=finite, dashboards=dashboards
        )
        if not problems or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    if problems:
        raise AssertionError(
            f"{len(problems)} dashboard queries returned nothing after {timeout}s:\n  " + "\n  ".join(problems)
        )


def assert_every_panel_has_data(
    targets: Mapping[str, list[str]],
    extra_labels: Mapping[str, str] | None = None,
    *,
    rate_interval: str = "15s",
    timeout: float = 60.0,
    finite: bool = False,
    dashboards: Mapping[str, dict[str, Any]] | None = None,
    targets_timeout: float = 60.0,
) -> None:
    """Scrape ``targets`` with a fresh Prometheus and require data in every panel of every dashboard.

    ``targets`` maps scrape job names (``kubetune-trainer``, ``kubetune-operator``) to ``host:port``
    lists.  ``extra_labels`` are attached to every target, as the PodMonitor's relabelling does in a
    cluster; ``namespace`` and ``job_name`` among them become the Training dashboard's ``$namespace``
    and ``$job``.  The dashboards' variable queries must offer those values too.  Raises
    AssertionError listing every empty panel.  ``targets_timeout`` bounds the wait for the first
    successful scrapes, ``timeout`` the wait for data after that.  For a run that starts and ends
    while Prometheus scrapes, use :func:`run_prometheus` and :func:`assert_panels_have_data` with ``at``.
    """
    labels = dict(extra_labels or {})
    with run_prometheus(targets, labels) as server:
        wait_for_targets_up(server, timeout=targets_timeout)
        assert_panels_have_data(
            server, labels, timeout=timeout, rate_interval=rate_interval, finite=finite, dashboards=dashboards
        )
