"""The node-local work directory is shared by all ranks of a pod; each must get the configured one."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest

from kubetune_trainer import session
from kubetune_trainer.spec.runtime import ENV_WORK_DIR


def _resolve_many(times: int) -> set[str]:
    return {str(session.work_dir()) for _ in range(times)}


def test_ranks_probing_together_all_get_the_configured_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    configured = tmp_path / "work"
    monkeypatch.setenv(ENV_WORK_DIR, str(configured))
    # Processes, as the ranks of a pod are: a fixed probe name let one rank unlink the
    # probe another had just created, and that rank silently fell back to /tmp.
    with multiprocessing.get_context("fork").Pool(4) as pool:
        seen = set().union(*pool.map(_resolve_many, [300] * 8))
    assert seen == {str(configured)}


def test_unwritable_directory_falls_back_to_a_temporary_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv(ENV_WORK_DIR, str(blocker / "work"))
    resolved = session.work_dir()
    assert resolved != blocker / "work"
    assert resolved.is_dir()
