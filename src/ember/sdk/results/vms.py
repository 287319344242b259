"""A VM as the daemon describes it (``ember ps`` needs only this module)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields

from ember.sdk.types import decode, raw_field

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (2.5 ms of the CLI's start)
if TYPE_CHECKING:
    from typing import Any


@dataclass(frozen=True)
class Accelerator:
    """The accelerator a VM runs under (kvm, tcg), whether it is a security boundary, and a warning if not."""

    name: str
    security_boundary: bool = False
    warning: str = ""
    reason: str = ""


@dataclass(frozen=True)
class VmData:
    """A VM as the daemon last described it (the bound ``Vm`` of each client adds its verbs)."""

    id: str
    image: str
    state: str
    accelerator: Accelerator
    tenant: str = "default"
    state_reason: str = ""
    state_message: str = ""
    memory_mib: int = 0
    vcpus: int = 0
    env: Mapping[str, str] = field(default_factory=dict)
    tags: Mapping[str, str] = field(default_factory=dict)
    egress: Mapping[str, Any] = field(default_factory=dict)  # {"mode": none|internet|allow, "allow": [...]}
    pid: int | None = None
    created_at: str = ""
    updated_at: str = ""
    terminated_at: str = ""
    idle_timeout_s: int | None = None  # idle policy and lifetime (ember.sdk.IdlePolicy); None: no limit
    auto_resume: bool = False
    suspended_ttl_s: int | None = None
    max_duration_s: int | None = None
    max_duration_running_only: bool = False
    suspended_at: str = ""
    endpoint: str = ""  # its ingress address (run and inspect answers; "" without an ingress)
    raw: Mapping[str, Any] = raw_field()

    @classmethod
    def fields_from(cls, data: Any) -> dict[str, Any]:
        """The constructor arguments of a VM (of this class or a bound subclass) from its JSON."""
        accel = decode(Accelerator, data.get("accelerator") if isinstance(data, Mapping) else None)
        base = decode(VmData, data, accelerator=accel)
        return {f.name: getattr(base, f.name) for f in fields(VmData)}


@dataclass(frozen=True)
class AuthToken:
    """A VM auth token for the ingress: send ``token`` as the X-Ember-Proxy-Auth header to ``endpoint``."""

    token: str
    vm_id: str
    expires_at: str
    allowed_ports: str
    kind: str = "proxy"
    endpoint: str = ""
    raw: Mapping[str, Any] = raw_field()
