"""What the API answers, as pydantic models: the OpenAPI document's success bodies, and the checks on them.

The routes build their answers as plain dicts (``vm_view``, ``image_view``, ``build_view``, ...); FastAPI
validates each against its route's ``response_model`` and writes it with pydantic's serializer. A field a
view always writes is required here (nullable where the view writes ``None``); a field it writes only
sometimes has a default, and its routes answer with ``response_model_exclude_unset=True`` (``UNSET``) so
an absent field stays absent: the JSON is the view's, key for key.

Also here: the input types several routes share (``ClientToken``), so the document states their limits.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, Field

from ember.db.webhooks import DeliveryState
from ember.models import BuildState, StateReason, VmState
from ember.tenancy.idempotency import MAX_TOKEN
from ember.tenancy.quotas import Quota

# printable ASCII: what ember.tenancy.idempotency takes (1 to 64 printable characters), in a form the
# document can state (its own check stays: it also guards callers that are not the API)
CLIENT_TOKEN_PATTERN = rf"^[ -~]{{1,{MAX_TOKEN}}}$"
ClientToken = Annotated[
    str,
    Field(
        min_length=1, max_length=MAX_TOKEN, pattern=CLIENT_TOKEN_PATTERN,
        description="Makes the create idempotent: a retry with the same token answers the first one's resource",
    ),
]  # fmt: skip
UNSET: dict[str, Any] = {"response_model_exclude_unset": True}  # for routes whose answers leave fields out


class Accelerator(BaseModel):
    name: str = Field(description="kvm (hardware isolation) or tcg (emulation: no security boundary)")
    security_boundary: bool
    warning: str = Field(default="", description="tcg only: why it is no security boundary")


class HostAccelerator(Accelerator):
    reason: str = Field(description="Why the daemon uses this accelerator")


class Info(BaseModel):
    accelerator: HostAccelerator
    qemu_version: str


class WhoAmI(BaseModel):
    tenant: str
    admin: bool
    key_id: str | None = Field(description="None: root on the Unix socket")


class Egress(BaseModel):
    mode: str = Field(description="none (no network), internet (public addresses only) or allow")
    allow: list[str] = Field(description="With allow: the CIDRs and domain names the VM may reach")


class Vm(BaseModel):
    id: str
    tenant: str
    image: str = Field(description="The image (name:version) it was started from")
    state: VmState
    state_reason: StateReason
    state_message: str
    accelerator: Accelerator
    memory_mib: int
    vcpus: int
    env: dict[str, str]
    tags: dict[str, str]
    egress: Egress
    pid: int | None = Field(description="Its VMM's process id while it has one")
    created_at: str
    updated_at: str
    terminated_at: str | None
    idle_timeout_s: int | None = Field(description="Suspended once idle this long (null: never)")
    auto_resume: bool = Field(description="Exec, file calls, shells and ingress requests resume it when suspended")
    suspended_ttl_s: int | None = Field(description="Terminated once suspended this long (0: when idle; null: kept)")
    max_duration_s: int | None = Field(description="Terminated this long after launch (null: no limit)")
    max_duration_running_only: bool = Field(description="The maximum duration counts running time only")
    suspended_at: str | None = Field(description="When it was suspended, while it is")
    endpoint: str | None = Field(
        default=None, description="Its ingress address, http://<vm-id>.<domain>:<port>/ (run and inspect answers)"
    )


class LiveVm(Vm):
    """A VM's record; with ``live=true`` also what its VMM and agent say (null when they cannot)."""

    vmm_status: str | None = None
    host_pss_mib: float | None = None
    agent_ping_ms: float | None = None


class Suspended(Vm):
    elapsed_ms: float
    phases_ms: dict[str, float]
    snapshot_bytes: int = Field(description="Bytes the suspend wrote")


class Resumed(Vm):
    elapsed_ms: float
    phases_ms: dict[str, float]


class Event(BaseModel):
    id: int
    vm_id: str
    tenant: str
    at: str
    from_state: VmState | None = Field(description="None: the VM's first event")
    to_state: VmState
    reason: StateReason
    message: str
    actor: str = Field(description="The key id, root (the Unix socket's root) or system (the daemon's own work)")


class FileEntry(BaseModel):
    name: str
    mode: int
    size: int
    mtime: int


class Listing(BaseModel):
    entries: list[FileEntry] = Field(description="Sorted by name")
    truncated: bool = Field(description="The directory has more than EMBER_LS_MAX_ENTRIES entries")


class FileWritten(BaseModel):
    path: str
    bytes: int


class StdinWritten(BaseModel):
    bytes: int


class Image(BaseModel):
    """An image version (``image_view``)."""

    name: str = Field(description="repo:version")
    tenant: str | None = Field(description="None: a built-in base, visible to every tenant")
    builtin: bool
    created_at: str
    parent: str | None = Field(description="The image it was snapshotted from")
    disk_bytes: int
    memory_bytes: int
    memory_mib: int
    vcpus: int
    accelerator: str
    qemu_version: str


class ImageItem(BaseModel):
    """An image version, its build, or both: an image made by a build has the fields of both; a build
    still running or failed has only the build's; an image not built (a snapshot, a base) only its own."""

    name: str = Field(description="repo:version")
    state: BuildState = Field(description="CREATED, or the build's state")
    tenant: str | None = Field(description="None: a built-in base, visible to every tenant")
    created_at: str
    disk_bytes: int
    memory_bytes: int
    # the image's
    builtin: bool = False
    parent: str | None = None
    memory_mib: int = 0
    vcpus: int = 0
    accelerator: str = ""
    qemu_version: str = ""
    # the build's
    repo: str = ""
    version: int = 0
    error: str | None = None
    failed_step: str | None = None
    config: dict[str, Any] | None = Field(default=None, description="The image's config (OCI-like)")
    build: dict[str, Any] | None = Field(default=None, description="The build's steps, readiness and timings")
    build_seconds: float = 0.0
    finished_at: str | None = None


class Tenant(BaseModel):
    name: str
    account_id: str
    created_at: str
    quotas: dict[Quota, int] = Field(description="The effective limits (the defaults with this tenant's overrides)")


class TenantWithUsage(Tenant):
    usage: dict[Quota, int] = Field(description="The current use of each quota")


class ApiKey(BaseModel):
    key_id: str
    tenant: str | None = Field(description="None: an admin key")
    name: str
    access_key_id: str
    created_at: str
    revoked_at: str | None
    admin: bool


class CreatedKey(ApiKey):
    """A new key. Its secrets are in the first answer only: a retry with its client_token answers without them."""

    api_key: str = Field(default="", description="The bearer token (Authorization: Bearer ...)")
    secret_access_key: str = Field(default="", description="The AWS Signature V4 secret of access_key_id")


class Webhook(BaseModel):
    id: str
    tenant: str
    url: str
    created_at: str


class CreatedWebhook(Webhook):
    secret: str = Field(description="Signs each delivery (X-Ember-Signature)")


class Delivery(BaseModel):
    id: int
    webhook_id: str
    event_id: int
    attempt: int
    at: str
    status: int = Field(description="The receiver's HTTP status; 0: no answer")
    error: str
    state: DeliveryState = Field(description="PENDING: scheduled, not yet made")
    duration_ms: float
