"""What a suspend or resume did, and a VM's state changes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ember.sdk.types import raw_field


@dataclass(frozen=True)
class Transition:
    """What a suspend or resume did: the VM's state after it, its time and its steps' times."""

    state: str
    elapsed_ms: float = 0.0
    phases_ms: Mapping[str, float] = field(default_factory=dict)
    snapshot_bytes: int = 0
    raw: Mapping[str, Any] = raw_field()


@dataclass(frozen=True)
class Event:
    """A VM's state change; ``reason`` is one of ember.models.StateReason."""

    id: int
    vm_id: str
    to_state: str
    tenant: str = ""
    at: str = ""
    from_state: str = ""
    reason: str = ""
    message: str = ""
    actor: str = ""
    raw: Mapping[str, Any] = raw_field()
