"""Permanent failures the trainer reports fail the job at once, with the trainer's reason and message."""

from __future__ import annotations

import copy

from kubetune_operator.main import OperatorHandle
from tests.operator.conftest import NAMESPACE, job_manifest
from tests.operator.helpers import condition, create, job_names, wait_phase
from tests.support.cluster import FakeCluster
from tests.support.kube import Client, wait_for


def out_of_memory_termination(manifest: dict[str, object]) -> tuple[int, str]:
    """The exit code and termination message the trainer writes when the accelerator runs out of memory,
    produced by the trainer's own code (the loop's OOM guard, then the error's termination payload)."""
    import torch

    from kubetune_trainer.errors import OutOfMemory, termination_payload
    from kubetune_trainer.loop import _out_of_memory_is_permanent
    from kubetune_trainer.spec import FineTuneJob

    spec = FineTuneJob.model_validate(copy.deepcopy(manifest)).spec
    try:
        with _out_of_memory_is_permanent(spec):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    except OutOfMemory as error:
        return int(error.exit_code), termination_payload(error.reason, error.message, error.exit_code).decode()
    raise AssertionError("the OOM guard did not turn the error into OutOfMemory")


def test_trainer_out_of_memory_fails_the_job_without_attempt_2(
    operator: OperatorHandle, client: Client, controller: FakeCluster
) -> None:
    manifest = job_manifest("t-oom")
    code, message = out_of_memory_termination(manifest)
    create(client, manifest)
    wait_phase(client, "t-oom", "Running")
    controller.fail(NAMESPACE, "t-oom-a1", index=0, exit_code=code, message=message)
    st = wait_phase(client, "t-oom", "Failed")
    failed = condition(st, "Failed")
    assert failed["reason"] == "OutOfMemory"
    # The message names what to change: micro-batch, sequence length and the settings that reduce memory.
    for words in ("training.microBatchSize 16", "dataset.maxLength 128", "gradientCheckpointing", "zeroStage 3"):
        assert words in failed["message"], failed["message"]
    assert (st["restarts"], st["preemptions"], st["attempt"]) == (0, 0, 1)
    wait_for(lambda: job_names(client, "t-oom") in ([], ["t-oom-a1"]), 10)
    assert "t-oom-a2" not in job_names(client, "t-oom")
