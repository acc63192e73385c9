"""Operator scale benchmark: N FineTuneJobs created at a fixed rate against the API emulator.

For each size it starts a fresh emulator (in this process) and the real operator
(``python -m kubetune_operator.main``, its own process), creates the jobs at
``--rate`` per second and reports, as JSON:

* p50/p99 latency from a FineTuneJob's creation to its attempt Job's creation
  (both timed by the emulator when it accepted the object),
* the time from the first creation until every job is reconciled (Job exists and
  ``status.observedGeneration`` is set),
* the operator's peak RSS (VmHWM) and CPU seconds (user + system).

Targets: p99 < 1 s at 500 jobs; peak RSS < 200 MB at 1000.

    PYTHONPATH=operator:trainer_image:. python benchmarks/operator_scale.py --sizes 100
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from kubetune_operator.localpods import free_port

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "operator"), str(ROOT / "trainer_image")]

from tests.support.kube import EmulatorServer  # noqa: E402 (path set up above)

NAMESPACE = "bench"
FTJ = ("kubetune.io/v1alpha1", "finetunejobs")


def manifest(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "model": {
                "source": "hf://sentence-transformers/all-MiniLM-L6-v2",
                "task": "sequence-classification",
                "labels": ["negative", "positive"],
            },
            "dataset": {"train": "s3://data/reviews/train.jsonl"},
            "strategy": {"type": "lora"},
            "training": {"epochs": 1},
            "resources": {"nodes": 2, "processesPerNode": 1},
            "checkpoint": {"credentialsSecret": "s3-credentials"},
        },
    }


def proc_stats(pid: int) -> tuple[float, float]:
    """(peak RSS in MB, CPU seconds) of a live process, from /proc."""
    peak_kb = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            peak_kb = int(line.split()[1])
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    return peak_kb / 1024, cpu


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def run_size(size: int, rate: float, timeout: float) -> dict[str, Any]:
    usage_before = resource.getrusage(resource.RUSAGE_SELF)
    with EmulatorServer([NAMESPACE]) as cluster, tempfile.TemporaryDirectory() as tmp:
        client = cluster.client()
        kubeconfig = cluster.write_kubeconfig(Path(tmp) / "kubeconfig")
        log = Path(tmp) / "operator.log"
        env = {
            **os.environ,
            "KUBECONFIG": kubeconfig,
            "PYTHONPATH": os.pathsep.join([str(ROOT / "operator"), str(ROOT / "trainer_image")]),
            "KUBETUNE_DEFAULT_CHECKPOINT_URI": "s3://bench-ckpt",
            "KUBETUNE_METRICS_PORT": str(free_port()),
            "KUBETUNE_HEALTH_PORT": str(free_port()),
            "KUBETUNE_PEERING_PRIORITY": "1",
        }
        with open(log, "wb") as out:
            operator = subprocess.Popen(  # our own module
                [sys.executable, "-m", "kubetune_operator.main"], env=env, stdout=out, stderr=subprocess.STDOUT
            )
        try:
            deadline = time.monotonic() + 120
            while "Initial authentication has finished" not in log.read_text(errors="replace"):
                if time.monotonic() > deadline or operator.poll() is not None:
                    raise RuntimeError(f"operator did not start:\n{log.read_text(errors='replace')[-2000:]}")
                time.sleep(0.2)
            time.sleep(2.0)  # peering and the first watch requests
            names = [f"job-{i:05d}" for i in range(size)]
            started = time.monotonic()
            for i, name in enumerate(names):
                due = started + i / rate
                if (pause := due - time.monotonic()) > 0:
                    time.sleep(pause)
                client.create(*FTJ, NAMESPACE, manifest(name))
            created_all = time.monotonic()
            emulator = cluster.emulator
            ftj_key = ("kubetune.io", "finetunejobs")

            def reconciled() -> int:
                store = emulator.store.get(ftj_key, {})
                return sum(
                    1
                    for (_ns, name), obj in list(store.items())
                    if (obj.get("status") or {}).get("observedGeneration")
                    and (("batch", "jobs"), NAMESPACE, f"{name}-a1") in emulator.created_at
                )

            end_deadline = time.monotonic() + timeout
            while reconciled() < size and time.monotonic() < end_deadline:
                time.sleep(0.1)
            all_done = time.monotonic()
            done = reconciled()
            peak_mb, cpu = proc_stats(operator.pid)
            usage = resource.getrusage(resource.RUSAGE_SELF)
            emulator_cpu = (usage.ru_utime - usage_before.ru_utime) + (usage.ru_stime - usage_before.ru_stime)
            latencies = [
                emulator.created_at[(("batch", "jobs"), NAMESPACE, f"{name}-a1")]
                - emulator.created_at[(ftj_key, NAMESPACE, name)]
                for name in names
                if (("batch", "jobs"), NAMESPACE, f"{name}-a1") in emulator.created_at
            ]
        finally:
            if os.environ.get("KUBETUNE_BENCH_LOG"):
                Path(os.environ["KUBETUNE_BENCH_LOG"]).write_text(log.read_text(errors="replace"))
            operator.terminate()
            try:
                operator.wait(30)
            except subprocess.TimeoutExpired:
                operator.kill()
        return {
            "jobs": size,
            "rate_per_second": rate,
            "reconciled": done,
            "latency_p50_seconds": round(statistics.median(latencies), 4) if latencies else None,
            "latency_p99_seconds": round(percentile(latencies, 0.99), 4) if latencies else None,
            "latency_max_seconds": round(max(latencies), 4) if latencies else None,
            "creation_seconds": round(created_all - started, 2),
            "all_reconciled_seconds": round(all_done - started, 2),
            "operator_peak_rss_mb": round(peak_mb, 1),
            "operator_cpu_seconds": round(cpu, 2),
            # The API emulator and the load generator share this process: when this is close to
            # all_reconciled_seconds the emulator, not the operator, is the bottleneck.
            "emulator_cpu_seconds": round(emulator_cpu, 2),
            "load_average_1m": round(os.getloadavg()[0], 1),
            "cpu_count": os.cpu_count(),
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100,500,1000", help="comma-separated job counts")
    parser.add_argument("--rate", type=float, default=20.0, help="FineTuneJobs created per second")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for reconciliation")
    args = parser.parse_args(argv)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    results = []
    for size in (int(text) for text in args.sizes.split(",") if text.strip()):
        results.append(run_size(size, args.rate, args.timeout))
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)  # progress while larger sizes run
    print(json.dumps({"benchmark": "operator_scale", "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
