"""The full chain: FineTuneJob → operator (kopf) → Jobs → pods as local processes → S3 → status.

The operator runs for real against the kmock Kubernetes emulator over HTTP; the
fake cluster (``tests/support/cluster.py``) schedules every pod of the operator's
Jobs and its kubelet runs each as local processes, exactly as specified
(:class:`~tests.support.runtimes.ProcessRuntime`); checkpoints, data, the backbone
and the published model live in moto's S3 server on loopback.  Nothing of kubetune
is stubbed: the trainer processes are the real ones, started by the real launcher.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kubetune_operator.main import OperatorHandle
from tests.e2e.conftest import NAMESPACE, TIMEOUT, attempt_jobs, conditions, finetune_job, follow
from tests.support.kube import Client
from tests.support.runtimes import ProcessRuntime
from tests.support.s3 import S3Endpoint

pytestmark = pytest.mark.e2e

LOAD_WITH_PEFT = """
import json, sys
for blocked in ("kubetune_trainer", "kubetune_operator"):
    sys.modules[blocked] = None  # the published adapter must load without kubetune
import torch, transformers
from peft import PeftModel
base, output = sys.argv[1], sys.argv[2]
model = transformers.AutoModelForSequenceClassification.from_pretrained(base, num_labels=2)
model = PeftModel.from_pretrained(model, output).eval()
tokenizer = transformers.AutoTokenizer.from_pretrained(output)
batch = tokenizer(["the film was great", "the plot was awful"], return_tensors="pt", padding=True)
with torch.no_grad():
    print(json.dumps(model(**batch).logits.tolist()))
"""


def test_job_trains_checkpoints_and_publishes(
    operator: OperatorHandle, client: Client, s3: S3Endpoint, assets: dict[str, Path], tmp_path: Path
) -> None:
    client.create("kubetune.io/v1alpha1", "finetunejobs", NAMESPACE, finetune_job("sentiment"))
    seen = follow(client, "sentiment", {"Succeeded", "Failed"})
    final = seen[-1]
    assert final["phase"] == "Succeeded", json.dumps(final, indent=1)
    phases = [s.get("phase") for s in seen if s.get("phase")]
    assert "Running" in phases
    assert phases.index("Running") < phases.index("Succeeded")
    assert conditions(final)["Created"]["status"] == "True"
    assert conditions(final)["Succeeded"]["status"] == "True"
    running = [s.get("progress") or {} for s in seen if s.get("phase") == "Running"]
    assert any(p.get("step") for p in running), "status.progress stayed empty while the job ran"
    # While the trainer loaded, its gauges read 0: the status states no step 0 loss, and never steps back.
    assert all(p["step"] >= 1 for p in running if "loss" in p), running
    steps = [p["step"] for p in running if "step" in p]
    assert steps == sorted(steps), steps
    assert final["restarts"] == 0
    assert final.get("completionTime")
    assert attempt_jobs(client, "sentiment") == ["sentiment-a1"]

    # The output in S3 loads with plain peft, and its evaluation is the one in the status.
    output_uri = final["output"]["uri"]
    prefix = output_uri.removeprefix(f"s3://{s3.bucket}/").rstrip("/") + "/"
    local = tmp_path / "published"
    for key in s3.keys(prefix):
        target = local / key[len(prefix) :]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(s3.read(key))
    published = json.loads((local / "kubetune-metrics.json").read_text())
    assert published["evaluation"] == final["evaluation"]
    # The pods' OMP_NUM_THREADS=1 (the runtime fixture): neither the launcher nor the trainer overrides it.
    assert published["cpuThreadsPerRank"] == 1
    assert final["evaluation"]["accuracy"] >= 0.0
    loaded = subprocess.run(
        [sys.executable, "-I", "-c", LOAD_WITH_PEFT, str(assets["model"]), str(local)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    logits = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert len(logits) == 2
    assert len(logits[0]) == 2
    # The checkpoints are in S3 too, committed with a manifest.
    latest = s3.read(f"checkpoints/{NAMESPACE}/sentiment/checkpoints/LATEST").decode().strip()
    assert f"checkpoints/{NAMESPACE}/sentiment/checkpoints/{latest}/MANIFEST.json" in s3.keys(
        f"checkpoints/{NAMESPACE}/sentiment/checkpoints/{latest}/"
    )
    # status.checkpoint.uri has one meaning while the job runs and after it succeeded: the step folder.
    folders = s3.uri(f"checkpoints/{NAMESPACE}/sentiment/checkpoints")
    assert final["checkpoint"]["uri"] == f"{folders}/{latest}"
    while_running = {s["checkpoint"]["uri"] for s in seen if s.get("phase") == "Running" and s.get("checkpoint")}
    assert all(uri.rsplit("/", 1)[0] == folders for uri in while_running), while_running


def test_killed_pod_restarts_the_gang_and_resumes(
    operator: OperatorHandle, client: Client, runtime: ProcessRuntime, s3: S3Endpoint, assets: dict[str, Path]
) -> None:
    client.create("kubetune.io/v1alpha1", "finetunejobs", NAMESPACE, finetune_job("faulty", max_steps=48))
    checkpoints = f"checkpoints/{NAMESPACE}/faulty/checkpoints/"
    deadline = time.monotonic() + TIMEOUT
    while f"{checkpoints}LATEST" not in s3.keys(checkpoints):
        assert time.monotonic() < deadline, "no checkpoint was committed"
        assert client.ftj(NAMESPACE, "faulty").get("status", {}).get("phase") != "Failed"
        time.sleep(0.5)
    committed = int(s3.read(f"{checkpoints}LATEST").decode().strip().rsplit("-", 1)[-1])
    runtime.pod("faulty-a1", 1).signal(signal.SIGKILL)  # the whole pod dies at once (an OOM kill)

    seen = follow(client, "faulty", {"Succeeded", "Failed"})
    final = seen[-1]
    assert final["phase"] == "Succeeded", json.dumps(final, indent=1)
    assert final["restarts"] == 1
    assert final["attempt"] == 2
    # The Restarting phase lasts only the backoff (1 s), so polling may miss it; the Event
    # and the Restarting condition (now False, with its transition time) stay.
    events = [
        e
        for e in client.list("v1", "events", NAMESPACE)
        if e.get("involvedObject", {}).get("name") == "faulty" and e.get("reason") == "RestartScheduled"
    ]
    assert events, "no RestartScheduled event for the failed attempt"
    assert "attempt 1 failed" in events[0]["message"]
    assert events[0]["type"] == "Warning"
    assert "Restarting" in conditions(final)
    assert attempt_jobs(client, "faulty") == ["faulty-a2"]  # attempt 1 was deleted before attempt 2
    # Attempt 2 resumed from a committed checkpoint at or after the one seen before the kill.
    log = "\n".join(p.read_text(errors="replace") for p in (runtime.root / "faulty-a2").glob("*.log"))
    resumed = [line for line in log.splitlines() if "resum" in line.lower() and "step-" in line]
    assert resumed, f"attempt 2 does not say which checkpoint it resumed from:\n{log[-3000:]}"
    resumed_step = int(resumed[0].split("step-")[1][:8])
    assert resumed_step >= committed
    assert final["checkpoint"]["step"] >= resumed_step


def test_missing_dataset_fails_permanently_with_the_path(
    operator: OperatorHandle, client: Client, assets: dict[str, Path]
) -> None:
    """The backbone is there (``assets``); only the training file is missing."""
    missing = "s3://kubetune-e2e/data/does-not-exist.jsonl"
    client.create("kubetune.io/v1alpha1", "finetunejobs", NAMESPACE, finetune_job("missing-data", train=missing))
    seen = follow(client, "missing-data", {"Succeeded", "Failed"})
    final = seen[-1]
    assert final["phase"] == "Failed", json.dumps(final, indent=1)
    failed = conditions(final)["Failed"]
    assert "does-not-exist.jsonl" in failed["message"]
    assert final["restarts"] == 0
    time.sleep(3)  # no attempt 2 appears later either
    assert attempt_jobs(client, "missing-data") == ["missing-data-a1"]
