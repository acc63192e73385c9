"""``make gpu-check``: the GPU suite and the GPU benchmark in one go, one JSON summary at the end.

First unpacks what ``make gpu-assets`` carried in ``.gpu/`` into the temp folder: the packages
the machine lacks (``site-cpXY.tar.xz`` for this interpreter) onto ``PYTHONPATH``, and MiniLM and
MR (``*.xz`` restored) for the benchmark.  Then runs
``pytest -m gpu tests/gpu`` (JUnit XML for the counts), then
``benchmarks/gpu_llm.py``; prints ``{"tests": {...}, "benchmark": {...}, "versions": {...}}``
and, where ``$OUT`` is set (the device machine), writes the full reports there.  Exits
non-zero when a test failed or the benchmark could not run; targets that are not met
are reported, not failed on (they are figures, not tests).

The whole check ends within ``--budget`` seconds (540: the device tool stops a call at 600), the
suite taking at most ``--tests-timeout`` of it; a phase past its time has its process tree killed
(the trainer's workers too) and reports ``timed_out`` with what it finished, and the summary in
``$OUT/gpu-check.json`` is rewritten after every phase.

    PYTHONPATH=operator:trainer_image:. python benchmarks/gpu_check.py [--cases ...] [--tests-only|--bench-only]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import lzma
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from tests.support.processes import kill_tree  # the suite's helper: the repository root is on PYTHONPATH

REPO = Path(__file__).resolve().parents[1]


def site_archive_name(python: str) -> str:
    """``site-cp312.tar.xz`` for ``3.12``: the archive names the interpreter its binary wheels are for
    (``make gpu-assets`` writes it under this name)."""
    return f"site-cp{python.replace('.', '')}.tar.xz"


@dataclass(frozen=True)
class Carried:
    """What ``make gpu-assets`` carried, ready to use."""

    site: Path | None  # site-packages for this interpreter, for PYTHONPATH (None: no archive for it)
    files: Path  # the other assets (minilm/, mr/) with every ``*.xz`` restored


def unpack_assets(assets: Path, scratch: Path) -> Carried:
    """Unpack ``assets/site-cpXY.tar.xz`` for this Python, and the other assets with their ``*.xz`` restored,
    under ``scratch`` (each once; ``assets`` itself is left as carried, so it stays under the transfer limit).

    An archive for another Python is not used: its binary wheels would not import.
    """
    files = scratch / "kubetune-gpu-assets"
    for source in sorted(p for p in assets.rglob("*") if p.is_file()):
        relative = source.relative_to(assets)
        if relative.parts[0] == "out" or source.name.startswith("site-"):
            continue
        packed = source.suffix == ".xz"
        target = files / (relative.with_suffix("") if packed else relative)
        if target.exists() and target.stat().st_mtime_ns >= source.stat().st_mtime_ns:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        with lzma.open(source, "rb") if packed else source.open("rb") as reader, partial.open("wb") as writer:
            shutil.copyfileobj(reader, writer, length=1 << 20)
        partial.replace(target)
    archive = assets / site_archive_name(f"{sys.version_info.major}.{sys.version_info.minor}")
    if not archive.exists():
        return Carried(None, files)
    site = scratch / "kubetune-gpu-site"
    marker = site / ".unpacked"
    if not marker.exists() or marker.read_text() != str(archive.stat().st_mtime_ns):
        shutil.rmtree(site, ignore_errors=True)
        with tarfile.open(archive, "r:xz") as tar:
            tar.extractall(site, filter="data")
        marker.write_text(str(archive.stat().st_mtime_ns))
    return Carried(site, files)


def unmet_requirements(site: Path) -> list[str]:
    """Every requirement of a carried package that this machine does not meet (the carried packages first,
    then its own, as the suite will import them), e.g. ``httpx2 2.16.2 requires truststore>=0.10 (found:
    none)``: ``make gpu-assets`` guesses the image from a list without every version; this says, before
    anything runs, what the next ``make gpu-assets`` has to carry."""
    from packaging.requirements import Requirement  # the machine's image has packaging; CI's venv too

    path = [str(site), *sys.path]
    unmet = []
    for carried in metadata.distributions(path=[str(site)]):
        for text in carried.requires or []:
            requirement = Requirement(text)
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue
            found = next(iter(metadata.distributions(name=requirement.name, path=path)), None)
            if found is None or not requirement.specifier.contains(found.version, prereleases=True):
                unmet.append(
                    f"{carried.metadata['Name']} {carried.version} requires {requirement} "
                    f"(found: {found.version if found else 'none'})"
                )
    return sorted(set(unmet))


def use_site(site: Path | None) -> None:
    """Put the carried packages on the import path of the suite and the benchmark (this script needs none)."""
    if site is None:
        return
    inherited = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (inherited, str(site)) if p)


def run_bounded(command: list[str], log: Path, *, timeout: float, env: dict[str, str] | None = None) -> int | None:
    """Run ``command`` from the repository, its output in ``log``; its exit code, or None when it ran past
    ``timeout``: then its whole process tree is killed, since the trainer's workers run in sessions of their
    own and would otherwise hold the GPU through the next phase."""
    with log.open("w") as output:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT)
        try:
            return proc.wait(timeout=max(timeout, 1.0))
        except subprocess.TimeoutExpired:
            kill_tree(proc)
            return None


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-2000:] if log.exists() else ""


def run_tests(out: Path, *, timeout: float) -> dict[str, Any]:
    """The GPU suite; counts and the failing test ids (the log's tail where it did not finish)."""
    junit, log = out / "gpu-tests.xml", out / "gpu-tests.log"
    env = dict(os.environ, KUBETUNE_GPU_VERSIONS=str(out / "gpu-versions.json"))
    started = time.monotonic()
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/gpu", "-q", "-p", "no:cacheprovider"]
    code = run_bounded([*command, f"--junitxml={junit}"], log, timeout=timeout, env=env)
    summary: dict[str, Any] = {"returncode": code, "seconds": round(time.monotonic() - started, 1)}
    if code is None:
        summary |= {"timed_out": True, "log": _tail(log)}
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


def finished_cases(log: Path) -> dict[str, Any]:
    """The cases ``gpu_llm.py`` finished, from the ``name: {json}`` line it logs after each (what is left
    of a run stopped at its time limit)."""
    cases: dict[str, Any] = {}
    for line in (log.read_text(errors="replace") if log.exists() else "").splitlines():
        name, sep, rest = line.partition(": ")
        if sep and rest.startswith("{") and " " not in name:
            with contextlib.suppress(json.JSONDecodeError):
                cases[name] = json.loads(rest)
    return cases


def run_benchmark(
    out: Path, cases: str | None, *, timeout: float, carried: Carried | None, tiny: bool = False
) -> dict[str, Any]:
    """``gpu_llm.py`` (on the carried MiniLM and MR where there are); its targets, and the ratios behind them."""
    report, log = out / "gpu_llm.json", out / "gpu_llm.log"
    command = [sys.executable, str(REPO / "benchmarks" / "gpu_llm.py"), "--out", str(report)]
    if cases:
        command += ["--cases", cases]
    if tiny:
        command.append("--tiny")
    for name in ("minilm", "mr"):
        if carried is not None and (carried.files / name).is_dir():
            command += [f"--{name}", str(carried.files / name)]
    code = run_bounded(command, log, timeout=timeout)
    if code != 0 or not report.exists():
        failed = {"returncode": code, "finished": finished_cases(log), "log": _tail(log)}
        return failed | ({"timed_out": True} if code is None else {})
    document = json.loads(report.read_text())
    return {"returncode": 0, "targets": document["targets"], "gpu": document["machine"].get("gpu")}


def main(argv: list[str] | None = None) -> int:
    """Run the checks and print the summary (also written after each phase, so a stopped run keeps it)."""
    started = time.monotonic()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=None, help="gpu_llm.py cases (default: its own default set)")
    parser.add_argument("--tests-only", action="store_true")
    parser.add_argument("--bench-only", action="store_true")
    parser.add_argument(
        "--budget", type=float, default=540, help="seconds for the whole check (the device tool stops a call at 600)"
    )
    parser.add_argument("--tests-timeout", type=float, default=270, help="at most this much of the budget")
    parser.add_argument("--tiny", action="store_true", help="the benchmark at a tiny size (a dry run on the CPU)")
    parser.add_argument("--assets", type=Path, default=REPO / ".gpu", help="what make gpu-assets wrote")
    args = parser.parse_args(argv)
    deadline = started + args.budget
    out = Path(os.environ.get("OUT") or REPO / ".gpu" / "out")
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {}

    def record() -> None:
        (out / "gpu-check.json").write_text(json.dumps(summary, indent=2) + "\n")

    carried = None
    if args.assets.is_dir():
        carried = unpack_assets(args.assets, Path(tempfile.gettempdir()))
        use_site(carried.site)
        summary["carried"] = {"site": str(carried.site) if carried.site else None, "files": str(carried.files)}
        if carried.site is not None:
            # Reported, not fatal: the machine's time is better spent finding out whether it matters.
            summary["carried"]["unmet_requirements"] = unmet = unmet_requirements(carried.site)
            for line in unmet:
                print(f"warning: {line}; carry it with make gpu-assets (gpu_assets.ROOTS)", file=sys.stderr)
        record()
    if not args.bench_only:
        left = deadline - time.monotonic()
        summary["tests"] = run_tests(out, timeout=left if args.tests_only else min(args.tests_timeout, left))
        record()
    if not args.tests_only:
        left = deadline - time.monotonic()
        summary["benchmark"] = run_benchmark(out, args.cases, timeout=left, carried=carried, tiny=args.tiny)
        record()
    print(json.dumps(summary, indent=2))
    failed = any(summary.get(phase, {}).get("returncode", 0) != 0 for phase in ("tests", "benchmark"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
