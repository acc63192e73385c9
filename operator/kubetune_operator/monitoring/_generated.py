"""Write-or-check for generated files: one helper so every generator behaves the same under ``--check``."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from pathlib import Path


def write_or_check(files: Mapping[Path, str], *, check: bool) -> list[str]:
    """Write ``files`` (path → text), or with ``check`` return one diff per file that is stale or missing.

    Returns an empty list when everything was written or is up to date.
    """
    problems: list[str] = []
    for path, text in files.items():
        if not check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            continue
        if not path.exists():
            problems.append(f"{path}: missing (run the generator without --check)")
            continue
        current = path.read_text(encoding="utf-8")
        if current != text:
            diff = difflib.unified_diff(
                current.splitlines(keepends=True),
                text.splitlines(keepends=True),
                fromfile=f"{path} (committed)",
                tofile=f"{path} (generated)",
                n=1,
            )
            problems.append("".join(list(diff)[:40]))
    return problems
