"""Bounded-label checks for a /metrics exposition: every label of every kubetune series has a value from a
closed set declared in the metric catalog, and nothing looks like a step, a loss value or a path.

``label_problems(text)`` returns one line per offending series; ``assert_bounded_labels(text)`` raises.
"""

from __future__ import annotations

import re

from prometheus_client.parser import text_string_to_metric_families

from kubetune_trainer.spec.catalog import ALL_METRICS, MetricSpec

#: Series suffixes prometheus-client adds to a family.
_SUFFIXES = ("_bucket", "_sum", "_count", "_created", "_total")
#: Labels Prometheus itself defines for histogram and summary series.
_STRUCTURAL_LABELS = {"le", "quantile"}
#: Families of the standard process and platform collectors (bounded by construction).
STANDARD_PREFIXES = ("process_", "python_", "python_gc_")
_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^[-+]?(inf|nan)$", re.IGNORECASE)
MAX_LABEL_VALUE_LENGTH = 64


def _spec_for(family_name: str) -> MetricSpec | None:
    by_name = {spec.name: spec for spec in ALL_METRICS}
    if family_name in by_name:
        return by_name[family_name]
    base = family_name.removesuffix("_created")
    if f"{base}_total" in by_name:  # a counter's _created series
        return by_name[f"{base}_total"]
    for suffix in _SUFFIXES:
        if family_name.endswith(suffix) and family_name.removesuffix(suffix) in by_name:
            return by_name[family_name.removesuffix(suffix)]
        if f"{family_name}{suffix}" in by_name:
            return by_name[f"{family_name}{suffix}"]
    return None


def _looks_unbounded(value: str) -> str | None:
    if _NUMBER.match(value):
        return "a number (step, loss or other measurement)"
    if "/" in value or "\\" in value or "://" in value:
        return "a path or URI"
    if len(value) > MAX_LABEL_VALUE_LENGTH:
        return f"longer than {MAX_LABEL_VALUE_LENGTH} characters"
    return None


def label_problems(text: str, *, prefix: str = "kubetune_", allow_unknown: bool = False) -> list[str]:
    """Problems with the labels of the exposition ``text``.

    Families starting with ``prefix`` must be in the catalog (unless ``allow_unknown``), use only the
    catalog's label names and values; every label value of every family, ours or not, must not look
    like a number, a path or a long free text.
    """
    problems: list[str] = []
    for family in text_string_to_metric_families(text):
        spec = _spec_for(family.name) if family.name.startswith(prefix) else None
        if family.name.startswith(prefix) and spec is None and not allow_unknown:
            problems.append(f"{family.name}: not in the metric catalog (kubetune_trainer.spec.catalog)")
        for sample in family.samples:
            for label, value in sample.labels.items():
                if label in _STRUCTURAL_LABELS:
                    continue
                if spec is not None:
                    allowed = spec.labels.get(label)
                    if allowed is None:
                        problems.append(f"{sample.name}: label {label!r} is not declared for {spec.name}")
                        continue
                    if value not in allowed:
                        problems.append(f"{sample.name}{{{label}={value!r}}}: value not in {list(allowed)}")
                reason = _looks_unbounded(value)
                if reason:
                    problems.append(f"{sample.name}{{{label}={value!r}}}: label value looks like {reason}")
    return problems


def assert_bounded_labels(text: str, **kwargs: object) -> None:
    """AssertionError listing every label problem of ``text``."""
    problems = label_problems(text, **kwargs)  # type: ignore[arg-type]
    assert not problems, "unbounded or undeclared labels:\n  " + "\n  ".join(problems)


def series_count(text: str) -> int:
    """Number of samples in an exposition (a bound the tests can assert on)."""
    return sum(len(family.samples) for family in text_string_to_metric_families(text))
