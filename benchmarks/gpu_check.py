"""``make gpu-check``: the GPU suite and the GPU benchmark in one go, one JSON summary at the end.

Runs ``pytest -m gpu tests/gpu`` (JUnit XML for the counts), then
``benchmarks/gpu_llm.py``; prints ``{"tests": {...}, "benchmark": {...}, "versions": {...}}``
and, where ``$OUT`` is set (the device machine), writes the full reports there.  Exits
non-zero when a test failed or the benchmark could not run; targets that are not met
are reported, not failed on (they are figures, not tests).

    PYTHONPATH=operator:trainer_image:. python benchmarks/gpu_check.py [--cases ...] [--tests-only|--bench-only]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def run_tests(out: Path, *, timeout: float) -> dict[str, Any]:
    """The GPU suite; counts and the failing test ids."""
    junit = out / "gpu-tests.xml"
    env = dict(os.environ, KUBETUNE_GPU_VERSIONS=str(out / "gpu-versions.json"))
    started = time.monotonic()
    with (out / "gpu-tests.log").open("w") as log:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-m",
                "gpu",
                "tests/gpu",
                "-q",
                "-p",
                "no:cacheprovider",
                f"--junitxml={junit}",
            ],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            check=False,
        )
    summary: dict[str, Any] = {"returncode": result.returncode, "seconds": round(time.monotonic() - started, 1)}
    if junit.exists():
        suite = ET.parse(junit).getroot()  # noqa: S314
        suite = suite if suite.tag == "testsuite" else suite[0]
        summary |= {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
        summary["failed"] = [
            f"{case.get('classname')}::{case.get('name')}"
            for case in suite.iter("testcase")
            if case.find("failure") is not None or case.find("error") is not None
        ]
    versions = out / "gpu-versions.json"
    if versions.exists():
        summary["versions"] = json.loads(versions.read_text())
    return summary


def run_benchmark(out: Path, cases: str | None, *, timeout: float) -> dict[str, Any]:
    """``gpu_llm.py``; its targets, and the ratios behind them."""
    report = out / "gpu_llm.json"
    command = [sys.executable, str(REPO / "benchmarks" / "gpu_llm.py"), "--out", str(report)]
    if cases:
        command += ["--cases", cases]
    with (out / "gpu_llm.log").open("w") as log:
        result = subprocess.run(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=log, timeout=timeout, check=False)
    if result.returncode != 0 or not report.exists():
        return {"returncode": result.returncode, "log": (out / "gpu_llm.log").read_text()[-2000:]}
    document = json.loads(report.read_text())
    return {"returncode": 0, "targets": document["targets"], "gpu": document["machine"].get("gpu")}


def main(argv: list[str] | None = None) -> int:
    """Run the checks and print the summary."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=None, help="gpu_llm.py cases (default: its own default set)")
    parser.add_argument("--tests-only", action="store_true")
    parser.add_argument("--bench-only", action="store_true")
    parser.add_argument("--tests-timeout", type=float, default=300)
    parser.add_argument("--bench-timeout", type=float, default=330)
    args = parser.parse_args(argv)
    out = Path(os.environ.get("OUT") or REPO / ".gpu" / "out")
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {}
    if not args.bench_only:
        summary["tests"] = run_tests(out, timeout=args.tests_timeout)
    if not args.tests_only:
        summary["benchmark"] = run_benchmark(out, args.cases, timeout=args.bench_timeout)
    (out / "gpu-check.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    failed = summary.get("tests", {}).get("returncode", 0) != 0 or summary.get("benchmark", {}).get("returncode", 0)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
