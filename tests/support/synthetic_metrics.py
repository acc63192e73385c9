"""Synthetic trainer and operator metrics with the exact catalog names, built with prometheus-client.

Used where a real training run is too slow: a local HTTP endpoint serves plausible values for every
metric and every label value in the catalog, so a real Prometheus can scrape it and every dashboard
panel query has something to return.  ``serve(registry)`` starts an HTTP server on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import start_http_server

from kubetune_trainer.spec.catalog import OPERATOR_METRICS, TRAINER_METRICS, MetricSpec

# Values a healthy job at step 120 of 500 might show.
_GAUGE_VALUES = {
    "kubetune_trainer_step": 120.0,
    "kubetune_trainer_total_steps": 500.0,
    "kubetune_trainer_epoch": 0.48,
    "kubetune_trainer_learning_rate": 2e-5,
    "kubetune_trainer_grad_norm": 1.7,
    "kubetune_trainer_samples_per_second": 48.0,
    "kubetune_trainer_tokens_per_second": 6144.0,
    "kubetune_trainer_model_flops_utilization": 0.41,
    "kubetune_trainer_eta_seconds": 950.0,
    "kubetune_trainer_checkpoint_step": 100.0,
    "kubetune_trainer_trainable_parameters": 295_682.0,
    "kubetune_trainer_parameters": 22_713_216.0,
}
_COUNTER_VALUES = {
    "kubetune_trainer_samples_total": 3840.0,
    "kubetune_trainer_tokens_total": 491_520.0,
    "kubetune_trainer_nonfinite_loss_total": 0.0,
    "kubetune_trainer_checkpoint_bytes_total": 2.4e8,
    "kubetune_trainer_checkpoint_fallbacks_total": 0.0,
    "kubetune_trainer_examples_dropped_total": 12.0,
    "kubetune_operator_restarts_total": 1.0,
    "kubetune_operator_preemptions_total": 3.0,
    "kubetune_operator_pods_force_deleted_total": 1.0,
    "kubetune_operator_reconcile_errors_total": 2.0,
}
_LABELLED_VALUES = {
    "component": {"total": 0.52, "task": 0.48, "auxiliary": 0.03, "l2sp": 0.01},
    "metric": {"accuracy": 0.87, "f1": 0.85, "precision": 0.86, "recall": 0.84, "loss": 0.41, "perplexity": 1.5},
    "kind": {"allocated": 3.2e9, "reserved": 4.0e9, "rss": 2.1e9},
    "phase": {"Pending": 1, "Running": 2, "Restarting": 0, "Suspended": 0, "Succeeded": 5, "Failed": 1},
}
_OBSERVATIONS = {
    "kubetune_trainer_step_seconds": (0.21, 0.25, 0.24, 0.6),
    "kubetune_trainer_checkpoint_seconds": (1.2, 3.5),
    "kubetune_operator_reconcile_seconds": (0.004, 0.012, 0.03, 0.2),
    "kubetune_operator_time_to_running_seconds": (14.0, 42.0),
    "kubetune_operator_job_duration_seconds": (900.0, 3600.0),
}


#: Counter and histogram children of each synthetic registry, advanced by :func:`tick`.
_LIVE: weakref.WeakKeyDictionary[CollectorRegistry, list[tuple[str, Any]]] = weakref.WeakKeyDictionary()


def _build(registry: CollectorRegistry, spec: MetricSpec, now: float) -> None:
    live = _LIVE.setdefault(registry, [])
    labels = tuple(spec.labels)
    label_sets = [dict(zip(labels, values, strict=True)) for values in _product(spec)]
    if spec.type == "histogram":
        histogram = Histogram(spec.name, spec.help, labels, registry=registry)
        for label_set in label_sets:
            child = histogram.labels(**label_set) if labels else histogram
            for value in _OBSERVATIONS[spec.name]:
                child.observe(value)
            live.append((spec.name, child))
        return
    if spec.type == "counter":
        counter = Counter(spec.name, spec.help, labels, registry=registry)
        for label_set in label_sets:
            child = counter.labels(**label_set) if labels else counter
            child.inc(_COUNTER_VALUES[spec.name])
            live.append((spec.name, child))
        return
    gauge = Gauge(spec.name, spec.help, labels, registry=registry)
    for label_set in label_sets:
        child = gauge.labels(**label_set) if labels else gauge
        if labels:
            (label,) = labels
            child.set(_LABELLED_VALUES[label][label_set[label]])
        elif spec.name.endswith("_timestamp_seconds"):
            child.set(now - (240.0 if "checkpoint" in spec.name else 2.0))
        else:
            child.set(_GAUGE_VALUES[spec.name])


def _product(spec: MetricSpec) -> list[tuple[str, ...]]:
    combos: list[tuple[str, ...]] = [()]
    for values in spec.labels.values():
        combos = [(*c, v) for c in combos for v in values]
    return combos


def trainer_registry(now: float | None = None) -> CollectorRegistry:
    """Every trainer metric of the catalog with every allowed label value."""
    registry = CollectorRegistry()
    for spec in TRAINER_METRICS:
        _build(registry, spec, time.time() if now is None else now)
    return registry


def operator_registry() -> CollectorRegistry:
    """Every operator metric of the catalog."""
    registry = CollectorRegistry()
    for spec in OPERATOR_METRICS:
        _build(registry, spec, time.time())
    return registry


def exposition(registry: CollectorRegistry) -> str:
    """The text exposition format of ``registry`` (what /metrics returns)."""
    return generate_latest(registry).decode()


def tick(registry: CollectorRegistry) -> None:
    """Advance a registry as a live process would: counters grow and histograms get observations.

    Rates over the scrape window are then non-zero and histogram quantiles finite.  Counters of
    trouble (non-finite losses, checkpoint fallbacks) stay put, as in a healthy run.
    """
    for name, child in _LIVE.get(registry, []):
        if name in _OBSERVATIONS:
            child.observe(_OBSERVATIONS[name][0])
        elif not name.endswith(("nonfinite_loss_total", "fallbacks_total")):
            child.inc(1)


@contextlib.contextmanager
def serve(registry: CollectorRegistry, *, tick_seconds: float = 0.25) -> Iterator[str]:
    """Serve ``registry`` on 127.0.0.1 at a free port, ticking it in the background; yields ``host:port``."""
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    stop = threading.Event()

    def run() -> None:
        while not stop.wait(tick_seconds):
            tick(registry)

    ticker = threading.Thread(target=run, daemon=True)
    ticker.start()
    try:
        yield f"127.0.0.1:{server.server_port}"
    finally:
        stop.set()
        ticker.join(timeout=5)
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def collector(registry: CollectorRegistry, name: str) -> Any:
    """The metric object registered under ``name`` (the contract name, e.g. ``kubetune_trainer_step``).

    Tests drive the real TrainerMetrics/OperatorMetrics by metric name, not by their attribute names,
    so only the cross-team contract (the names) couples them.
    """
    # prometheus-client has no public lookup by name; this mapping has been stable across its releases.
    found = registry._names_to_collectors.get(name)
    if found is None:
        raise KeyError(f"{name} is not registered")
    return found
