"""Ending the trainer's process trees in tests."""

from __future__ import annotations

import contextlib
import subprocess
from typing import Any

import psutil


def kill_tree(proc: subprocess.Popen[Any]) -> None:
    """SIGKILL a launcher and all its workers at once, as a node failure would.

    torchrun starts its workers in sessions of their own: killing the launcher's process group is not
    enough (the workers would train on, beside the next run, in the same work folder).
    """
    try:
        processes = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        processes = []
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    proc.wait()
    psutil.wait_procs(processes, timeout=30)
