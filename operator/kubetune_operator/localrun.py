"""``kubetune run``: run a FineTuneJob on this machine by the same path as in a cluster.

The job is resolved as the operator resolves it, with local settings; the
operator's builders produce the ConfigMap, Service and attempt Job; each pod of
the Job is started as a local process group (:mod:`kubetune_operator.localpods`)
with rank 0 on 127.0.0.1, and a failed attempt goes through the operator's
failure policy (:func:`~kubetune_operator.reconcile.failure_verdict`).  A progress
bar is fed by rank 0's metrics endpoint.
Ctrl-C sends SIGTERM to every pod, so the trainers commit a checkpoint and exit;
running the same command again resumes from it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from kubetune_operator import names
from kubetune_operator.builders import desired_children
from kubetune_operator.failures import Verdict, classify_failure, failure_verdict
from kubetune_operator.localpods import (
    LocalLayout,
    LocalPod,
    free_port,
    gpu_shortage,
    local_base_env,
    materialize_volumes,
    plan_pod,
    visible_gpus,
)
from kubetune_operator.observe import AttemptState, PodState
from kubetune_operator.progress import parse_progress
from kubetune_operator.resolve import InvalidSpec, ResolvedJob, resolve_job
from kubetune_operator.settings import OperatorSettings
from kubetune_operator.validate import Problem, load_documents, validate_files
from kubetune_trainer.spec import GPU_RESOURCE, FineTuneJob
from kubetune_trainer.spec._base import STORAGE_URI_PATTERN
from kubetune_trainer.spec.termination import TerminationMessage

LOCAL_IMAGE = "local"
INTERRUPTED_EXIT = 130
NO_ROOM_EXIT = 1  # the job does not fit this machine (as for an invalid manifest: nothing started)
FAILED_POD_GRACE_SECONDS = 10.0


@dataclass(frozen=True)
class RunOptions:
    """Command-line overrides of ``kubetune run``."""

    nodes: int | None = None
    processes_per_node: int | None = None
    storage: Path | None = None  # default ./runs/<name>
    poll_seconds: float = 1.0


def local_settings() -> OperatorSettings:
    """The operator settings of a run on this machine: the local image, no cluster defaults
    (explicit Nones, so KUBETUNE_* variables meant for an operator do not apply)."""
    return OperatorSettings(
        default_image=LOCAL_IMAGE,
        default_checkpoint_uri=None,
        default_output_uri=None,
        checkpoint_endpoint=None,
        credentials_secret=None,
        standalone=True,
    )


def localize_job(job: FineTuneJob, options: RunOptions) -> tuple[ResolvedJob, Path]:
    """The job as it runs here, resolved like the operator resolves it but with local settings:
    node/process overrides, checkpoints in a local directory and the output below them (cluster
    endpoints, Secrets and images do not apply on this machine)."""
    storage = (options.storage or Path("runs") / job.metadata.name).resolve()
    if not re.match(STORAGE_URI_PATTERN, f"file://{storage}"):
        raise InvalidSpec(
            "--storage",
            f"the storage folder {storage} (default ./runs/<name>) cannot hold checkpoints: a checkpoint URI "
            "takes letters, digits and . _ ~ / % + = , : - only (no spaces); pass --storage with such a path",
        )
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
    output = spec.output.model_copy(update={"uri": None})
    local_spec = spec.model_copy(update={"resources": resources, "checkpoint": checkpoint, "output": output})
    wire = job.model_copy(update={"spec": local_spec}).to_wire()
    wire["metadata"]["uid"] = local_job_uid(storage, wire["spec"])
    # Re-validate: overrides must obey the same rules as the manifest.
    return resolve_job(FineTuneJob.model_validate(wire), local_settings()), storage


def local_job_uid(storage: Path, spec: Mapping[str, Any]) -> str:
    """The uid ``kubetune run`` gives a job, where no API server assigns one: the same for the same spec
    in the same storage folder, so a run started again resumes its own checkpoints, as a cluster job's
    next attempt does (whatever ``checkpoint.resume`` says).  An edited spec is another job, as an
    edited manifest is in a cluster (deleted and re-created): it meets the old checkpoints through
    ``checkpoint.resume`` (compatible fields resume; another model fails with a clear message)."""
    canonical = json.dumps(spec, sort_keys=True, separators=(",", ":"))
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"kubetune-run:{storage}:{canonical}"))


def read_progress(port: int, now: datetime) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """``(progress, checkpoint)`` from rank 0's metrics endpoint, or None while it is not up."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            text = response.read().decode()
    except (urllib.error.URLError, OSError):
        return None
    return parse_progress(text, now)


def bar_fields(progress: dict[str, Any]) -> dict[str, Any]:
    """The progress bar's fields for what ``progress`` states; a field it leaves out keeps its value
    (a restarted attempt's pods loading state no step, loss or rate yet)."""
    fields: dict[str, Any] = {}
    if "step" in progress:
        total = progress.get("totalSteps")
        fields |= {"completed": progress["step"], "steps": f"{progress['step']}/{total or '?'}"}
        if total:
            fields["total"] = total
    if "loss" in progress:
        fields["loss"] = f"{progress['loss']:.4f}"
    if "samplesPerSecond" in progress:
        fields["rate"] = str(progress["samplesPerSecond"])
    if "eta" in progress:
        fields["eta"] = str(progress["eta"])[11:19]
    return fields


def phase_of(progress: Mapping[str, Any] | None) -> str:
    """What the job is doing while the bar has no step to show, from a read of rank 0's endpoint (None:
    not up yet); empty while it trains, when the steps say it (and the line keeps its width).

    ``starting``: Python, torch and DeepSpeed start and the ranks meet (the first run on a machine also
    builds DeepSpeed's ops); ``loading``: the backbone, the data and the checkpoint; ``finishing``: the
    last step is done (final evaluation, last checkpoint, publishing)."""
    if progress is None:
        return "starting"
    if "step" not in progress:
        return "loading"
    total = progress.get("totalSteps")
    return "finishing" if total and progress["step"] >= total else ""


def _summary_table(job: ResolvedJob, message: TerminationMessage | None, wall_seconds: float) -> Table:
    table = Table(title="kubetune run", show_header=False)
    message = message or TerminationMessage(reason="Succeeded")
    for metric, value in sorted((message.evaluation or {}).items()):
        table.add_row(f"eval {metric}", f"{value:.4f}")
    table.add_row("output", message.output.uri if message.output else job.output_uri)
    if message.checkpoint and message.checkpoint.step is not None:
        step = message.checkpoint.step
        table.add_row("checkpoint", f"{job.checkpoint_step_uri(step)} (step {step})")
    if message.step is not None:
        table.add_row("steps", str(message.step))
    table.add_row("wall time", f"{wall_seconds:.0f} s")
    return table


class LocalRun:
    """One ``kubetune run``: start an attempt's pods, follow them, restart or stop them as the operator would."""

    def __init__(
        self, job: ResolvedJob, storage: Path, console: Console, options: RunOptions, gpus: list[str] | None = None
    ) -> None:
        self.job = job
        self.storage = storage
        self.console = console
        self.options = options
        self.gpus = gpus  # this machine's GPUs the pods are given from (None: no NVIDIA driver here)
        self.pods: list[LocalPod] = []
        self.attempt = 1
        self.restarts = 0
        self.preemptions = 0

    def start(self, attempt: int = 1) -> None:
        """Build attempt ``attempt``'s children with the operator's builders and start every pod."""
        self.attempt = attempt
        config_map, _service, attempt_job = desired_children(self.job, attempt=attempt)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        layout = LocalLayout(
            root=self.storage / ".local" / (stamp if attempt == 1 else f"{stamp}.{attempt}"),
            host_aliases={names.master_address(self.job.name, attempt): "127.0.0.1"},
            port_map={self.job.rendezvous_port: free_port()},
            config_maps={config_map["metadata"]["name"]: config_map["data"]},
            base_env=self._base_env(),
            gpus=self.gpus,
        )
        pod_spec = attempt_job["spec"]["template"]["spec"]
        self.pods = []
        for index in range(self.job.spec.resources.nodes):
            launch = plan_pod(pod_spec, attempt_job["metadata"]["name"], index, layout)
            materialize_volumes(pod_spec, launch, layout)
            log = layout.root / f"{launch.name}.log"
            self.pods.append(LocalPod(launch, log_path=log, cwd=Path.cwd()))
        self.console.print(f"logs: {layout.root}/*.log", markup=False)

    def _base_env(self) -> dict[str, str]:
        return local_base_env(self.job.spec.resources.nodes)

    def follow(self) -> int:
        """Show progress until the job ends; the run's exit code.

        A failed attempt goes through the operator's failure policy: the gang stops (as the Job's
        podFailurePolicy stops it), and a retryable failure restarts it as the next attempt after
        ``backoffSeconds``, resuming from the latest checkpoint, until ``maxRestarts`` are used."""
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
            task = bar.add_task(self._title("starting"), total=None, steps="-", loss="-", rate="-", eta="-")
            while (failed := self._watch_attempt(bar, task)) is not None:
                verdict = self._judge(failed)
                if not verdict.restart:
                    return self._exit_code(failed)
                if verdict.preempted:
                    self.preemptions += 1
                else:
                    self.restarts += 1
                time.sleep(0 if verdict.preempted else self.job.spec.run_policy.backoff_seconds)
                self.start(self.attempt + 1)
                bar.update(task, description=self._title("starting"))
            message = TerminationMessage.parse(self.pods[0].termination_message())
            if message is not None and message.step is not None:  # the last read may predate the last step
                bar.update(task, **bar_fields({"step": message.step, "totalSteps": bar.tasks[0].total}))
            bar.update(task, description=self._title(""))
        self.console.print(_summary_table(self.job, message, time.monotonic() - started))
        return 0

    def _title(self, phase: str) -> str:
        # The phase joins the job's name rather than taking a column: the line keeps its width.
        return f"{self.job.name} {phase}" if phase else self.job.name

    def _watch_attempt(self, bar: Progress, task: Any) -> AttemptState | None:
        """Follow the current attempt until every pod succeeded (None) or one failed (the attempt then)."""
        while True:
            codes = [pod.exit_code for pod in self.pods]
            for pod, code in zip(self.pods, codes, strict=True):
                if code is None:
                    pod.remember_descendants()
            if any(code not in (None, 0) for code in codes):
                return self._attempt_state()
            if all(code == 0 for code in codes):
                return None
            found = read_progress(self.pods[0].launch.metrics_port, datetime.now(UTC))
            fields = bar_fields(found[0]) if found else {}
            bar.update(task, description=self._title(phase_of(found[0] if found else None)), **fields)
            time.sleep(self.options.poll_seconds)

    def _attempt_state(self) -> AttemptState:
        """The local pods as the operator observes an attempt (exit codes, termination messages)."""
        pods = tuple(_pod_state(pod) for pod in self.pods)
        return AttemptState(
            attempt=self.attempt,
            name=names.job_name_for(self.job.name, self.attempt),
            owned=True,
            stale_owner=False,
            suspended=False,
            queued=False,
            active=sum(1 for pod in pods if pod.running),
            succeeded=sum(1 for pod in pods if pod.phase == "Succeeded"),
            complete=False,
            failed=True,
            failed_reason=None,
            failed_message=None,
            completion_time=None,
            deleting=False,
            pods=pods,
        )

    def _judge(self, failed: AttemptState) -> Verdict:
        """Stop the gang and tell the user what the operator's failure policy decided."""
        self.stop(FAILED_POD_GRACE_SECONDS)
        verdict = failure_verdict(
            self.job.spec.run_policy, self.attempt, self.restarts, classify_failure(failed), self.preemptions
        )
        word = "restarting" if verdict.restart else "failed"
        self.console.print(f"[red]{word}[/red] ({verdict.reason}): {verdict.message}", soft_wrap=True)
        return verdict

    @staticmethod
    def _exit_code(failed: AttemptState) -> int:
        code = classify_failure(failed).exit_code
        return code if code else 1

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


def _pod_state(pod: LocalPod) -> PodState:
    """A local pod as the operator's observer distils a Kubernetes pod (a signal -N reads 128+N)."""
    code = pod.exit_code
    if code is not None and code < 0:
        code = 128 - code
    text = pod.termination_message() if code is not None else ""
    phase = "Running" if code is None else ("Succeeded" if code == 0 else "Failed")
    return PodState(
        name=pod.launch.name,
        index=pod.launch.index,
        phase=phase,
        exit_code=code,
        reason=None,
        message=TerminationMessage.parse(text),
        raw_message=text,
        ip="127.0.0.1",
        deleting=False,
    )


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
    spec = local_job.spec
    console.print(
        f"{local_job.name}: {spec.strategy.type} on {spec.model.source}, "
        f"{spec.resources.nodes} node(s) x {spec.resources.processes()} process(es), storage {storage}",
        markup=False,
    )
    gpus = visible_gpus(os.environ)
    shortage = gpu_shortage(spec.resources.nodes, spec.resources.gpus_per_node(), gpus)
    if shortage:
        console.print(f"{local_job.name}: {shortage}", markup=False, soft_wrap=True)
        return NO_ROOM_EXIT
    if gpus and not spec.resources.gpus_per_node():
        console.print(
            f"note: the job requests no {GPU_RESOURCE}, so its pods train on the CPU here as in a cluster; "
            f"set spec.resources.requests.{GPU_RESOURCE} to train on this machine's {len(gpus)} GPU(s)",
            markup=False,
            soft_wrap=True,
        )
    run = LocalRun(local_job, storage, console, options, gpus)
    try:
        run.start()
        return run.follow()
    except KeyboardInterrupt:
        return run.interrupt()
