"""The runtime contract between the operator's pods and the trainer process.

Pure constants shared by both sides (the operator may import this module; it
never imports torch): exit codes and how they are classified, environment
variable names, the config mount path and the metrics port.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Trainer exit codes.  10-19 are permanent, everything else non-zero is retryable."""

    SUCCESS = 0
    INVALID_SPEC = 10  # the trainer config does not validate
    INVALID_DATA = 11  # missing file or field, unknown label, empty dataset
    INVALID_MODEL = 12  # backbone missing or unloadable, strategy does not fit the model
    NON_FINITE_LOSS = 13  # loss became NaN or infinite
    OUT_OF_MEMORY = 14  # the accelerator ran out of memory: the same spec fails the same way
    INCOMPATIBLE_CHECKPOINT = 15  # the checkpoint to resume was written by a spec of other weights or optimizer
    RETRYABLE = 20  # infrastructure trouble: storage unreachable, rendezvous failed
    PREEMPTED = 21  # SIGTERM: a checkpoint was committed, then the process exited


PERMANENT_EXIT_CODES = frozenset(range(10, 20))


def is_permanent_failure(exit_code: int) -> bool:
    """True when a failed attempt must not be retried (spec or data error)."""
    return exit_code in PERMANENT_EXIT_CODES


def reason_of(code: ExitCode) -> str:
    """The CamelCase termination reason of an exit code: ``INVALID_DATA`` → ``InvalidData``."""
    return "".join(word.capitalize() for word in code.name.split("_"))


# Termination reasons that fail a job at once, whatever exit code a pod ended with.
PERMANENT_REASONS = frozenset(reason_of(code) for code in ExitCode if is_permanent_failure(code))


# Environment variables the operator sets on trainer containers.
ENV_CONFIG = "KUBETUNE_CONFIG"  # path of the trainer config (the resolved FineTuneJob as JSON)
ENV_METRICS_PORT = "KUBETUNE_METRICS_PORT"
ENV_WORK_DIR = "KUBETUNE_WORK_DIR"  # node-local scratch (checkpoint staging, downloads, caches)
ENV_TERMINATION_LOG = "KUBETUNE_TERMINATION_LOG"
ENV_ATTEMPT = "KUBETUNE_ATTEMPT"
ENV_PVC_ROOT = "KUBETUNE_PVC_ROOT"  # where pvc://CLAIM/... volumes are mounted
ENV_JOB_UID = "KUBETUNE_JOB_UID"  # the FineTuneJob's uid: checkpoints of this very job always resume
ENV_PLUGINS = "KUBETUNE_PLUGINS"  # modules that register strategies or storage schemes (platform configuration)
# How many of the job's pods share this machine's CPUs: `kubetune run` sets it to the job's node count
# (every "node" is a process group on one machine); unset in a cluster, where each pod has CPUs of its
# own.  The launcher splits the CPUs between the ranks of all of them (kubetune_trainer/cpus.py).
ENV_PODS_SHARING_CPUS = "KUBETUNE_PODS_SHARING_CPUS"
# "1": a CPU run trains in bf16 when the spec asks for it, instead of falling back to fp32.  The GPU's
# half-precision path (DeepSpeed's bf16 optimizer, dtype casts) then runs on a machine without a GPU
# (the CI guard tests/trainer/test_precision.py); slow on CPUs without bf16 instructions.
ENV_CPU_BF16 = "KUBETUNE_CPU_BF16"

CONFIG_MOUNT_DIR = "/etc/kubetune"
CONFIG_FILE_NAME = "job.json"
DEFAULT_METRICS_PORT = 9400
DEFAULT_WORK_DIR = "/workspace"
DEFAULT_TERMINATION_LOG = "/dev/termination-log"
DEFAULT_PVC_ROOT = "/mnt/pvc"
TMP_DIR = "/tmp"  # noqa: S108 (a container path backed by its own emptyDir)
SHM_DIR = "/dev/shm"  # noqa: S108 (a container path backed by an in-memory emptyDir)
RENDEZVOUS_PORT = 29500
TRAINER_MODULE = "kubetune_trainer"
