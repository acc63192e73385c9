"""``kubetune run``: run a FineTuneJob on this machine by the same path as in a cluster.

The operator's builders produce the ConfigMap, Service and attempt Job; each pod
of the Job is started as a local process group (:mod:`kubetune_operator.localpods`)
with rank 0 on 127.0.0.1.  A progress bar is fed by rank 0's metrics endpoint.
Ctrl-C sends SIGTERM to every pod, so the trainers commit a checkpoint and exit;
running the same command again resumes from it.
"""

from __future__ import annotations

import json
import signal
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from kubetune_operator import names
from kubetune_operator.builders import desired_children
from kubetune_operator.localpods import (
    LocalLayout,
    LocalPod,
    free_port,
    local_base_env,
    materialize_volumes,
    plan_pod,
)
from kubetune_operator.progress import parse_progress
from kubetune_operator.settings import OperatorSettings
from kubetune_operator.validate import Problem, load_documents, validate_files
from kubetune_trainer.spec import FineTuneJob
from kubetune_trainer.spec import runtime as rt
from kubetune_trainer.spec.job import GPU_RESOURCE

LOCAL_IMAGE = "local"
INTERRUPTED_EXIT = 130
FAILED_POD_GRACE_SECONDS = 10.0


@dataclass(frozen=True)
class RunOptions:
    """Command-line overrides of ``kubetune run``."""

    nodes: int | None = None
    processes_per_node: int | None = None
    storage: Path | None = None  # default ./runs/<name>
    poll_seconds: float = 1.0


def localize_job(job: FineTuneJob, options: RunOptions) -> tuple[FineTuneJob, Path]:
    """The job as it runs here: node/process overrides, and checkpoints and output in a
    local directory (cluster endpoints and Secrets do not apply on this machine)."""
    storage = (options.storage or Path("runs") / job.metadata.name).resolve()
    spec = job.spec
    processes = options.processes_per_node or spec.resources.processes()
    # One local process per GPU of the pod: an override of the process count moves the GPU count with it.
    requests, limits = dict(spec.resources.requests), dict(spec.resources.limits)
    for quantities in (requests, limits):
        if spec.resources.gpus_per_node() and GPU_RESOURCE in quantities:
            quantities[GPU_RESOURCE] = processes
    resources = spec.resources.model_copy(
        update={
            "nodes": options.nodes or spec.resources.nodes,
            "processes_per_node": processes,
            "image": LOCAL_IMAGE,
            "requests": requests,
            "limits": limits,
        }
    )
    checkpoint = spec.checkpoint.model_copy(
        update={"uri": f"file://{storage}", "endpoint": None, "credentials_secret": None, "region": None}
    )
    output = spec.output.model_copy(update={"uri": f"file://{storage}/output"})
    local_spec = spec.model_copy(update={"resources": resources, "checkpoint": checkpoint, "output": output})
    local = job.model_copy(update={"spec": local_spec})
    # Re-validate: overrides must obey the same rules as the manifest.
    return FineTuneJob.model_validate(local.to_wire()), storage


def read_progress(port: int, now: datetime) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """``(progress, checkpoint)`` from rank 0's metrics endpoint, or None while it is not up."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            text = response.read().decode()
    except (urllib.error.URLError, OSError):
        return None
    return parse_progress(text, now)


def _summary_table(message: dict[str, Any], wall_seconds: float) -> Table:
    table = Table(title="kubetune run", show_header=False)
    for metric, value in sorted((message.get("evaluation") or {}).items()):
        table.add_row(f"eval {metric}", f"{value:.4f}" if isinstance(value, float) else str(value))
    output = message.get("output") or {}
    if output:
        table.add_row("output", str(output.get("uri", output) if isinstance(output, dict) else output))
    checkpoint = message.get("checkpoint") or {}
    if checkpoint:
        table.add_row("checkpoint", f"{checkpoint.get('uri', '')} (step {checkpoint.get('step')})")
    if "step" in message:
        table.add_row("steps", str(message["step"]))
    table.add_row("wall time", f"{wall_seconds:.0f} s")
    return table


class LocalRun:
    """One ``kubetune run``: start the pods, follow them, stop them."""

    def __init__(self, job: FineTuneJob, storage: Path, console: Console, options: RunOptions) -> None:
        self.job = job
        self.storage = storage
        self.console = console
        self.options = options
        self.pods: list[LocalPod] = []

    def start(self) -> None:
        """Build the children with the operator's builders and start every pod."""
        settings = OperatorSettings(default_image=LOCAL_IMAGE, standalone=True)
        config_map, _service, attempt_job = desired_children(self.job, settings, attempt=1)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        layout = LocalLayout(
            root=self.storage / ".local" / stamp,
            host_aliases={names.master_address(self.job.metadata.name, 1): "127.0.0.1"},
            port_map={rt.RENDEZVOUS_PORT: free_port()},
            config_maps={config_map["metadata"]["name"]: config_map["data"]},
            base_env=self._base_env(),
        )
        pod_spec = attempt_job["spec"]["template"]["spec"]
        for index in range(self.job.spec.resources.nodes):
            launch = plan_pod(pod_spec, attempt_job["metadata"]["name"], index, layout)
            materialize_volumes(pod_spec, launch, layout)
            log = layout.root / f"{launch.name}.log"
            self.pods.append(LocalPod(launch, log_path=log, cwd=Path.cwd()))
        self.console.print(f"logs: {layout.root}/*.log", markup=False)

    def _base_env(self) -> dict[str, str]:
        resources = self.job.spec.resources
        return local_base_env(resources.nodes * resources.processes())

    def follow(self) -> int:
        """Show progress until every pod exits; the run's exit code."""
        started = time.monotonic()
        with Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[steps]} steps"),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[rate]} samples/s"),
            TextColumn("done ~{task.fields[eta]}"),
            TimeElapsedColumn(),
            console=self.console,
            transient=False,
        ) as bar:
            task = bar.add_task(self.job.metadata.name, total=None, steps="-", loss="-", rate="-", eta="-")
            while True:
                codes = [pod.exit_code for pod in self.pods]
                for pod, code in zip(self.pods, codes, strict=True):
                    if code is None:
                        pod.remember_descendants()
                failed = [pod for pod, code in zip(self.pods, codes, strict=True) if code not in (None, 0)]
                if failed:
                    return self._fail(failed[0])
                if all(code == 0 for code in codes):
                    break
                found = read_progress(self.pods[0].launch.metrics_port, datetime.now(UTC))
                if found:
                    progress, _checkpoint = found
                    bar.update(
                        task,
                        total=progress.get("totalSteps"),
                        completed=progress.get("step", 0),
                        steps=f"{progress.get('step', 0)}/{progress.get('totalSteps', '?')}",
                        loss=f"{progress['loss']:.4f}" if "loss" in progress else "-",
                        rate=str(progress.get("samplesPerSecond", "-")),
                        eta=str(progress.get("eta", "-"))[11:19] or "-",
                    )
                time.sleep(self.options.poll_seconds)
        message = self._success_message()
        self.console.print(_summary_table(message, time.monotonic() - started))
        return 0

    def _success_message(self) -> dict[str, Any]:
        text = self.pods[0].termination_message()
        try:
            parsed = json.loads(text) if text else {}
        except json.JSONDecodeError:
            parsed = {}
        return parsed if isinstance(parsed, dict) else {}

    def _fail(self, pod: LocalPod) -> int:
        code = pod.exit_code or 1
        reason = pod.termination_message() or f"exit code {code}"
        self.stop(FAILED_POD_GRACE_SECONDS)
        kind = "permanent" if rt.is_permanent_failure(code) else "retryable"
        self.console.print(f"[red]failed[/red] ({pod.launch.name}, exit code {code}, {kind}): {reason}")
        return code if code > 0 else 128 - code

    def stop(self, grace_seconds: float) -> None:
        """SIGTERM every pod at once, then wait (SIGKILL after the grace period)."""
        for pod in self.pods:
            pod.signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_seconds
        for pod in self.pods:
            pod.stop(max(0.1, deadline - time.monotonic()))

    def interrupt(self) -> int:
        """Ctrl-C: let the trainers checkpoint and exit, then tell the user how to resume."""
        self.console.print("interrupted: asking the trainers to checkpoint and stop ...")
        self.stop(float(self.job.spec.run_policy.termination_grace_period_seconds))
        codes = {pod.launch.name: pod.exit_code for pod in self.pods}
        self.console.print(
            f"stopped {codes}; run the same command again to resume from the last checkpoint",
            markup=False,
            soft_wrap=True,
        )
        return INTERRUPTED_EXIT


def load_job(path: Path) -> tuple[list[Problem], FineTuneJob | None]:
    """The one FineTuneJob in ``path``, or the problems that stop it from running."""
    problems = validate_files([path])
    if problems:
        return problems, None
    documents = [document for _source, document in load_documents(path)]
    if len(documents) != 1:
        return [Problem(str(path), "", f"expected exactly one FineTuneJob document, found {len(documents)}")], None
    return [], FineTuneJob.model_validate(documents[0])


def run_job(job: FineTuneJob, options: RunOptions, console: Console) -> int:
    """Run ``job`` locally; returns the process exit code for the CLI."""
    local_job, storage = localize_job(job, options)
    console.print(
        f"{local_job.metadata.name}: {local_job.spec.strategy.type.value} on {local_job.spec.model.source}, "
        f"{local_job.spec.resources.nodes} node(s) x {local_job.spec.resources.processes()} process(es), "
        f"storage {storage}",
        markup=False,
    )
    run = LocalRun(local_job, storage, console, options)
    try:
        run.start()
        return run.follow()
    except KeyboardInterrupt:
        return run.interrupt()
