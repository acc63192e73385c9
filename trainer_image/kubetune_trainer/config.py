"""Load and validate the trainer config: the whole FineTuneJob as JSON (DESIGN §4.1)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from pydantic import ValidationError

from kubetune_trainer.errors import InvalidSpec
from kubetune_trainer.spec import FineTuneJob
from kubetune_trainer.spec.runtime import CONFIG_FILE_NAME, CONFIG_MOUNT_DIR, ENV_CONFIG


def default_config_path() -> Path:
    """``$KUBETUNE_CONFIG`` or ``/etc/kubetune/job.json``."""
    return Path(os.environ.get(ENV_CONFIG, f"{CONFIG_MOUNT_DIR}/{CONFIG_FILE_NAME}"))


def _first_error(error: ValidationError) -> str:
    item = error.errors()[0]
    where = ".".join(str(part) for part in item.get("loc", ())) or "<root>"
    return f"{where}: {item.get('msg', 'invalid')}"


def load_job(path: Path) -> FineTuneJob:
    """Read and validate the job file; raise :class:`InvalidSpec` naming the file and field."""
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise InvalidSpec(f"{path}: trainer config not found") from exc
    except (OSError, ValueError) as exc:
        raise InvalidSpec(f"{path}: not valid JSON ({exc})") from exc
    try:
        return FineTuneJob.model_validate(raw)
    except ValidationError as exc:
        raise InvalidSpec(f"{path}: {_first_error(exc)}") from exc


def spec_hash(job: FineTuneJob) -> str:
    """A stable hash of the spec (checkpoints and outputs record which spec produced them)."""
    canonical = json.dumps(job.spec.to_wire(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]
