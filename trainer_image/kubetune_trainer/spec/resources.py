"""``spec.deepspeed`` and ``spec.resources``: ZeRO settings, workers and hardware."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field

from kubetune_trainer.spec import podsettings as ps
from kubetune_trainer.spec import volumes as vol
from kubetune_trainer.spec._base import (
    DNS1123_SUBDOMAIN_PATTERN,
    IMAGE_PATTERN,
    LABEL_KEY_PATTERN,
    LABEL_VALUE_PATTERN,
    RESOURCE_NAME_PATTERN,
    KubeModel,
    Quantity,
    Rule,
)


class DeepSpeedSpec(KubeModel):
    """DeepSpeed ZeRO settings."""

    api_path: ClassVar[str] = "spec.deepspeed"
    api_rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="self.offloadParams != 'cpu' || self.zeroStage == 3",
            message="offloadParams: cpu needs zeroStage 3",
            field="offloadParams",
            check=lambda d: d.offload_params != "cpu" or d.zero_stage == 3,
        ),
        Rule(
            cel="self.offloadOptimizer != 'cpu' || self.zeroStage >= 1",
            message="offloadOptimizer: cpu needs zeroStage 1, 2 or 3",
            field="offloadOptimizer",
            check=lambda d: d.offload_optimizer != "cpu" or d.zero_stage >= 1,
        ),
    )

    zero_stage: Annotated[int, Field(ge=0, le=3)] = Field(
        default=2, description="ZeRO stage: 0 (DDP), 1 (optimizer), 2 (+gradients), 3 (+parameters)."
    )
    offload_optimizer: Literal["none", "cpu"] = Field(default="none", description="Offload optimizer state to CPU.")
    offload_params: Literal["none", "cpu"] = Field(default="none", description="Offload parameters to CPU (stage 3).")
    config: dict[str, Any] = Field(
        default_factory=dict,
        description="Raw DeepSpeed configuration keys merged last, for experts.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )


class Toleration(KubeModel):
    """A Kubernetes toleration for the worker pods."""

    key: Annotated[str, Field(pattern=LABEL_KEY_PATTERN, max_length=317)] | None = Field(
        default=None, description="Taint key to tolerate."
    )
    operator: Literal["Exists", "Equal"] = Field(default="Equal", description="Exists or Equal.")
    value: Annotated[str, Field(pattern=LABEL_VALUE_PATTERN, max_length=63)] | None = Field(
        default=None, description="Taint value (operator Equal)."
    )
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to tolerate; all when omitted."
    )
    toleration_seconds: Annotated[int, Field(ge=0)] | None = Field(
        default=None, description="How long a NoExecute taint is tolerated."
    )


LabelMap = Annotated[
    dict[
        Annotated[str, Field(pattern=LABEL_KEY_PATTERN, max_length=317)],
        Annotated[str, Field(pattern=LABEL_VALUE_PATTERN, max_length=63)],
    ],
    Field(max_length=64),
]
ResourceMap = Annotated[
    dict[Annotated[str, Field(pattern=RESOURCE_NAME_PATTERN, max_length=253)], Quantity],
    Field(max_length=32),
]


GPU_RESOURCE = "nvidia.com/gpu"


def _whole_gpus(quantities: dict[str, int | str]) -> bool:
    # Kubernetes takes extended resources in whole units only; a unit ("2k", "500m") is no GPU count.
    value = quantities.get(GPU_RESOURCE)
    return value is None or str(value).isdigit()


def _whole_gpus_in(field: str) -> Callable[[Any], bool]:
    return lambda r: _whole_gpus(getattr(r, field))


def _gpu_cel(field: str) -> str:
    value = f"self.{field}['{GPU_RESOURCE}']"
    return f"(!has(self.{field}) || !('{GPU_RESOURCE}' in self.{field}) || string({value}).matches('^[0-9]+$'))"


def _gpu_quantity(resources: Any) -> int | str | None:
    # The pod's GPU count as written: requests first, then limits (which default to the requests).
    value: int | str | None = resources.requests.get(GPU_RESOURCE, resources.limits.get(GPU_RESOURCE))
    return value


class ResourcesSpec(KubeModel):
    """How many workers, on what hardware."""

    api_path: ClassVar[str] = "spec.resources"
    api_rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel=(
                "!has(self.processesPerNode) || "
                f"((has(self.requests) && '{GPU_RESOURCE}' in self.requests) ? "
                f"string(self.requests['{GPU_RESOURCE}']) in ['0', string(self.processesPerNode)] : "
                f"(!has(self.limits) || !('{GPU_RESOURCE}' in self.limits) || "
                f"string(self.limits['{GPU_RESOURCE}']) in ['0', string(self.processesPerNode)]))"
            ),
            message=(
                f"processesPerNode must equal the pod's {GPU_RESOURCE} count in resources.requests (or "
                "resources.limits): one training process per GPU; omit processesPerNode to take the GPU count"
            ),
            field="processesPerNode",
            check=lambda r: (
                r.processes_per_node is None
                or _gpu_quantity(r) is None
                or str(_gpu_quantity(r)) in ("0", str(r.processes_per_node))
            ),
        ),
        *(
            Rule(
                cel=_gpu_cel(field),
                message=f"{GPU_RESOURCE} must be a whole number of GPUs (e.g. 8), without a unit or a fraction",
                field=field,
                check=_whole_gpus_in(field),
            )
            for field in ("requests", "limits")
        ),
        Rule(
            cel=(
                f"!has(self.requests) || !has(self.limits) || !('{GPU_RESOURCE}' in self.requests) || "
                f"!('{GPU_RESOURCE}' in self.limits) || "
                f"string(self.requests['{GPU_RESOURCE}']) == string(self.limits['{GPU_RESOURCE}'])"
            ),
            message=f"the {GPU_RESOURCE} limit must equal the request (Kubernetes does not overcommit GPUs); "
            "set it in requests only",
            field="limits",
            check=lambda r: (
                GPU_RESOURCE not in r.requests
                or GPU_RESOURCE not in r.limits
                or str(r.requests[GPU_RESOURCE]) == str(r.limits[GPU_RESOURCE])
            ),
        ),
        *ps.pod_settings_rules(),
    )

    nodes: Annotated[int, Field(ge=1, le=4096)] = Field(default=1, description="Number of worker pods (nodes).")
    processes_per_node: Annotated[int, Field(ge=1, le=64)] | None = Field(
        default=None,
        description=(
            "Training processes per pod: one per GPU. Defaults to the pod's nvidia.com/gpu request "
            "(1 on CPU-only pods); when set with a GPU request the two must agree."
        ),
    )
    image: Annotated[str, Field(pattern=IMAGE_PATTERN, max_length=512)] | None = Field(
        default=None, description="Trainer image; the operator's default when omitted."
    )
    requests: ResourceMap = Field(
        default_factory=dict, description="Resource requests per pod, e.g. {cpu: '8', nvidia.com/gpu: 8}."
    )
    limits: ResourceMap = Field(
        default_factory=dict, description="Resource limits per pod; GPU limits default to the requests."
    )
    node_selector: LabelMap = Field(default_factory=dict, description="Node labels the pods must match.")
    tolerations: Annotated[list[Toleration], Field(max_length=32)] = Field(
        default_factory=list, description="Tolerations for the pods."
    )
    priority_class_name: Annotated[str, Field(pattern=DNS1123_SUBDOMAIN_PATTERN, max_length=253)] | None = Field(
        default=None, description="PriorityClass of the pods."
    )
    service_account_name: Annotated[str, Field(pattern=DNS1123_SUBDOMAIN_PATTERN, max_length=253)] | None = Field(
        default=None, description="ServiceAccount of the pods (they need no API access)."
    )
    shm_size: Quantity = Field(default="8Gi", description="Size of the in-memory /dev/shm volume.")
    env: Annotated[list[ps.EnvVar], Field(max_length=128)] = Field(
        default_factory=list,
        description=(
            "Extra environment variables of the trainer container (e.g. NCCL_IB_HCA, NCCL_SOCKET_IFNAME), "
            "each a literal value or a Secret key; they override the operator's NCCL defaults of the same name."
        ),
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    pod_labels: LabelMap = Field(
        default_factory=dict, description="Extra labels of the worker pods (cost attribution, policies)."
    )
    pod_annotations: Annotated[dict[ps.LabelKey, Annotated[str, Field(max_length=8192)]], Field(max_length=64)] = Field(
        default_factory=dict,
        description="Extra annotations of the worker pods, e.g. k8s.v1.cni.cncf.io/networks for Multus.",
    )
    affinity: ps.Affinity | None = Field(default=None, description="Node and pod (anti-)affinity of the pods.")
    topology_spread_constraints: Annotated[list[ps.TopologySpreadConstraint], Field(max_length=16)] = Field(
        default_factory=list, description="How the pods spread over zones, racks or other topology domains."
    )
    volumes: Annotated[list[vol.Volume], Field(max_length=32)] = Field(
        default_factory=list,
        description=(
            "Extra volumes: configMap, secret, emptyDir, persistentVolumeClaim, csi or ephemeral "
            "(the types Pod Security 'restricted' allows)."
        ),
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    volume_mounts: Annotated[list[vol.VolumeMount], Field(max_length=32)] = Field(
        default_factory=list,
        description="Where the extra volumes appear in the trainer container.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["mountPath"]},
    )

    accelerator_peak_tflops: Annotated[float, Field(gt=0.0, le=100000.0)] | None = Field(
        default=None,
        description=(
            "Dense bf16 peak TFLOP/s of one accelerator, the denominator of model FLOPs utilization (MFU); "
            "taken from a table of known GPUs when omitted."
        ),
    )

    def gpus_per_node(self) -> int:
        """GPUs requested per pod (0 when the job runs on CPUs)."""
        value = _gpu_quantity(self)
        return int(float(value)) if value is not None else 0

    def processes(self) -> int:
        """Training processes per pod: ``processesPerNode``, else the GPU count, else 1."""
        return self.processes_per_node or self.gpus_per_node() or 1
