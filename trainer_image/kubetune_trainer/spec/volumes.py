"""Extra volumes of the worker pods (``spec.resources.volumes`` and ``volumeMounts``): restricted types only.

The types the Pod Security Standard "restricted" allows, typed so that a bad value is named by
its field; ``hostPath`` is declared only so that it can be refused with a message saying why.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from kubetune_trainer.spec._base import (
    DNS1123_LABEL_PATTERN,
    DNS1123_SUBDOMAIN_PATTERN,
    LABEL_KEY_PATTERN,
    KubeModel,
    Quantity,
)

MOUNT_PATH_PATTERN = r"^(/[A-Za-z0-9_-][A-Za-z0-9._-]*)+/?$"  # no segment starts with a dot: no ".."
RELATIVE_PATH_PATTERN = r"^[A-Za-z0-9_-][A-Za-z0-9._-]*(/[A-Za-z0-9_-][A-Za-z0-9._-]*)*$"
KEY_PATTERN = r"^[-._a-zA-Z0-9]+$"
ObjectName = Annotated[str, Field(pattern=DNS1123_SUBDOMAIN_PATTERN, max_length=253)]
LabelKey = Annotated[str, Field(pattern=LABEL_KEY_PATTERN, max_length=317)]


class KeyToPath(KubeModel):
    """One key of a ConfigMap or Secret projected to a file."""

    key: Annotated[str, Field(pattern=KEY_PATTERN, max_length=253)] = Field(description="The key.")
    path: Annotated[str, Field(pattern=RELATIVE_PATH_PATTERN, max_length=1024)] = Field(
        description="Relative file path."
    )
    mode: Annotated[int, Field(ge=0, le=511)] | None = Field(default=None, description="File mode bits.")


class ConfigMapVolume(KubeModel):
    """A ConfigMap of the job's namespace as files."""

    name: ObjectName = Field(description="Name of the ConfigMap.")
    items: Annotated[list[KeyToPath], Field(max_length=64)] | None = Field(default=None, description="Keys to map.")
    default_mode: Annotated[int, Field(ge=0, le=511)] | None = Field(default=None, description="File mode bits.")
    optional: bool | None = Field(default=None, description="Start even when the ConfigMap is missing.")


class SecretVolume(KubeModel):
    """A Secret of the job's namespace as files (the operator never reads it)."""

    secret_name: ObjectName = Field(description="Name of the Secret.")
    items: Annotated[list[KeyToPath], Field(max_length=64)] | None = Field(default=None, description="Keys to map.")
    default_mode: Annotated[int, Field(ge=0, le=511)] | None = Field(default=None, description="File mode bits.")
    optional: bool | None = Field(default=None, description="Start even when the Secret is missing.")


class EmptyDirVolume(KubeModel):
    """Scratch space that lives as long as the pod."""

    medium: Literal["", "Memory"] | None = Field(default=None, description="'' (node disk) or Memory.")
    size_limit: Quantity | None = Field(default=None, description="Size limit, e.g. 100Gi.")


class PersistentVolumeClaimVolume(KubeModel):
    """An existing PersistentVolumeClaim."""

    claim_name: ObjectName = Field(description="Name of the claim.")
    read_only: bool | None = Field(default=None, description="Mount read-only.")


class LocalObjectReference(KubeModel):
    """An object of the job's namespace, by name."""

    name: ObjectName = Field(description="Name.")


class CsiVolume(KubeModel):
    """An inline CSI volume (e.g. a parallel file system or object-store mount)."""

    driver: Annotated[str, Field(pattern=DNS1123_SUBDOMAIN_PATTERN, max_length=63)] = Field(
        description="CSI driver name."
    )
    read_only: bool | None = Field(default=None, description="Mount read-only.")
    fs_type: Annotated[str, Field(pattern=r"^[a-z0-9]+$", max_length=32)] | None = Field(
        default=None, description="File system type."
    )
    volume_attributes: (
        Annotated[dict[LabelKey, Annotated[str, Field(max_length=1024)]], Field(max_length=32)] | None
    ) = Field(default=None, description="Driver-specific attributes.")
    node_publish_secret_ref: LocalObjectReference | None = Field(default=None, description="Secret for the driver.")


class ClaimResources(KubeModel):
    """Storage requested by an ephemeral claim."""

    requests: Annotated[dict[Literal["storage"], Quantity], Field(min_length=1, max_length=1)] = Field(
        description="{storage: SIZE}."
    )


class ClaimSpec(KubeModel):
    """The claim an ephemeral volume creates per pod."""

    access_modes: Annotated[
        list[Literal["ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"]],
        Field(min_length=1, max_length=4),
    ] = Field(description="Access modes.")
    storage_class_name: ObjectName | None = Field(default=None, description="StorageClass.")
    resources: ClaimResources = Field(description="Requested size.")
    volume_mode: Literal["Filesystem", "Block"] | None = Field(default=None, description="Filesystem or Block.")


class ClaimTemplate(KubeModel):
    """Template of an ephemeral volume's claim."""

    spec: ClaimSpec = Field(description="The claim's spec.")


class EphemeralVolume(KubeModel):
    """A per-pod volume from a claim template (e.g. local NVMe scratch)."""

    volume_claim_template: ClaimTemplate = Field(description="The claim to create with each pod.")


class Volume(KubeModel):
    """An extra volume of the worker pods: one of the types Pod Security "restricted" allows."""

    name: Annotated[str, Field(pattern=DNS1123_LABEL_PATTERN, max_length=63)] = Field(
        description="Volume name (config, shm, work, tmp and pvc-* are the operator's)."
    )
    config_map: ConfigMapVolume | None = Field(default=None, description="A ConfigMap.")
    secret: SecretVolume | None = Field(default=None, description="A Secret.")
    empty_dir: EmptyDirVolume | None = Field(default=None, description="Scratch space.")
    persistent_volume_claim: PersistentVolumeClaimVolume | None = Field(default=None, description="A claim.")
    csi: CsiVolume | None = Field(default=None, description="An inline CSI volume.")
    ephemeral: EphemeralVolume | None = Field(default=None, description="A per-pod claim.")
    host_path: dict[str, Any] | None = Field(
        default=None,
        description="Not allowed (Pod Security restricted); accepted by the schema only to be refused by name.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )


VOLUME_SOURCES = ("configMap", "secret", "emptyDir", "persistentVolumeClaim", "csi", "ephemeral")


def volume_sources(volume: Volume) -> list[str]:
    """The source fields a volume sets (exactly one is valid)."""
    values = (volume.config_map, volume.secret, volume.empty_dir, volume.persistent_volume_claim, volume.csi)
    return [name for name, value in zip(VOLUME_SOURCES, (*values, volume.ephemeral), strict=True) if value]


class VolumeMount(KubeModel):
    """Where an extra volume appears in the trainer container."""

    name: Annotated[str, Field(pattern=DNS1123_LABEL_PATTERN, max_length=63)] = Field(
        description="A volume of spec.resources.volumes."
    )
    mount_path: Annotated[str, Field(pattern=MOUNT_PATH_PATTERN, max_length=1024)] = Field(
        description="Absolute path in the container; not one of the operator's paths."
    )
    read_only: bool | None = Field(default=None, description="Mount read-only.")
    sub_path: Annotated[str, Field(pattern=RELATIVE_PATH_PATTERN, max_length=1024)] | None = Field(
        default=None, description="A path inside the volume."
    )


def under(path: str, root: str) -> bool:
    """Whether ``path`` is ``root`` or below it."""
    path, root = path.rstrip("/"), root.rstrip("/")
    return path == root or path.startswith(root + "/")
