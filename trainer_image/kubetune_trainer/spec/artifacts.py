"""``spec.checkpoint``, ``spec.output`` and ``spec.runPolicy``: where results go, restarts and deadlines."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from kubetune_trainer.spec._base import DNS1123_SUBDOMAIN_PATTERN, ENDPOINT_PATTERN, KubeModel, StorageUri


class CheckpointSpec(KubeModel):
    """Where and how often checkpoints are written."""

    uri: StorageUri | None = Field(
        default=None,
        description="s3://BUCKET/PREFIX, pvc://CLAIM/PATH or file:///PATH; the operator's default when omitted.",
    )
    endpoint: Annotated[str, Field(pattern=ENDPOINT_PATTERN, max_length=512)] | None = Field(
        default=None, description="Endpoint of an S3-compatible store, e.g. http://minio.storage:9000."
    )
    region: Annotated[str, Field(pattern=r"^[a-z0-9-]+$", max_length=64)] | None = Field(
        default=None, description="S3 region."
    )
    credentials_secret: Annotated[str, Field(pattern=DNS1123_SUBDOMAIN_PATTERN, max_length=253)] | None = Field(
        default=None,
        description=(
            "Name of a Secret in the job's namespace with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY; "
            "credentials are never given inline."
        ),
    )
    every_steps: Annotated[int, Field(ge=1)] = Field(default=500, description="Steps between checkpoints.")
    keep_last: Annotated[int, Field(ge=1, le=100)] = Field(default=3, description="Complete checkpoints kept.")
    async_upload: bool = Field(
        default=True, description="Upload in the background while training continues (one upload in flight)."
    )
    resume: Literal["IfCompatible", "Always", "Never"] = Field(
        default="IfCompatible",
        description=(
            "Checkpoints of this job's own earlier attempts always resume. A checkpoint another FineTuneJob left "
            "under the URI (a deleted and re-created job): IfCompatible resumes it when it was written for the same "
            "model, task, labels, strategy, precision and ZeRO stage, and fails the job with IncompatibleCheckpoint "
            "naming the differing fields otherwise; Always resumes it anyway; Never deletes it and starts from scratch."
        ),
    )


class OutputSpec(KubeModel):
    """Where the fine-tuned model is published."""

    uri: StorageUri | None = Field(
        default=None,
        description=(
            "Where the Hugging Face-format model or PEFT adapter is written; <checkpoint.uri>/output when omitted."
        ),
    )
    merge_adapter: bool = Field(
        default=False, description="For lora, adalora and ia3: also write full weights with the adapter merged."
    )


class RunPolicy(KubeModel):
    """Restarts, deadlines, clean-up and suspension."""

    max_restarts: Annotated[int, Field(ge=0, le=1000)] = Field(
        default=3, description="Gang restarts allowed after retryable failures."
    )
    backoff_seconds: Annotated[int, Field(ge=0, le=86400)] = Field(
        default=30,
        description=(
            "Seconds from a failure to the start of the restarted attempt, at the least; the old pods' shutdown "
            "(a checkpoint after SIGTERM) counts in them, and the attempt never starts before those pods are gone."
        ),
    )
    active_deadline_seconds: Annotated[int, Field(ge=1)] | None = Field(
        default=None,
        description=(
            "Fail the job after this many seconds since it started or was last resumed; time suspended does not "
            "count (as for a batch/v1 Job)."
        ),
    )
    ttl_seconds_after_finished: Annotated[int, Field(ge=0)] | None = Field(
        default=None, description="Delete the FineTuneJob this long after it finished (storage is kept)."
    )
    suspend: bool = Field(default=False, description="Suspend the job; resuming continues from the last checkpoint.")
    termination_grace_period_seconds: Annotated[int, Field(ge=30, le=86400)] = Field(
        default=600, description="Time a worker has to save a checkpoint after SIGTERM."
    )
    max_preemptions: Annotated[int, Field(ge=0, le=100000)] | None = Field(
        default=None,
        description=(
            "Preemptions (evictions, node drains, lost or reclaimed nodes, Kueue preemption) allowed before the job "
            "fails with PreemptionLimitExceeded; unlimited when omitted. They never count against maxRestarts."
        ),
    )
    startup_timeout_seconds: Annotated[int, Field(ge=1, le=604800)] | None = Field(
        default=None,
        description=(
            "Fail the attempt (retryable, counted in restarts) when its pods are not all running this long after "
            "its Job started (time queued in Kueue or suspended does not count); no limit when omitted."
        ),
    )
    stall_timeout_seconds: Annotated[int, Field(ge=1, le=604800)] | None = Field(
        default=None,
        description=(
            "Restart the gang (retryable, counted in restarts) when rank 0 reports no new optimizer step for this "
            "long, e.g. after an NCCL hang; set it above the longest evaluation or checkpoint save. Loading the "
            "backbone, the data and the checkpoint does not count: the clock starts at the first step rank 0 reports "
            "in each attempt. Off when omitted."
        ),
    )
