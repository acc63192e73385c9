"""Issue 7's acceptance check: a real Prometheus scrapes a real local training run (2 ranks, tiny model)
and a running operator (kopf against the API emulator); while they run, every panel query of both
dashboards returns at least one series.

Slow (a real DeepSpeed run on CPU): marked ``slow`` and ``e2e``.
"""

from __future__ import annotations

import logging
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from kubetune_trainer.spec.catalog import OPERATOR_SCRAPE_JOB, TRAINER_SCRAPE_JOB
from tests.support.metrics_labels import assert_bounded_labels
from tests.support.prometheus import panel_problems, prometheus_binary, promtool_binary, run_prometheus

pytestmark = [
    pytest.mark.slow,
    pytest.mark.e2e,
    pytest.mark.skipif(prometheus_binary() is None, reason="prometheus is not installed (make system-deps)"),
]
REPO = Path(__file__).resolve().parents[2]
LABELS = {"namespace": "ml", "job_name": "panels-demo"}
DEADLINE_SECONDS = 600
PROMTOOL = promtool_binary()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _training_manifest(tmp_path: Path) -> dict[str, Any]:
    from tests.support.tiny_models import sentiment_rows, tiny_bert, write_jsonl

    model = tiny_bert(tmp_path / "model")
    train = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(400, seed=1))
    validation = write_jsonl(tmp_path / "validation.jsonl", sentiment_rows(32, seed=2))
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": LABELS["job_name"], "namespace": LABELS["namespace"]},
        "spec": {
            "model": {
                "source": f"file://{model}",
                "task": "sequence-classification",
                "labels": ["negative", "positive"],
            },
            "dataset": {"train": str(train), "validation": str(validation), "maxLength": 32},
            "strategy": {"type": "lora", "lora": {"r": 4, "alpha": 8, "targetModules": ["query", "value"]}},
            "training": {
                "maxSteps": 400,
                "learningRate": 5e-3,
                "microBatchSize": 8,
                "precision": "fp32",
                "logEverySteps": 1,
                "evaluation": {"everySteps": 5},
            },
            "deepspeed": {"zeroStage": 2},
            "resources": {"nodes": 2, "processesPerNode": 1},
            "checkpoint": {"everySteps": 5, "keepLast": 2},
        },
    }


@dataclass
class LiveRun:
    """What one real run showed: panel problems (empty = every panel had data) and live /metrics texts."""

    problems: list[str] = field(default_factory=list)
    expositions: dict[str, str] = field(default_factory=dict)


@pytest.fixture(scope="module")
def live_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveRun]:
    """Train for real (2 local ranks) while the real operator reconciles the same job on the emulator and a
    real Prometheus scrapes both, until every panel has data (or the deadline passes)."""
    kopf = pytest.importorskip("kopf")
    from rich.console import Console

    from kubetune_operator.localrun import LocalRun, RunOptions, localize_job
    from kubetune_operator.main import start_in_thread
    from kubetune_operator.settings import OperatorSettings
    from kubetune_trainer.spec import FineTuneJob
    from tests.support.cluster import FakeCluster
    from tests.support.kube import EmulatorServer, wait_for

    tmp_path = tmp_path_factory.mktemp("real-run")
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("PYTHONPATH", f"{REPO / 'operator'}:{REPO / 'trainer_image'}:{REPO}")
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        manifest = _training_manifest(tmp_path)
        options = RunOptions(storage=tmp_path / "run")
        job, storage = localize_job(FineTuneJob.model_validate(manifest), options)
        run = LocalRun(job, storage, Console(quiet=True), options)
        result = LiveRun()
        with EmulatorServer([LABELS["namespace"]]) as cluster:
            client = cluster.client()
            controller = FakeCluster(client).start(interval=0.2)
            settings = OperatorSettings(
                default_checkpoint_uri="s3://ckpt",
                metrics_port=_free_port(),
                health_port=_free_port(),
                peering_priority=10,
                resync_interval_seconds=1.0,
                progress_interval_seconds=1.0,
            )
            operator = start_in_thread(settings, connection=kopf.ConnectionInfo(server=cluster.url))
            try:
                operator.wait_ready(60)
                # The operator reconciles the same job (its pods are played by the fake cluster).
                client.create("kubetune.io/v1alpha1", "finetunejobs", LABELS["namespace"], manifest)
                run.start()
                trainer = [f"127.0.0.1:{pod.launch.metrics_port}" for pod in run.pods]
                targets = {TRAINER_SCRAPE_JOB: trainer, OPERATOR_SCRAPE_JOB: [f"127.0.0.1:{settings.metrics_port}"]}
                with run_prometheus(targets, LABELS) as prometheus:
                    wait_for(
                        lambda: (
                            (client.ftj(LABELS["namespace"], LABELS["job_name"]) or {}).get("status", {}).get("phase")
                            == "Running"
                        ),
                        120,
                        what="the operator's job Running",
                    )
                    deadline = time.monotonic() + DEADLINE_SECONDS
                    result.problems = ["not checked yet"]
                    while result.problems and time.monotonic() < deadline:
                        exited = [pod.exit_code for pod in run.pods if pod.exit_code is not None]
                        assert not exited, f"the training run ended early ({exited}): see {storage / '.local'}"
                        time.sleep(3)
                        result.problems = panel_problems(prometheus, LABELS)
                    for address in [*trainer, *targets[OPERATOR_SCRAPE_JOB]]:
                        with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
                            result.expositions[address] = response.read().decode()
            finally:
                if run.pods:
                    run.stop(60)
                operator.stop()
                controller.stop()
        yield result


def test_every_panel_has_data_from_a_real_run_and_operator(live_run: LiveRun) -> None:
    assert live_run.problems == [], f"{len(live_run.problems)} panels without data:\n  " + "\n  ".join(
        live_run.problems
    )


def test_live_metrics_pass_promtool_and_have_bounded_labels(live_run: LiveRun) -> None:
    """The live /metrics of each trainer pod and of the operator."""
    assert len(live_run.expositions) == 3
    for address, text in live_run.expositions.items():
        assert_bounded_labels(text)
        if PROMTOOL:
            check = subprocess.run(
                [PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, check=False
            )
            assert (check.stdout + check.stderr).strip() == "", f"{address}: {check.stdout}{check.stderr}"
