"""Monitoring as code: the metric catalog, Grafana dashboards, Prometheus alert rules and the chart README.

Every file these modules generate is committed; ``python -m kubetune_operator.monitoring --check``
regenerates them in memory and fails on any difference (``make verify``).
"""
