"""Where a job's things are: the checkpoint layout, the default URIs derived from a job, PVC paths (pure).

The one owner of each of these layouts (DESIGN §5); the trainer's checkpoint code,
the operator's builders and status writers and the local runtime all call these
functions instead of formatting the strings themselves::

    <checkpoint.uri>/checkpoints/step-00000500/...          one checkpoint (a "step folder")
    <checkpoint.uri>/checkpoints/step-00000500/MANIFEST.json written last
    <checkpoint.uri>/checkpoints/LATEST                      names the newest committed step folder
    <checkpoint.uri>/output                                  the published model unless output.uri is set
    <checkpoint.uri>/tokens/<key>/                           the tokenized data, reused by every attempt

``pvc://CLAIM/PATH`` is the file ``PATH`` on claim ``CLAIM``, which pods mount at
``<PVC root>/CLAIM`` (:data:`~kubetune_trainer.spec.runtime.DEFAULT_PVC_ROOT`).
"""

from __future__ import annotations

import re

from kubetune_trainer.spec.runtime import DEFAULT_PVC_ROOT

CHECKPOINTS_DIR = "checkpoints"
CHECKPOINTS_PREFIX = f"{CHECKPOINTS_DIR}/"
LATEST_KEY = f"{CHECKPOINTS_DIR}/LATEST"
OUTPUT_DIR = "output"
TOKENS_DIR = "tokens"
PVC_SCHEME = "pvc"

_STEP_PREFIX = "step-"
_STEP_DIGITS = 8
_TAG_RE = re.compile(rf"^{_STEP_PREFIX}(\d{{{_STEP_DIGITS},}})$")


def tag_for(step: int) -> str:
    """The checkpoint tag (and step folder name) of a step: ``step-00000500``."""
    if step < 0:
        raise ValueError(f"checkpoint step must be >= 0, got {step}")
    return f"{_STEP_PREFIX}{step:0{_STEP_DIGITS}d}"


def step_of(tag: str) -> int | None:
    """The step named by a tag, or None when the name is not a checkpoint tag."""
    match = _TAG_RE.match(tag)
    return int(match.group(1)) if match else None


def step_prefix(step: int) -> str:
    """The key prefix of one checkpoint relative to the checkpoint root, with a trailing slash."""
    return f"{CHECKPOINTS_PREFIX}{tag_for(step)}/"


def join_uri(root: str, *parts: str) -> str:
    """``root/part/...`` with exactly one slash between the pieces."""
    return "/".join([root.rstrip("/"), *(part.strip("/") for part in parts if part.strip("/"))])


def checkpoint_step_uri(checkpoint_uri: str, step: int) -> str:
    """The URI of the step folder of ``step`` under a job's checkpoint root (what ``status.checkpoint.uri`` shows)."""
    return join_uri(checkpoint_uri, CHECKPOINTS_DIR, tag_for(step))


def default_output_uri(checkpoint_uri: str) -> str:
    """Where the model is published when ``spec.output.uri`` is not set: ``<checkpoint.uri>/output``."""
    return join_uri(checkpoint_uri, OUTPUT_DIR)


def token_cache_uri(checkpoint_uri: str, key: str) -> str:
    """Where the token store of the data keyed ``key`` is kept, next to the checkpoints:
    ``<checkpoint.uri>/tokens/<key>`` (outside ``checkpoints/``, so retention never deletes it)."""
    return join_uri(checkpoint_uri, TOKENS_DIR, key)


def job_uri(prefix: str, namespace: str, name: str) -> str:
    """A job's own folder under an operator-wide default prefix: ``<prefix>/<namespace>/<name>``."""
    return join_uri(prefix, namespace, name)


def pvc_claim(uri: str) -> str | None:
    """The claim named by a ``pvc://CLAIM/PATH`` URI ('' when it names none); None for other URIs."""
    head = f"{PVC_SCHEME}://"
    if not uri.startswith(head):
        return None
    return uri[len(head) :].split("/", 1)[0]


def pvc_relative_path(uri: str) -> str:
    """``CLAIM/PATH`` of a ``pvc://CLAIM/PATH`` URI: the path below the PVC root."""
    head = f"{PVC_SCHEME}://"
    if not uri.startswith(head):
        raise ValueError(f"{uri!r} is not a {head} URI")
    return uri[len(head) :]


def pvc_mount_path(claim: str, root: str = DEFAULT_PVC_ROOT) -> str:
    """Where pods mount ``claim``."""
    return f"{root.rstrip('/')}/{claim}"
