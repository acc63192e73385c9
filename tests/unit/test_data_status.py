"""``status.data``: the examples a job trained on and the ones it dropped, from rank 0's termination message."""

from __future__ import annotations

from kubetune_trainer.spec import FineTuneJobStatus, Phase
from tests.unit.test_state import job_obj, make_job, pod_obj, run, running_status


def test_success_records_examples_and_drops_in_the_status() -> None:
    message = {
        "reason": "Succeeded",
        "message": "done",
        "exitCode": 0,
        "step": 30,
        "data": {
            "examples": {"train": 9500, "validation": 200},
            "dropped": {"truncated": 480, "no_trainable_tokens": 20},
        },
    }
    plan = run(
        make_job(),
        running_status(),
        [job_obj(1, conditions=["Complete"])],
        [pod_obj(1, 0, "Succeeded", 0, message), pod_obj(1, 1, "Succeeded", 0, {"reason": "Succeeded"})],
    )
    assert plan.status["phase"] == Phase.SUCCEEDED
    assert plan.status["data"] == {
        "examples": {"train": 9500, "validation": 200},
        "dropped": {"truncated": 480, "no_trainable_tokens": 20},
    }
    FineTuneJobStatus.model_validate(plan.status)  # the CRD's status schema takes it
