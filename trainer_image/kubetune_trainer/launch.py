"""``python -m kubetune_trainer.launch``: torchrun in-process, with our exit codes.

Plain torchrun turns every worker failure into exit 1 and a SIGTERM into a
``SignalException`` after giving the workers only 30 s.  The operator needs the
workers' own codes (10-13 are permanent, 21 means "preempted after a committed
checkpoint") and the workers need the whole grace period to save a checkpoint,
so this launcher

* takes SIGTERM away from torchrun's agent and forwards it to the workers,
  which finish their step, checkpoint and exit 21 (see ``loop.py``);
* gives each rank an equal share of the CPUs the pod may use (``OMP_NUM_THREADS``,
  unless the pod sets it), shared with the job's other pods on the same machine
  under ``kubetune run`` (see ``cpus.py``);
* runs ``torch.distributed.run.main(argv)`` and maps its outcome to one code.

The argv is torchrun's, e.g. ``--nnodes=2 --nproc-per-node=8 --node-rank=0
--master-addr=HOST --master-port=29500 -m kubetune_trainer --config FILE``.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import psutil

from kubetune_trainer.cpus import pod_threads_per_rank
from kubetune_trainer.errors import read_termination_message, write_termination
from kubetune_trainer.spec.runtime import ExitCode, is_permanent_failure
from kubetune_trainer.spec.termination import PREEMPTED, TerminationMessage

# torchrun's agent registers handlers for these; SIGTERM is left to us.
AGENT_SIGNALS = "SIGINT,SIGHUP,SIGQUIT"


def exit_code_for(
    worker_codes: Iterable[int], *, sigterm: bool, termination: TerminationMessage | Mapping[str, Any] | None
) -> int:
    """The launcher's exit code from the workers' exit codes (pure).

    Permanent worker codes win (the spec or data is wrong whatever else
    happened); after a SIGTERM the result is PREEMPTED only when a checkpoint
    was committed (the termination log says ``Preempted``), otherwise
    RETRYABLE; any other failure — a crash, a signal, an OOM kill — is
    retryable.  ``termination`` may also be the message's JSON object.
    """
    if termination is not None and not isinstance(termination, TerminationMessage):
        termination = TerminationMessage.model_validate(termination)
    codes = list(worker_codes)
    if codes and all(code == 0 for code in codes):
        return ExitCode.SUCCESS
    permanent = [code for code in codes if is_permanent_failure(code)]
    if permanent:
        return min(permanent)
    preempted = termination is not None and termination.reason == PREEMPTED
    if ExitCode.PREEMPTED in codes and (preempted or not sigterm):
        return ExitCode.PREEMPTED
    if sigterm and preempted:
        return ExitCode.PREEMPTED
    return ExitCode.RETRYABLE


@dataclass
class _SigtermForwarder:
    """Forwards SIGTERM to the worker processes instead of killing them after 30 s."""

    received: bool = False
    forwarded_to: list[int] = field(default_factory=list)

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        first = not self.received
        self.received = True
        children = psutil.Process().children(recursive=False)
        if not children:
            # Still in rendezvous: no worker to checkpoint, leave as retryable.
            raise SystemExit(ExitCode.RETRYABLE)
        if not first:
            return  # the workers already know; a second SIGTERM must not interrupt their save
        for child in children:
            try:
                child.send_signal(signal.SIGTERM)
                self.forwarded_to.append(child.pid)
            except psutil.Error:
                pass


def _failure_codes(error: Any) -> list[int]:
    return [int(failure.exitcode) for failure in error.failures.values()]


def _ranks_per_node(torchrun_args: Sequence[str]) -> int:
    """The ``--nproc-per-node`` of torchrun's argv as a number (1 when torchrun would reject the argv)."""
    from torch.distributed.run import determine_local_world_size, parse_args

    try:
        with contextlib.redirect_stderr(io.StringIO()):  # torchrun itself reports a bad argv, once
            parsed = parse_args(list(torchrun_args))  # type: ignore[no-untyped-call]
            return int(determine_local_world_size(parsed.nproc_per_node))
    except (SystemExit, ValueError):
        return 1


def default_threads(torchrun_args: Sequence[str], environ: Mapping[str, str], cpus: int | None = None) -> int:
    """``OMP_NUM_THREADS`` for a pod that sets none: the CPUs it may use (``cpus``, default
    :func:`~kubetune_trainer.cpus.available_cpus`) split between its ranks and those of the job's
    other pods on this machine (``KUBETUNE_PODS_SHARING_CPUS``, set by ``kubetune run``)."""
    return pod_threads_per_rank(_ranks_per_node(torchrun_args), environ, cpus)


def main(argv: Sequence[str] | None = None) -> int:
    """Run torchrun with ``argv`` and return the exit code the pod should end with."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    args = list(sys.argv[1:] if argv is None else argv)
    os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = AGENT_SIGNALS
    # torchrun reads its --signals-to-handle default from PET_SIGNALS_TO_HANDLE; without it the
    # agent takes SIGTERM itself, kills the workers after its shutdown timeout and hides the
    # workers' exit codes behind a SignalException.
    os.environ["PET_SIGNALS_TO_HANDLE"] = AGENT_SIGNALS
    # Without it torchrun gives each of several ranks 1 thread and a single rank every core of the
    # node (not the pod's CPU limit); the pod's own OMP_NUM_THREADS, when set, wins.
    os.environ.setdefault("OMP_NUM_THREADS", str(default_threads(args, os.environ)))
    forwarder = _SigtermForwarder()
    forwarder.install()
    codes: list[int]
    try:
        torchrun_main(args)
        codes = [0]
    except ChildFailedError as error:
        codes = _failure_codes(error)
    except SignalException as error:
        codes = [-int(error.sigval)]
    code = exit_code_for(codes, sigterm=forwarder.received, termination=read_termination_message())
    if code == ExitCode.RETRYABLE:
        # Workers that die by a signal (OOM kill) write nothing: say what happened.
        write_termination(
            PREEMPTED if forwarder.received else "Error",
            f"trainer workers exited with codes {sorted(set(codes))}"
            + (" after SIGTERM, before a checkpoint was committed" if forwarder.received else ""),
            code,
        )
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
