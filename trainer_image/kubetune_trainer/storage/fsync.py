"""Durable local writes: flush a file's data or a directory's entries to disk."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a directory's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs_durably(folder: Path, *, stop: Path) -> None:
    """``mkdir -p`` whose new entries survive a crash: each new directory's parent is flushed.

    Directories above ``stop`` (the store's root) are created but not flushed: they are not ours.
    """
    if folder.is_dir():
        return
    missing = []
    current = folder
    while not current.is_dir():
        missing.append(current)
        if current == current.parent:
            break
        current = current.parent
    for new in reversed(missing):
        new.mkdir(exist_ok=True)
        if new.parent.is_relative_to(stop):
            fsync_path(new.parent)
