"""What kind of place a model `source` string names, and where downloads are cached.  No torch here.

One rule, used by the checkpoint resolver and by the job spec alike:

    lance-tiny, lance-tiny:<seed>   -> "tiny"   the tiny random checkpoint, written into the cache dir
    <scheme>://...                  -> "uri"    an fsspec location (s3://bucket/prefix, gs://, ...)
    owner/name                      -> "hub"    a Hugging Face repo id (exactly one slash)
    anything else                   -> "local"  a directory (./x, ../x, /x, ~/x, a/b/c, a name without slash)

A relative directory that happens to look like `owner/name` reads as a hub id: write `./owner/name`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

TINY_SOURCE = "lance-tiny"
_TINY = re.compile(re.escape(TINY_SOURCE) + r"(?::(\d+))?")  # the seed is a non-negative decimal integer
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
# A Hugging Face repo id is `owner/name`: each part of ASCII letters, digits, `_`, `-` and `.` that starts
# and ends with a letter, digit or `_` (so nothing starting with `.`, `~` or `/` qualifies); no `--` or
# `..`; at most 96 characters in all (the rules `huggingface_hub` validates).
_HUB_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?"
_HUB = re.compile(rf"{_HUB_PART}/{_HUB_PART}")


def default_cache_dir() -> Path:
    """`$LANCE_RAY_CACHE`, else `~/.cache/lance-ray`: the tiny checkpoint and copies of `s3://` checkpoints
    live here (hub checkpoints live in huggingface_hub's cache, see checkpoint.py)."""
    return Path(os.environ.get("LANCE_RAY_CACHE", Path.home() / ".cache" / "lance-ray"))


def parse_tiny(source: str) -> int | None:
    """The seed of a `lance-tiny[:<seed>]` source (0 when none is given); None for any other source."""
    match = _TINY.fullmatch(source)
    if match is None:
        return None
    return int(match.group(1)) if match.group(1) is not None else 0


def _is_hub_id(source: str) -> bool:
    if len(source) > 96 or "--" in source or ".." in source:
        return False
    return _HUB.fullmatch(source) is not None


def source_kind(source: str) -> Literal["tiny", "hub", "uri", "local"]:
    """How `source` is read: the tiny checkpoint, a fsspec URI, a hub repo id, or a local directory."""
    if parse_tiny(source) is not None:
        return "tiny"
    if _URI.match(source):
        return "uri"
    if _is_hub_id(source):
        return "hub"
    return "local"
