"""Shared building blocks of the FineTuneJob API models.

Every model is camelCase on the wire, snake_case in Python, strict (YAML already
yields typed values, and the CRD schema would reject a string where a number is
expected, so pydantic must too) and forbids unknown fields (kubectl's strict
field validation does the same).  Cross-field rules live in one table per model
(:class:`Rule`): pydantic enforces them through ``check`` and the CRD generator
emits the same rule as a CEL ``x-kubernetes-validations`` entry, so the two
validators can be compared by a differential test.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError

# Characters allowed in URIs and paths taken from a spec.  Deliberately excludes
# whitespace, quotes, '@' (no user:password@host), and shell metacharacters, so a
# spec value can never smuggle credentials or shell syntax into a pod.
_SAFE_URI_CHARS = r"[A-Za-z0-9._~/%+=,:-]"
URI_PATTERN = rf"^(hf|s3|pvc|file)://{_SAFE_URI_CHARS}+$"
# Data sources: one file, a folder (trailing '/'), or a glob ('*' within a path segment, '**' across
# segments, '?' one character) on s3://, pvc://, file:// or a plain path; the bucket or claim itself is
# never a glob.  Hugging Face datasets only as hf://datasets/[OWNER/]NAME[@REVISION]: the '@' is allowed
# there alone, after a '/', so it can never be read as user:password@host.
_PATH_CHARS = r"[A-Za-z0-9._~%+=,:*?-]"
_PLAIN_CHARS = r"[A-Za-z0-9._~%+=,*?-]"  # no ':': a plain path never looks like a scheme
_HF_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_HF_DATASET = rf"hf://datasets/({_HF_NAME}/)?{_HF_NAME}(@[A-Za-z0-9._/-]+)?"
_STORE_DATA = (
    rf"(s3|pvc)://[A-Za-z0-9._~%+=,:-]+(/{_PATH_CHARS}*)*|file:///?{_PATH_CHARS}+(/{_PATH_CHARS}*)*|"
    rf"/?{_PLAIN_CHARS}+(/{_PLAIN_CHARS}*)*"
)
HF_DATASET_URI_PATTERN = rf"^{_HF_DATASET}$"
DATA_URI_PATTERN = rf"^({_HF_DATASET}|{_STORE_DATA})$"
STORAGE_URI_PATTERN = rf"^(s3|pvc|file)://{_SAFE_URI_CHARS}+$"
ENDPOINT_PATTERN = r"^https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?(/[A-Za-z0-9._~/%-]*)?$"
DNS1123_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"
DNS1123_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
FIELD_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.-]*$"
MODULE_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.]*$"
IMAGE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._/:@-]*$"
QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?(m|k|Ki|Mi|Gi|Ti|Pi|Ei|M|G|T|P|E)?$"
RESOURCE_NAME_PATTERN = r"^([a-z0-9.-]+/)?[A-Za-z0-9._-]+$"
LABEL_KEY_PATTERN = r"^([a-z0-9.-]+/)?[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$"
LABEL_VALUE_PATTERN = r"^([A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?)?$"

Uri = Annotated[str, Field(pattern=URI_PATTERN, max_length=1024)]
DataUri = Annotated[str, Field(pattern=DATA_URI_PATTERN, max_length=1024)]
StorageUri = Annotated[str, Field(pattern=STORAGE_URI_PATTERN, max_length=1024)]
FieldName = Annotated[str, Field(pattern=FIELD_NAME_PATTERN, max_length=128)]
ModuleName = Annotated[str, Field(pattern=MODULE_NAME_PATTERN, max_length=128)]
Quantity = Annotated[int, Field(ge=0)] | Annotated[str, Field(pattern=QUANTITY_PATTERN, max_length=64)]


@dataclass(frozen=True)
class Rule:
    """A cross-field rule, stated once for both validators.

    ``cel`` is evaluated by the Kubernetes API server against the object at the
    model's place in the schema; ``check`` is the same rule in Python over the
    model instance.  ``field`` is the field path, relative to the model, that the
    error names (``fieldPath`` in the CRD); ``where`` is the model's own absolute
    path (``spec.strategy``), so messages name the full field path.
    """

    cel: str | None  # None: the CRD schema enforces it by other means (e.g. list-type set)
    message: str
    field: str
    check: Callable[[Any], bool]
    transition: bool = False  # uses oldSelf: checked on update only

    def crd_entry(self) -> dict[str, str]:
        """The ``x-kubernetes-validations`` entry for this rule."""
        assert self.cel is not None
        return {
            "rule": self.cel,
            "message": self.message,
            "fieldPath": "." + self.field if self.field else "",
            "reason": "FieldValueForbidden" if self.transition else "FieldValueInvalid",
        }


class KubeModel(BaseModel):
    """Base of every API model: camelCase aliases, strict types, no unknown fields."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        strict=True,
        validate_default=False,
        use_attribute_docstrings=False,
    )

    # Absolute path of this model in a FineTuneJob, e.g. "spec.strategy".
    api_path: ClassVar[str] = ""
    # Cross-field rules that apply to this model.
    api_rules: ClassVar[tuple[Rule, ...]] = ()

    @classmethod
    def dynamic_rules(cls) -> tuple[Rule, ...]:
        """Rules computed when asked (from a registry) rather than stated in ``api_rules``."""
        return ()

    @classmethod
    def rules(cls) -> tuple[Rule, ...]:
        """Every cross-field rule of this model: ``api_rules`` and the dynamic ones."""
        return cls.api_rules + cls.dynamic_rules()

    @model_validator(mode="after")
    def _check_rules(self) -> KubeModel:
        for rule in type(self).rules():
            if rule.transition:
                continue
            if not rule.check(self):
                path = ".".join(p for p in (type(self).api_path, rule.field) if p)
                raise PydanticCustomError(
                    "cross_field",
                    "{path}: {message}",
                    {"path": path, "field": rule.field, "message": rule.message},
                )
        return self

    def to_wire(self) -> dict[str, Any]:
        """The JSON-ready camelCase form, leaving out unset optional fields."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


def cel_list(values: tuple[str, ...]) -> str:
    """A CEL list literal of strings: ``['a', 'b']``."""
    return "[" + ", ".join(f"'{v}'" for v in values) + "]"
