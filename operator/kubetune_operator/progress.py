"""Live progress from rank 0's Prometheus endpoint, as ``status.progress``/``status.checkpoint``.

Pure: text in, dicts out.  The pods need no API credentials; the operator (or
``kubetune run``) scrapes them and writes the status.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from kubetune_operator.conditions import parse_time, rfc3339
from kubetune_trainer.spec import catalog as m


def _samples(metrics_text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((dict(sample.labels), float(sample.value)))
    return found


def _value(samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float | None:
    for sample_labels, value in samples.get(name, []):
        if all(sample_labels.get(k) == v for k, v in labels.items()) and math.isfinite(value):
            return value
    return None


def parse_progress(metrics_text: str, now: datetime) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """``(progress, checkpoint)`` in the status' camelCase, or None when the text is not a trainer's
    metrics (or not Prometheus text).  ``checkpoint`` is ``{}`` before the first committed checkpoint.

    A trainer's gauges read 0 from its start, before they mean anything, so ``progress`` holds only
    what the trainer has stated: ``step``, ``totalSteps`` and ``epoch`` once it has restored its
    checkpoint (``kubetune_trainer_total_steps`` > 0), and the loss, throughput, MFU and ETA once this
    process has finished an optimizer step (``kubetune_trainer_last_step_timestamp_seconds`` > 0).
    A restarted pod thus never reports step 0 or a loss of 0 while it loads; the caller keeps the
    values it had."""
    try:
        samples = _samples(metrics_text)
    except (ValueError, TypeError):
        return None
    step = _value(samples, m.STEP.name)
    if step is None:
        return None
    progress: dict[str, Any] = {}
    total = _value(samples, m.TOTAL_STEPS.name)
    if total is not None and total > 0:
        progress["step"] = int(step)
        progress["totalSteps"] = int(total)
        epoch = _value(samples, m.EPOCH.name)
        if epoch is not None:
            progress["epoch"] = round(epoch, 4)
    last_step = _value(samples, m.LAST_STEP_TIMESTAMP.name)
    if last_step is not None and last_step > 0:
        progress |= _step_figures(samples, now)
    progress["updated"] = rfc3339(now)
    checkpoint: dict[str, Any] = {}
    checkpoint_step = _value(samples, m.CHECKPOINT_STEP.name)
    if checkpoint_step is not None and checkpoint_step > 0:
        checkpoint["step"] = int(checkpoint_step)
        stamp = _value(samples, m.CHECKPOINT_TIMESTAMP.name)
        if stamp is not None and stamp > 0:
            checkpoint["time"] = rfc3339(datetime.fromtimestamp(stamp, tz=UTC))
    return progress, checkpoint


def _step_figures(samples: dict[str, list[tuple[dict[str, str], float]]], now: datetime) -> dict[str, Any]:
    """The last step's loss, throughput, MFU and the ETA it implies."""
    figures: dict[str, Any] = {}
    loss = _value(samples, m.LOSS.name, component="total")
    if loss is None:
        loss = _value(samples, m.LOSS.name)
    if loss is not None:
        figures["loss"] = round(loss, 6)
    for name, key in ((m.SAMPLES_PER_SECOND.name, "samplesPerSecond"), (m.TOKENS_PER_SECOND.name, "tokensPerSecond")):
        rate = _value(samples, name)
        if rate is not None:
            figures[key] = round(rate, 3)
    mfu = _value(samples, m.MODEL_FLOPS_UTILIZATION.name)
    if mfu is not None and mfu > 0:
        figures["modelFlopsUtilization"] = round(mfu, 4)
    eta = _value(samples, m.ETA_SECONDS.name)
    if eta is not None and eta >= 0:
        figures["eta"] = rfc3339(now + timedelta(seconds=eta))
    return figures


def with_step_time(
    read: dict[str, Any], old: Mapping[str, Any], running_since: datetime | None, now: datetime
) -> dict[str, Any]:
    """The new ``status.progress``: ``old`` updated with this ``read`` of rank 0 (what the trainer has not
    stated keeps its last known value), and ``lastStepTime``, when the step was last seen to advance in the
    current attempt, from which a stall is judged.

    It moves to ``now`` when the read states a step that differs from the old one, and when it states the
    first step of an attempt (its ``Running`` condition turned True after the recorded time).  A read that
    states no step (the trainer loads its backbone, tokenizes, restores its checkpoint) leaves it as it
    was: loading, however long, is never judged a stall of training, and a restarted attempt keeps the
    previous attempt's time, which the stall check ignores."""
    progress = {**old, **read}
    last = parse_time(old.get("lastStepTime"))
    if "step" not in read:
        if last is None:
            progress.pop("lastStepTime", None)
        return progress
    this_attempt = last is not None and (running_since is None or last >= running_since)
    moved = read["step"] != old.get("step")
    stamp = rfc3339(last) if this_attempt and not moved and last is not None else rfc3339(now)
    return {**progress, "lastStepTime": stamp}
