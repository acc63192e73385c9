"""Data sources that name several objects: folders (``.../``) and globs (``s3://bucket/train/*.parquet``).

A glob's ``*`` matches within one path segment, ``?`` one character of a segment, and
``**`` any number of whole segments (``data/**/x.parquet`` also matches ``data/x.parquet``).
The part of the URI before the first segment with a glob character is the store root;
it is listed once and the keys are matched against the rest.  Matches come back sorted
by key, which is the order the data is read in (deterministic on every store).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kubetune_trainer.storage.base import ObjectInfo, Store
from kubetune_trainer.storage.local import LocalStore
from kubetune_trainer.storage.registry import open_store
from kubetune_trainer.storage.uris import local_path

GLOB_CHARS = ("*", "?")


def is_glob(uri: str) -> bool:
    """True when ``uri`` holds a glob character (after its scheme)."""
    return any(char in uri.split("://", 1)[-1] for char in GLOB_CHARS)


def is_folder(uri: str) -> bool:
    """True when ``uri`` names a folder (ends with ``/``)."""
    return uri.endswith("/")


def split_glob(uri: str) -> tuple[str, str]:
    """``(root URI, pattern)``: the segments before the first one with a glob character, and the rest."""
    head, sep, path = uri.partition("://")
    prefix = f"{head}{sep}" if sep else ""
    segments = (path if sep else uri).split("/")
    for index, segment in enumerate(segments):
        if any(char in segment for char in GLOB_CHARS):
            return prefix + "/".join(segments[:index]), "/".join(segments[index:])
    return prefix + "/".join(segments), ""


def glob_regex(pattern: str) -> re.Pattern[str]:
    """The regular expression of a glob pattern over ``/``-separated keys."""
    out = []
    index = 0
    while index < len(pattern):
        if pattern.startswith("**/", index):
            out.append("(?:[^/]+/)*")
            index += 3
        elif pattern.startswith("**", index):
            out.append(".*")
            index += 2
        elif pattern[index] == "*":
            out.append("[^/]*")
            index += 1
        elif pattern[index] == "?":
            out.append("[^/]")
            index += 1
        else:
            out.append(re.escape(pattern[index]))
            index += 1
    return re.compile("".join(out) + r"\Z")


@dataclass(frozen=True)
class Listing:
    """The objects a folder or glob names: keys relative to ``store`` (rooted at ``root``), sorted."""

    root: str
    store: Store
    objects: list[ObjectInfo]


def expand(uri: str, *, endpoint: str | None = None, region: str | None = None) -> Listing:
    """The objects under a folder URI, or matching a glob URI, sorted by key.

    StorageError for an unknown scheme; StorageUnavailable when the store cannot be reached.
    """
    if is_glob(uri):
        root, pattern = split_glob(uri)
    else:
        root, pattern = uri.rstrip("/"), "**"
    path = local_path(root)
    # A local root is a path as the data URI names it: file://data (relative) is the folder data.
    store: Store = (
        LocalStore(path, uri=root) if path is not None else open_store(root, endpoint=endpoint, region=region)
    )
    regex = glob_regex(pattern)
    matched = [o for o in store.list("") if regex.match(o.key)]
    return Listing(root=root, store=store, objects=sorted(matched, key=lambda o: o.key))
