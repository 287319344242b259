"""Usage per tenant and per VM."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ember.sdk.types import EMPTY, decode, decode_list, raw_field


@dataclass(frozen=True)
class TenantUsage:
    tenant: str
    running_vcpu_seconds: float = 0.0
    running_gib_seconds: float = 0.0
    suspended_seconds: float = 0.0
    snapshot_gib_hours: float = 0.0
    image_gib_hours: float = 0.0
    builds: int = 0
    build_seconds: float = 0.0


@dataclass(frozen=True)
class VmUsage:
    vm_id: str
    tenant: str = ""
    running_vcpu_seconds: float = 0.0
    running_gib_seconds: float = 0.0
    suspended_seconds: float = 0.0


@dataclass(frozen=True)
class Usage:
    since: str
    until: str
    tenants: tuple[TenantUsage, ...] = ()
    vms: tuple[VmUsage, ...] = ()
    raw: Mapping[str, Any] = raw_field()

    @classmethod
    def from_json(cls, data: Any) -> Usage:
        get = data.get if isinstance(data, Mapping) else EMPTY.get
        return decode(
            cls, data, tenants=tuple(decode_list(TenantUsage, get("tenants", []))),
            vms=tuple(decode_list(VmUsage, get("vms", []))),
        )  # fmt: skip
