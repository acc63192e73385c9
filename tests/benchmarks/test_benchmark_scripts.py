"""The benchmark scripts run end to end at a tiny size and print the JSON the README quotes.

Figures are not asserted (speed belongs to the benchmarks, not to tests); that the scripts
still work against the current code is.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from types import ModuleType

import psutil
import pytest

REPO = Path(__file__).resolve().parents[2]
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join([str(REPO / "operator"), str(REPO / "trainer_image"), str(REPO)]),
    "OMP_NUM_THREADS": "1",
}


def _run(script: str, *args: str, timeout: float) -> dict:
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ENV,
        cwd=REPO,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def test_operator_scale_reconciles_every_job_and_reports_latency_and_memory() -> None:
    report = _run("operator_scale.py", "--sizes", "5", "--rate", "10", "--timeout", "60", timeout=180)
    (result,) = report["results"]
    assert result["jobs"] == result["reconciled"] == 5
    assert 0 < result["latency_p50_seconds"] <= result["latency_p99_seconds"]
    assert result["operator_peak_rss_mb"] > 10


def test_checkpoint_io_compares_with_raw_transfers_and_times_sync_and_async_steps() -> None:
    report = _run(
        "checkpoint_io.py",
        *("--params-m", "0.2", "--rows", "8", "--rounds", "2", "--every", "2", "--repeats", "1"),
        timeout=300,
    )
    for store in ("s3_moto_loopback", "file"):
        assert report[store]["bytes"] > 0.2e6 * 4  # weights and optimizer state of 0.2 M fp32 parameters
        assert report[store]["ratio_save_upload_commit_vs_raw"] > 0
        # LATEST moves before retention runs: the commit latency excludes it, the wall time includes it.
        assert report[store]["save_upload_commit_seconds"] <= report[store]["wall_with_retention_seconds"]
    assert report["file"]["raw_page_cache_seconds"] > 0
    for store in ("s3_moto_loopback", "file"):
        overhead = report[f"step_overhead_{store}"]
        assert {"overhead_sync", "overhead_async", "checkpoint_interval_seconds"} <= set(overhead)
        assert len(overhead["overhead_async_per_round"]) == 2


def test_trainer_vs_hf_builds_a_valid_job_for_each_strategy(tmp_path: Path) -> None:
    # The full comparison takes tens of minutes; its kubetune side is the product's pod command
    # on a FineTuneJob this builder writes, which must stay valid as the API evolves.
    import importlib

    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        bench = importlib.import_module("trainer_vs_hf")
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    data = {"paths": {name: str(tmp_path / f"{name}.jsonl") for name in ("train", "validation", "test")}}
    for strategy in ("full", "lora"):
        job = bench.kubetune_job(strategy, data, tmp_path)
        assert job["spec"]["strategy"]["type"] == strategy
        assert job["spec"]["training"]["epochs"] == bench.EPOCHS
        assert job["spec"]["resources"]["processesPerNode"] == bench.NPROC
    help_text = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "trainer_vs_hf.py"), "--help"],
        capture_output=True,
        text=True,
        env=ENV,
        check=True,
        timeout=120,
    ).stdout
    assert "--quick" in help_text

    same = bench.paired_accuracy_difference([1, 0, 1, 1], [1, 0, 1, 1])
    assert same["points"] == same["ci95_low_points"] == same["ci95_high_points"] == 0
    better = bench.paired_accuracy_difference([1] * 90 + [0] * 10, [1] * 80 + [0] * 20)
    assert better["points"] == 10
    assert better["sentences_only_a_right"] == 10
    assert better["sentences_only_b_right"] == 0
    assert 0 < better["ci95_low_points"] < 10 < better["ci95_high_points"]


def test_gpu_llm_runs_both_systems_at_a_tiny_size_on_the_cpu(tmp_path: Path) -> None:
    # The GPU benchmark's code path on a tiny model: the HF Trainer worker, kubetune's pod command,
    # packing, the steady-state figures and the targets table (whose values need a GPU to mean anything).
    report = _run(
        "gpu_llm.py", "--tiny", "--cases", "full-1024,unpacked-1024,packed-1024", "--work", str(tmp_path), timeout=900
    )
    results = report["results"]
    assert results["full-1024"]["hf"]["ok"], results["full-1024"]["hf"]
    for case, system in (("full-1024", "kubetune"), ("unpacked-1024", "kubetune"), ("packed-1024", "kubetune")):
        figures = results[case][system]
        assert figures["ok"], figures
        assert figures["tokens_per_second"] > 0
        assert figures["flops_per_token"] == results["full-1024"]["hf"]["flops_per_token"]  # same model, same count
    targets = report["targets"]
    assert targets["full_1024_vs_hf"]["value"] > 0
    assert targets["packed_vs_unpacked_real_tokens"]["value"] > 0
    assert targets["minilm_samples_per_second"]["met"] is None  # not run


def test_gpu_check_skips_its_suite_cleanly_without_cuda(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--tests-only"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**ENV, "OUT": str(tmp_path)},
        cwd=REPO,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    summary = json.loads(result.stdout)["tests"]
    assert summary["tests"] > 0
    assert summary["skipped"] == summary["tests"]  # every GPU test skipped, none failed


def test_gpu_check_stops_a_phase_at_its_time_with_its_workers_and_keeps_what_it_finished(tmp_path: Path) -> None:
    # As gpu_llm.py would: one case finished and logged, then a worker (in a session of its own, as
    # torchrun starts them) that would hold the GPU well past the device tool's limit.
    gpu_check = _script("gpu_check")
    worker_pid = tmp_path / "worker.pid"
    program = (
        "import subprocess, sys, time\n"
        'print(\'full-1024: {"hf": {"tokens_per_second": 1.5}}\', file=sys.stderr, flush=True)\n'
        "worker = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'], start_new_session=True)\n"
        f"open({str(worker_pid)!r}, 'w').write(str(worker.pid))\n"
        "time.sleep(300)\n"
    )
    log = tmp_path / "bench.log"
    assert gpu_check.run_bounded([sys.executable, "-c", program], log, timeout=5) is None
    worker = int(worker_pid.read_text())
    with contextlib.suppress(psutil.NoSuchProcess):  # gone, or dead and not yet reaped by init
        assert psutil.Process(worker).status() == psutil.STATUS_ZOMBIE
    assert gpu_check.finished_cases(log) == {"full-1024": {"hf": {"tokens_per_second": 1.5}}}
    assert gpu_check.run_bounded([sys.executable, "-c", "raise SystemExit(3)"], log, timeout=60) == 3


def _script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "benchmarks" / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_what_gpu_assets_packs_gpu_check_unpacks_for_its_own_python_only(tmp_path: Path) -> None:
    # The device tool carries 64 MiB: wheels travel unpacked and xz-compressed, the MiniLM weights
    # xz-compressed; gpu_check.py restores both on the machine before anything imports them.
    gpu_assets, gpu_check = _script("gpu_assets"), _script("gpu_check")
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "ktprobe-1.0-py3-none-any.whl", "w") as wheel:
        wheel.writestr("ktprobe/__init__.py", "VALUE = 42\n")
        wheel.writestr("ktprobe-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: ktprobe\nVersion: 1.0\n")
    assets = tmp_path / "assets"
    (assets / "minilm").mkdir(parents=True)
    this_python = f"{sys.version_info.major}.{sys.version_info.minor}"
    gpu_assets.pack_site(wheels, assets / gpu_assets.site_archive_name(this_python))
    weights = assets / "minilm" / "model.safetensors"
    original = os.urandom(200_000) + bytes(200_000)
    weights.write_bytes(original)
    assert gpu_assets.compress(weights).name == "model.safetensors.xz"
    assert not weights.exists()

    carried = gpu_check.unpack_assets(assets, tmp_path / "scratch")
    assert (carried.files / "minilm" / "model.safetensors").read_bytes() == original
    assert not weights.exists()  # the carried folder stays as small as it travelled
    assert carried.site is not None
    probe = subprocess.run(
        [sys.executable, "-c", "import ktprobe; print(ktprobe.VALUE)"],
        env={**os.environ, "PYTHONPATH": str(carried.site)},
        capture_output=True,
        text=True,
        check=True,
    )
    assert probe.stdout.strip() == "42"
    assert gpu_check.unpack_assets(assets, tmp_path / "scratch") == carried  # again: kept, not unpacked twice

    elsewhere = tmp_path / "for-another-python"
    elsewhere.mkdir()
    shutil.copy(assets / gpu_assets.site_archive_name(this_python), elsewhere / gpu_assets.site_archive_name("2.99"))
    assert gpu_check.unpack_assets(elsewhere, tmp_path / "scratch2").site is None


def test_gpu_assets_carries_what_the_machines_image_cannot_give_and_never_torch() -> None:
    gpu_assets = _script("gpu_assets")
    image = gpu_assets.read_image()
    assert image["torch"] == "2.11.0"  # the CUDA build there; ``closure`` checks it meets every requirement
    carried = gpu_assets.closure(gpu_assets.ROOTS, gpu_assets.installed_here, image)
    # Each at CI's version: the trainer on the GPU runs what CI tested.
    assert all(carried[name] == importlib.metadata.version(name) for name in carried)
    # Not in the image: huggingface_hub 2.x's HTTP stack down to truststore (the machine would have
    # failed ``import transformers`` without it), DeepSpeed's hjson, pydantic's core.
    assert {"httpx2", "httpcore2", "truststore", "hjson", "pydantic-core", "deepspeed"} <= set(carried)
    # In the image, in a version that misses a requirement: huggingface_hub 1.33 (transformers needs 2.4+).
    assert "huggingface-hub" in carried
    # In the image at a version that meets it (tokenizers 0.23.2, numpy, safetensors 0.8.0), or unrecorded
    # under a mere floor (scikit-learn for seqeval): left to the image; torch never travels.
    assert not {"tokenizers", "numpy", "safetensors", "scikit-learn", "scipy", "torch"} & set(carried)

    packages = {
        "app": ("1.0", ["torch>=2.12", "helper; python_version < '3.0'"]),
        "old-app": ("1.0", ["torch>=2.0", "lib<2", "newlib"]),
        "lib": ("1.5", []),
        "newlib": ("3.0", ["lib>=1"]),
    }
    with pytest.raises(ValueError, match=r"app 1.0 requires torch>=2.12, but the machine has torch 2.11.0"):
        gpu_assets.closure(["app"], packages.__getitem__, image)
    # lib: the image's version is unrecorded and the requirement has a ceiling; newlib is not there at all.
    assert gpu_assets.closure(["old-app"], packages.__getitem__, image | {"lib": None}) == {
        "old-app": "1.0",
        "lib": "1.5",
        "newlib": "3.0",
    }
    assert gpu_assets.closure(["old-app"], packages.__getitem__, image | {"lib": "1.9"}) == {
        "old-app": "1.0",
        "newlib": "3.0",
    }


def test_gpu_check_names_every_carried_requirement_the_machine_does_not_meet(tmp_path: Path) -> None:
    gpu_check = _script("gpu_check")
    info = tmp_path / "site" / "ktcarried-1.0.dist-info"
    info.mkdir(parents=True)
    info.joinpath("METADATA").write_text(
        "Metadata-Version: 2.1\nName: ktcarried\nVersion: 1.0\n"
        "Requires-Dist: packaging>=1\n"  # met (CI's venv, as the image would)
        "Requires-Dist: packaging<1\n"  # there, in a version that misses it
        "Requires-Dist: ktsurely-absent>=2\n"  # nowhere
        "Requires-Dist: ktwindows-only; sys_platform == 'win32'\n"  # not for this machine
        "Requires-Dist: ktextra-only; extra == 'docs'\n"  # an extra nobody asked for
    )
    assert gpu_check.unmet_requirements(tmp_path / "site") == [
        "ktcarried 1.0 requires ktsurely-absent>=2 (found: none)",
        f"ktcarried 1.0 requires packaging<1 (found: {importlib.metadata.version('packaging')})",
    ]


def test_data_pipeline_compares_with_datasets_map_and_measures_reader_memory_and_restart() -> None:
    report = _run("data_pipeline.py", "--rows", "3000", "--small-rows", "200", "--batches", "40", timeout=900)
    tokenize = report["tokenize"]
    assert tokenize["kubetune"]["examples"] == tokenize["datasets_map"]["examples"] == 3000
    assert tokenize["kubetune"]["how"] == "built"
    assert tokenize["ratio_kubetune_vs_datasets_map"] > 0
    assert report["reader"]["big"]["batches"] == report["reader"]["small"]["batches"] == 40
    assert report["reader"]["ratio_peak_rss_big_vs_small"] > 0
    assert report["restart"]["tokenization_skipped"] is True
    assert 0 < report["restart"]["seconds_to_data"] <= report["restart"]["seconds_to_first_step"]
