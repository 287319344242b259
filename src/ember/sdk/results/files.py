"""A directory listing in a VM."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ember.sdk.types import raw_field


@dataclass(frozen=True)
class FileEntry:
    name: str
    mode: int
    size: int = 0
    mtime: float = 0


@dataclass(frozen=True)
class Listing:
    """A directory in a VM; ``truncated``: it has more entries than the daemon lists (EMBER_LS_MAX_ENTRIES)."""

    entries: tuple[FileEntry, ...]
    truncated: bool = False
    raw: Mapping[str, Any] = raw_field()
