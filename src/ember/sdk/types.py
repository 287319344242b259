"""Typed results: frozen dataclasses made from the API's JSON by :func:`decode`.

Each keeps the JSON it came from in ``raw`` (not compared, not shown), which the CLI prints for
``--json``. Fields the daemon does not send (an older daemon) take their defaults; a missing
required field is a :class:`~ember.sdk.errors.ProtocolError`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, TypeVar

from ember.sdk.errors import ProtocolError

T = TypeVar("T")
EMPTY: Mapping[str, Any] = {}


def _raw() -> Any:
    return field(default_factory=dict, repr=False, compare=False)


def decode(cls: type[T], data: Any, **nested: Any) -> T:
    """``cls`` from a JSON object: each field from the key of its name (its default if absent);
    ``nested`` gives a field's value already converted."""
    if not isinstance(data, Mapping):
        raise ProtocolError(f"the daemon sent {type(data).__name__} where a {cls.__name__} object was expected")
    values: dict[str, Any] = {}
    for f in fields(cls):  # type: ignore[arg-type]
        if f.name == "raw":
            values["raw"] = data
        elif f.name in nested:
            values[f.name] = nested[f.name]
        elif f.name in data and data[f.name] is not None:
            values[f.name] = data[f.name]
        elif f.default is MISSING and f.default_factory is MISSING:
            raise ProtocolError(f"the daemon's {cls.__name__} has no {f.name!r}")
    return cls(**values)


def decode_list(cls: type[T], data: Any) -> list[T]:
    if not isinstance(data, list):
        raise ProtocolError(f"the daemon sent {type(data).__name__} where a list of {cls.__name__} was expected")
    return [decode(cls, item) for item in data]


@dataclass(frozen=True)
class Accelerator:
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
    pid: int | None = None
    created_at: str = ""
    updated_at: str = ""
    terminated_at: str = ""
    raw: Mapping[str, Any] = _raw()

    @classmethod
    def fields_from(cls, data: Any) -> dict[str, Any]:
        """The constructor arguments of a VM (of this class or a bound subclass) from its JSON."""
        accel = decode(Accelerator, data.get("accelerator") if isinstance(data, Mapping) else None)
        base = decode(VmData, data, accelerator=accel)
        return {f.name: getattr(base, f.name) for f in fields(VmData)}


@dataclass(frozen=True)
class Transition:
    """What a suspend or resume did: the VM's state after it, its time and its steps' times."""

    state: str
    elapsed_ms: float = 0.0
    phases_ms: Mapping[str, float] = field(default_factory=dict)
    snapshot_bytes: int = 0
    raw: Mapping[str, Any] = _raw()


@dataclass(frozen=True)
class ExecOutput:
    """Output of a running command: ``stream`` is "stdout" or "stderr"."""

    stream: str
    data: bytes


@dataclass(frozen=True)
class ExecExit:
    exit_code: int
    signal: int = 0
    timed_out: bool = False


ExecEvent = ExecOutput | ExecExit


@dataclass(frozen=True)
class ExecResult:
    exit_code: int
    signal: int
    timed_out: bool
    stdout: bytes
    stderr: bytes


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
    raw: Mapping[str, Any] = _raw()


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
    raw: Mapping[str, Any] = _raw()


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
    raw: Mapping[str, Any] = _raw()

    @property
    def ok(self) -> bool:
        return self.state == "CREATED"


@dataclass(frozen=True)
class Tenant:
    name: str
    account_id: str = ""
    created_at: str = ""
    quotas: Mapping[str, int] = field(default_factory=dict)
    usage: Mapping[str, int] = field(default_factory=dict)  # current use of each quota (``tenants.get`` only)
    raw: Mapping[str, Any] = _raw()


@dataclass(frozen=True)
class ApiKey:
    key_id: str
    tenant: str | None = None  # None: an admin key
    name: str = ""
    access_key_id: str = ""
    created_at: str = ""
    revoked_at: str = ""
    raw: Mapping[str, Any] = _raw()


@dataclass(frozen=True)
class CreatedKey:
    """A new key with its secrets, which the daemon shows this once: a retry with the same client_token
    answers the key without them (``api_key`` and ``secret_access_key`` are "")."""

    key_id: str
    api_key: str = ""
    tenant: str | None = None
    name: str = ""
    access_key_id: str = ""
    secret_access_key: str = ""
    created_at: str = ""
    raw: Mapping[str, Any] = _raw()


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
    raw: Mapping[str, Any] = _raw()


@dataclass(frozen=True)
class Webhook:
    id: str
    url: str
    created_at: str = ""
    raw: Mapping[str, Any] = _raw()


@dataclass(frozen=True)
class CreatedWebhook:
    """A new webhook with its signing secret, which the daemon shows this once."""

    id: str
    url: str
    secret: str
    created_at: str = ""
    raw: Mapping[str, Any] = _raw()


@dataclass(frozen=True)
class Delivery:
    id: int
    webhook_id: str
    event_id: int
    attempt: int = 0
    at: str = ""
    status: int | None = None
    error: str = ""
    state: str = ""
    duration_ms: float = 0.0
    raw: Mapping[str, Any] = _raw()


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
    raw: Mapping[str, Any] = _raw()

    @classmethod
    def from_json(cls, data: Any) -> Usage:
        get = data.get if isinstance(data, Mapping) else EMPTY.get
        return decode(
            cls, data, tenants=tuple(decode_list(TenantUsage, get("tenants", []))),
            vms=tuple(decode_list(VmUsage, get("vms", []))),
        )  # fmt: skip


@dataclass(frozen=True)
class Whoami:
    tenant: str
    admin: bool = False
    key_id: str = ""
    raw: Mapping[str, Any] = _raw()


@dataclass(frozen=True)
class Info:
    accelerator: Accelerator
    qemu_version: str = ""
    raw: Mapping[str, Any] = _raw()
