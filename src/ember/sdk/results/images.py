"""Images and builds."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ember.sdk.types import raw_field


@dataclass(frozen=True)
class Image:
    """An image version, or a build of one (``state`` CREATING, CREATED or CREATE_FAILED)."""

    name: str
    state: str = "CREATED"
    created_at: str = ""
    builtin: bool = False
    parent: str | None = None
    disk_bytes: int = 0
    memory_bytes: int = 0
    memory_mib: int = 0
    accelerator: str = ""
    qemu_version: str = ""
    error: str | None = None
    failed_step: str | None = None
    build_seconds: float = 0.0
    raw: Mapping[str, Any] = raw_field()


@dataclass(frozen=True)
class Build:
    """A finished build: ``ok`` when its image was CREATED; else ``error`` and ``failed_step`` say why."""

    name: str
    state: str
    repo: str = ""
    version: int = 0
    error: str | None = None
    failed_step: str | None = None
    build_seconds: float = 0.0
    created_at: str = ""
    finished_at: str | None = None
    raw: Mapping[str, Any] = raw_field()

    @property
    def ok(self) -> bool:
        return self.state == "CREATED"
