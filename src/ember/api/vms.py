"""VM routes: run, list, inspect, events, remove; suspend, resume, snapshot; exec, files.

Every route with a VM id takes the VM through :func:`owned_vm`: another tenant's VM answers exactly like a
missing one (404, the same body).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Any

import pydantic_core
from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, WithJsonSchema

from ember import applog
from ember.agent import ExecRequest, ExecResult
from ember.api.auth import principal, tenant_filter
from ember.api.execstdin import StdinPipe, StdinPipes
from ember.api.images import image_view, resolve_image
from ember.api.ingress import add_token_routes, endpoint
from ember.api.limits import Limits
from ember.api.models import (
    UNSET,
    ClientToken,
    Event,
    FileWritten,
    Image,
    Listing,
    LiveVm,
    Resumed,
    StdinWritten,
    Suspended,
    Vm,
)
from ember.api.processes import add_process_routes
from ember.api.schema import errors, raw_body, streamed
from ember.api.shell import add_shell_routes
from ember.api.streaming import ReleasingResponse, ndjson
from ember.applog import LogChunk
from ember.config import Settings
from ember.engine import RunOptions
from ember.errors import EmberError, InvalidRequest, VmNotFound
from ember.imagecfg import exec_settings
from ember.metrics import Operation
from ember.models import EventRecord, IdlePolicy, ImageRecord, VmRecord, VmState
from ember.network.policy import parse_policy
from ember.tenancy import names
from ember.tenancy.idempotency import Idempotency, Settle
from ember.tenancy.principal import Principal
from ember.tenancy.quotas import Ask, Quota
from ember.vmm.accel import TCG_WARNING

if TYPE_CHECKING:
    from ember.daemon import Daemon

ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]{0,255}$"
TAG_KEY = r"^[A-Za-z0-9_.:/=+@-]{1,128}$"
EXEC_ENV_NAME = r"^[^=]+$"  # an exec's variables: any name the guest's environment can hold
NO_NUL = r"^[^\x00]*$"
MAX_ENV, MAX_TAGS, MAX_VALUE = 128, 50, 4096
TAG_FILTER = r"^[^=]+="  # KEY=VALUE
VM_ID = re.compile(r"^vm-[0-9a-f]{1,64}$")


def _map_schema(key: str, most: int | None, value: dict[str, Any]) -> WithJsonSchema:
    # pydantic documents a dict with constrained keys as patternProperties, which lets any other key
    # through: this says that every key matches
    bound = {} if most is None else {"maxProperties": most}
    return WithJsonSchema({"type": "object", **bound, "propertyNames": {"pattern": key}, "additionalProperties": value})


Value = Annotated[str, StringConstraints(max_length=MAX_VALUE, pattern=NO_NUL)]
VALUE_SCHEMA = {"type": "string", "maxLength": MAX_VALUE, "pattern": NO_NUL}
EnvMap = Annotated[
    dict[Annotated[str, StringConstraints(pattern=ENV_NAME)], Value],
    Field(max_length=MAX_ENV, description=f"Environment variables of every exec (at most {MAX_ENV})"),
    _map_schema(ENV_NAME, MAX_ENV, VALUE_SCHEMA),
]
TagMap = Annotated[
    dict[Annotated[str, StringConstraints(pattern=TAG_KEY)], Value],
    Field(max_length=MAX_TAGS, description=f"Metadata tags (at most {MAX_TAGS}): GET /v1/vms?tag=K=V finds them"),
    _map_schema(TAG_KEY, MAX_TAGS, VALUE_SCHEMA),
]
ExecEnv = Annotated[
    dict[Annotated[str, StringConstraints(pattern=EXEC_ENV_NAME)], str],
    _map_schema(EXEC_ENV_NAME, None, {"type": "string"}),
]


class RunBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image: str = Field(min_length=1, max_length=200)
    version: int | None = Field(default=None, ge=1, le=2**31)
    memory_mib: int | None = Field(default=None, ge=1, le=1 << 20)
    vcpus: int | None = Field(default=None, ge=1, le=256)
    env: EnvMap = Field(default_factory=dict)
    tags: TagMap = Field(default_factory=dict)
    egress: str = Field(default="none", max_length=16, description="none (default), internet or allow")
    allow: list[Annotated[str, Field(max_length=253)]] = Field(
        default_factory=list, max_length=1000, description="With egress allow: CIDRs and domain names"
    )
    client_token: ClientToken | None = None
    run_payload: str | None = Field(
        default=None, description="The body of the app's run hook (POST /ember/v1/run), at most "
        "EMBER_RUN_PAYLOAD_MAX_BYTES (16 KiB) of UTF-8; images without a run hook ignore it",
    )  # fmt: skip
    # idle policy and lifetime (ember.lifecycle); the bounds that are Settings are checked in idle_policy()
    idle_timeout_s: int | None = Field(
        default=None, ge=1, le=2**31, description="Suspend it once idle this long (at least EMBER_MIN_IDLE_SECONDS)"
    )
    auto_resume: bool = Field(default=False, description="An exec, file call, shell or ingress request resumes it")
    suspended_ttl_s: int | None = Field(
        default=None, ge=0, le=2**31, description="Terminate it once suspended this long; 0: terminate when idle"
    )
    max_duration_s: int | None = Field(
        default=None, ge=1, le=2**31, description="Terminate it this long after launch (EMBER_MAX_DURATION_LIMIT)"
    )
    max_duration_running_only: bool = Field(default=False, description="The maximum duration counts running time only")


def idle_policy(body: RunBody, settings: Settings) -> IdlePolicy:
    """The run's idle policy, checked against the daemon's bounds (clear 400s)."""
    if body.idle_timeout_s is not None and body.idle_timeout_s < settings.min_idle_s:
        raise InvalidRequest(
            f"idle_timeout_s={body.idle_timeout_s}: the shortest idle timeout is {settings.min_idle_s} seconds"
        )
    if body.max_duration_s is not None and body.max_duration_s > settings.max_duration_limit_s:
        raise InvalidRequest(
            f"max_duration_s={body.max_duration_s}: the longest maximum duration is {settings.max_duration_limit_s} "
            "seconds"
        )
    if body.max_duration_running_only and body.max_duration_s is None:
        raise InvalidRequest("max_duration_running_only needs max_duration_s")
    if body.suspended_ttl_s == 0 and body.idle_timeout_s is None:
        raise InvalidRequest("suspended_ttl_s=0 terminates the VM when it is idle: it needs idle_timeout_s")
    return IdlePolicy(
        idle_timeout_s=body.idle_timeout_s, auto_resume=body.auto_resume, suspended_ttl_s=body.suspended_ttl_s,
        max_duration_s=body.max_duration_s, max_duration_running_only=body.max_duration_running_only,
    )  # fmt: skip


class SnapshotBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=63, pattern=names.REPO.pattern, description="The new image's repo")
    client_token: ClientToken | None = None


class ExecBody(BaseModel):
    # unknown fields are refused: the removed ``stdin_b64`` must not be ignored silently
    model_config = ConfigDict(extra="forbid")

    argv: list[str] = Field(min_length=1, max_length=1000)
    env: ExecEnv = Field(default_factory=dict)
    cwd: str = ""
    user: str = ""
    timeout_s: float = Field(default=0, ge=0, le=86400)
    stdin: bool = False  # the input follows in PUT /v1/vms/{id}/exec/stdin/{the first event's "stdin"}


def accel_view(record_accel: str) -> dict[str, Any]:
    secure = record_accel == "kvm"
    return {"name": record_accel, "security_boundary": secure, **({} if secure else {"warning": TCG_WARNING})}


def vm_view(vm: VmRecord) -> dict[str, Any]:
    return {
        "id": vm.id, "tenant": vm.tenant, "image": names.public(vm.image), "state": vm.state.value,
        "state_reason": vm.state_reason.value, "state_message": vm.state_message,
        "accelerator": accel_view(vm.machine.accel.value), "memory_mib": vm.machine.memory_mib,
        "vcpus": vm.machine.vcpus, "env": vm.env, "tags": vm.tags, "egress": vm.egress.view(), "pid": vm.pid or None,
        "created_at": vm.created_at, "updated_at": vm.updated_at, "terminated_at": vm.terminated_at or None,
        "idle_timeout_s": vm.idle.idle_timeout_s, "auto_resume": vm.idle.auto_resume,
        "suspended_ttl_s": vm.idle.suspended_ttl_s, "max_duration_s": vm.idle.max_duration_s,
        "max_duration_running_only": vm.idle.max_duration_running_only, "suspended_at": vm.suspended_at or None,
    }  # fmt: skip


def event_view(event: EventRecord) -> dict[str, Any]:
    return {
        "id": event.id, "vm_id": event.vm_id, "tenant": event.tenant, "at": event.at,
        "from_state": event.from_state or None, "to_state": event.to_state, "reason": event.reason,
        "message": event.message, "actor": event.actor,
    }  # fmt: skip


def _tag_filters(tag: list[str]) -> dict[str, str]:
    """``KEY=VALUE`` filters (TAG_FILTER) as a dict."""
    return {k: v for k, _, v in (item.partition("=") for item in tag)}


MAX_EVENT_ID = 2**63 - 1  # an event id is a 64-bit integer in the database: a larger ``after`` is a 400, not a 500


def ago(seconds: float) -> str:
    return (datetime.now(UTC) - timedelta(seconds=seconds)).isoformat(timespec="milliseconds")


def owned_by(daemon: Daemon, vm_id: str, who: Principal) -> VmRecord:
    """The VM ``vm_id`` if ``who`` may see it; else VmNotFound, exactly as for a missing one."""
    record = daemon.engine.store.get_vm(vm_id) if VM_ID.match(vm_id) else None
    if record is None or (not who.admin and record.tenant != who.tenant):
        raise VmNotFound(vm_id[:80])
    return record


def _check_size(image: ImageRecord, body: RunBody) -> None:
    machine = image.machine
    for field, asked, has in (("memory_mib", body.memory_mib, machine.memory_mib),
                              ("vcpus", body.vcpus, machine.vcpus)):  # fmt: skip
        if asked is not None and asked != has:
            raise InvalidRequest(
                f"{field}={asked}: image {names.public(image.name)} was snapshotted running with {field}={has}, "
                f"and a VM restored from it has exactly that; build an image with the size you need"
            )


async def launch(daemon: Daemon, limits: Limits, who: Principal, body: RunBody) -> VmRecord:
    """Run a VM (POST /v1/vms): checks, quotas, idempotency by ``body.client_token``; its record."""

    async def existing(vm_id: str) -> VmRecord:
        return owned_by(daemon, vm_id, who)

    async def create(settle: Settle) -> VmRecord:
        return await start(daemon, limits, who, body, settle=settle)

    return await Idempotency(daemon.tenants).create(
        who, "vm", body.client_token, body.model_dump(mode="json"), create, existing
    )


async def start(
    daemon: Daemon, limits: Limits, who: Principal, body: RunBody, *, settle: Settle,
    aws: Mapping[str, Any] | None = None,
) -> VmRecord:  # fmt: skip
    """Run a VM without idempotency (``settle(id)`` once its record exists): checks, quotas, the engine. The AWS
    API's RunMicrovm (ember.aws.microvms) runs here too, within its own client token's claim, with ``aws``: what
    it shows back, recorded with the VM."""
    payload = (body.run_payload or "").encode()
    if len(payload) > daemon.settings.run_payload_max_bytes:
        raise InvalidRequest(
            f"run_payload is {len(payload)} bytes: at most {daemon.settings.run_payload_max_bytes} "
            "(pass larger input to the app through a file: 'ember cp')"
        )
    image = resolve_image(daemon, who, body.image, body.version)
    _check_size(image, body)
    policy = idle_policy(body, daemon.settings)
    egress = parse_policy(body.egress, body.allow, max_entries=daemon.settings.egress_max_allow)
    asks = [Ask(Quota.RUNNING_VMS, 1), Ask(Quota.RUNNING_VCPUS, image.machine.vcpus),
            Ask(Quota.RUNNING_MEMORY_MIB, image.machine.memory_mib)]  # fmt: skip
    async with limits.admit(who.tenant, asks, Operation.LAUNCH) as release:

        def recorded(vm_id: str) -> None:
            settle(vm_id)
            release()  # the PENDING record counts from here

        options = RunOptions(
            tenant=who.tenant, env=body.env, tags=body.tags, run_payload=payload, idle=policy,
            egress=egress, aws=aws or {},
            on_record=recorded,
        )  # fmt: skip
        return await daemon.engine.run(image, options)


def suspend_asks(vm: VmRecord) -> list[Ask]:
    """What suspending ``vm`` adds to its tenant's quotas: a suspend writes at most the guest's memory (its
    disk's changes are on disk already)."""
    return [Ask(Quota.SUSPENDED_VMS, 1), Ask(Quota.STORAGE_BYTES, vm.machine.memory_mib << 20)]


def add_vm_routes(app: FastAPI, daemon: Daemon, limits: Limits) -> None:
    engine = daemon.engine
    once = Idempotency(daemon.tenants)

    def owned(vm_id: str, who: Principal) -> VmRecord:
        return owned_by(daemon, vm_id, who)

    async def owned_vm(vm_id: str, who: Principal = Depends(principal)) -> VmRecord:
        """FastAPI dependency: the VM, if the caller may see it (one indexed read: done inline)."""
        return owned(vm_id, who)

    @app.post("/v1/vms", status_code=201, response_model=Vm, responses=errors(409, 503, 507), **UNSET)
    async def run_vm(body: RunBody, who: Principal = Depends(principal)) -> dict[str, Any]:
        vm = await launch(daemon, limits, who, body)
        return {**vm_view(vm), "endpoint": endpoint(daemon.settings, vm.id)}

    @app.get("/v1/vms", response_model=list[Vm])
    async def list_vms(
        who: Principal = Depends(principal),
        state: VmState | None = None,
        image: str | None = Query(default=None, max_length=200),
        tag: list[Annotated[str, StringConstraints(pattern=TAG_FILTER)]] = Query(
            default=[], description="KEY=VALUE (repeatable): VMs with every one of these tags"
        ),
        all: bool = False,
        tenant: str | None = Query(default=None, max_length=63),
    ) -> Response:
        """VMs, oldest first. ``tag=K=V`` (repeatable) keeps those with every tag; ``all`` adds TERMINATED ones."""
        wanted = _tag_filters(tag)

        def listed() -> bytes:
            records = engine.store.list_vms(
                tenant=tenant_filter(who, tenant), terminated=all or state is VmState.TERMINATED,
                terminated_since=ago(daemon.settings.terminated_retention_s),
            )  # fmt: skip
            # written as they are: each is vm_view's, the shape GET /v1/vms/{id} checks against Vm; checking
            # hundreds again here would cost more than the whole list (the benchmark's list p95 <= 20 ms)
            return pydantic_core.to_json([
                vm_view(v) for v in records
                if (state is None or v.state is state) and (image is None or names.public(v.image) == image
                                                            or names.public(v.image).partition(":")[0] == image)
                and all_tags(v, wanted)
            ])  # fmt: skip

        # every record read, decoded and written: milliseconds with hundreds of VMs, so off the event loop
        return Response(await asyncio.to_thread(listed), media_type="application/json")

    def all_tags(vm: VmRecord, wanted: dict[str, str]) -> bool:
        return all(vm.tags.get(k) == v for k, v in wanted.items())

    @app.get("/v1/vms/{vm_id}", response_model=LiveVm, **UNSET)
    async def inspect_vm(vm: VmRecord = Depends(owned_vm), live: bool = False) -> dict[str, Any]:
        """The VM's record; ``live`` also asks its VMM and agent (status, host memory, a ping's time)."""
        view = {**vm_view(vm), "endpoint": endpoint(daemon.settings, vm.id)}
        if live and vm.state is not VmState.TERMINATED:
            view.update(await engine.inspect(vm.id))
        return view

    @app.get("/v1/vms/{vm_id}/events", response_model=list[Event])
    async def vm_events(
        vm: VmRecord = Depends(owned_vm),
        after: int = Query(default=0, ge=0, le=MAX_EVENT_ID),
        limit: int = Query(1000, ge=1, le=10000),
    ) -> list[dict[str, Any]]:
        """The VM's state changes, oldest first (``after``: an event id, to page)."""
        events = await asyncio.to_thread(engine.store.list_events, vm_id=vm.id, after=after, limit=limit)
        return [event_view(e) for e in events]

    @app.get("/v1/events", response_model=list[Event])
    async def list_events(
        who: Principal = Depends(principal),
        vm: str | None = Query(default=None, max_length=80),
        after: int = Query(default=0, ge=0, le=MAX_EVENT_ID),
        limit: int = Query(default=1000, ge=1, le=10000),
        tenant: str | None = Query(default=None, max_length=63),
    ) -> list[dict[str, Any]]:
        """Every VM state change of the tenant (an admin: of every tenant, or ``tenant``), oldest first."""
        if vm is not None:
            owned(vm, who)
        events = await asyncio.to_thread(
            engine.store.list_events, tenant=tenant_filter(who, tenant), vm_id=vm, after=after, limit=limit
        )
        return [event_view(e) for e in events]

    @app.delete("/v1/vms/{vm_id}", status_code=204, responses=errors(409))
    async def remove_vm(vm: VmRecord = Depends(owned_vm)) -> Response:
        """Terminate the VM: its VMM stops and its files go; its record stays listable (TERMINATED)."""
        await engine.remove(vm.id)
        return Response(status_code=204)

    @app.post("/v1/vms/{vm_id}/suspend", response_model=Suspended, responses=errors(409, 503, 507), **UNSET)
    async def suspend_vm(vm: VmRecord = Depends(owned_vm)) -> dict[str, Any]:
        async with limits.admit(vm.tenant, suspend_asks(vm), Operation.SUSPEND):
            t = await engine.suspend(vm.id)
        view = vm_view(engine.get(vm.id))
        return {**view, "elapsed_ms": round(t.total_ms, 1), "phases_ms": t.phases_ms, "snapshot_bytes": t.bytes_written}

    def admit_resume(vm: VmRecord) -> contextlib.AbstractAsyncContextManager[Any]:
        machine = vm.machine
        asks = [Ask(Quota.RUNNING_VMS, 1), Ask(Quota.RUNNING_VCPUS, machine.vcpus),
                Ask(Quota.RUNNING_MEMORY_MIB, machine.memory_mib)]  # fmt: skip
        return limits.admit(vm.tenant, asks, Operation.RESUME)

    engine.admit_resume = admit_resume  # auto-resumes (ember.lifecycle.wake) are held to the same quotas

    @app.post("/v1/vms/{vm_id}/resume", response_model=Resumed, responses=errors(409, 503, 507), **UNSET)
    async def resume_vm(vm: VmRecord = Depends(owned_vm)) -> dict[str, Any]:
        async with admit_resume(vm):
            t = await engine.resume(vm.id)
        return {**vm_view(engine.get(vm.id)), "elapsed_ms": round(t.total_ms, 1), "phases_ms": t.phases_ms}

    @app.post("/v1/vms/{vm_id}/snapshot", status_code=201, response_model=Image, responses=errors(409, 503, 507))
    async def snapshot_vm(body: SnapshotBody, vm: VmRecord = Depends(owned_vm)) -> dict[str, Any]:
        """Fork the running VM into a new image of its tenant."""
        name = names.new_repo(vm.tenant, body.name)
        source = engine.images.get(vm.image)
        asks = [Ask(Quota.IMAGES, 1), Ask(Quota.STORAGE_BYTES, source.disk_bytes + source.memory_bytes)]
        who = Principal(vm.tenant, admin=False)

        async def create(settle: Settle) -> dict[str, Any]:
            async with limits.admit(vm.tenant, asks):
                image = await engine.snapshot(vm.id, name)
            settle(image.name)
            return image_view(image)

        async def existing(image_name: str) -> dict[str, Any]:
            return image_view(engine.images.get(image_name))

        request = {"vm_id": vm.id, **body.model_dump(mode="json")}  # the same token on another VM is a 409
        return await once.create(who, "snapshot", body.client_token, request, create, existing)

    add_exec_routes(app, daemon, owned_vm)
    add_process_routes(app, daemon, owned_vm)
    add_shell_routes(app, daemon, owned)
    add_token_routes(app, daemon, owned_vm)


def add_exec_routes(app: FastAPI, daemon: Daemon, owned_vm: Any) -> None:
    engine = daemon.engine
    stdin_pipes = StdinPipes()

    @app.post(
        "/v1/vms/{vm_id}/exec", response_class=StreamingResponse,
        responses={**streamed("application/x-ndjson", "Output events, then the exit status (NDJSON)"),
                   **errors(409, 422, 503)},
    )  # fmt: skip
    async def exec_vm(body: ExecBody, vm: VmRecord = Depends(owned_vm)) -> StreamingResponse:
        """Run a command; NDJSON output events, then its exit status. With ``stdin`` the first
        event is ``{"stdin": ID}``: stream the input with PUT /v1/vms/{vm_id}/exec/stdin/ID.
        The image's ENV comes first, then the VM's own environment (``env`` at run), then the
        request's; ``cwd`` and ``user`` default to the image's WORKDIR and USER (ember.imagecfg)."""
        run = exec_settings(engine.image_defaults(vm), vm.env, body.env, cwd=body.cwd, user=body.user)
        req = ExecRequest(argv=body.argv, env=run.env, cwd=run.cwd, user=run.user, timeout_s=body.timeout_s)
        vm_id = vm.id
        busy = await _busy(vm_id, "exec in")  # until the output stream ends
        try:
            pipe = stdin_pipes.open(vm_id, daemon.settings.agent_timeout_s) if body.stdin else None
        except BaseException:
            await busy.aclose()
            raise
        try:
            events = await engine.exec(vm_id, req, pipe)
        except BaseException:
            await busy.aclose()
            if pipe is not None:
                stdin_pipes.close(pipe)  # no exec (unknown VM, not running, bad input): no pipe
            raise
        # Fail before the 200 if the command cannot start (bad input, cwd, unknown user...):
        # its first event, or the agent pulling stdin, shows that it runs.
        first = asyncio.ensure_future(anext(events))
        try:
            if pipe is not None:
                wanted = asyncio.ensure_future(pipe.wanted.wait())
                await asyncio.wait({first, wanted}, return_when=asyncio.FIRST_COMPLETED)
                wanted.cancel()
                if first.done():
                    first.result()
            else:
                await first
        except BaseException:
            await _end_exec(events, first, pipe, busy)
            raise

        async def stream() -> AsyncIterator[bytes]:
            try:
                if pipe is not None:
                    yield ndjson({"stdin": pipe.id})
                item: tuple[str, bytes] | ExecResult | None = await first
                while item is not None:
                    if isinstance(item, ExecResult):
                        yield ndjson({"exit_code": item.exit_code, "signal": item.signal, "timed_out": item.timed_out})
                        return
                    yield ndjson({"stream": item[0], "data": base64.b64encode(item[1]).decode()})
                    item = await anext(events, None)
            except EmberError as exc:
                yield ndjson({"error": type(exc).__name__, "message": str(exc)})

        async def release() -> None:
            await _end_exec(events, first, pipe, busy)

        return ReleasingResponse(
            stream(), release=release, release_timeout_s=daemon.settings.agent_timeout_s,
            media_type="application/x-ndjson",
        )  # fmt: skip

    async def _busy(vm_id: str, action: str) -> contextlib.AsyncExitStack:
        """Hold the VM busy (no idle suspend) and wake it (auto-resume) for a guest call; the caller closes the
        returned stack when the call, its streams included, has ended."""
        stack = contextlib.AsyncExitStack()
        await stack.enter_async_context(engine.using(vm_id, action))
        return stack

    async def _end_exec(
        events: AsyncIterator[tuple[str, bytes] | ExecResult], first: asyncio.Future[Any], pipe: StdinPipe | None,
        busy: contextlib.AsyncExitStack,
    ) -> None:  # fmt: skip
        await busy.aclose()
        if pipe is not None:
            stdin_pipes.close(pipe)
        if not first.done():
            first.cancel()
        with contextlib.suppress(BaseException):
            await first
        with contextlib.suppress(Exception):
            await events.aclose()  # type: ignore[attr-defined]

    @app.get(
        "/v1/vms/{vm_id}/logs", response_class=StreamingResponse,
        responses={**streamed("application/x-ndjson", "The app's output: {offset, data} (base64) and "
                              "{offset, skipped} events (NDJSON)"), **errors(409, 422, 503)},
    )  # fmt: skip
    async def vm_logs(
        vm: VmRecord = Depends(owned_vm), follow: bool = False,
        tail: int | None = Query(default=None, ge=0, le=2**62, description="Only the last this many bytes"),
    ) -> StreamingResponse:  # fmt: skip
        """The app's stdout and stderr (its ENTRYPOINT/CMD), as the guest keeps them (the newest
        EMBER_APP_LOG_BYTES of the image's build); ``follow`` goes on with new output. A reader slower
        than the app gets a ``skipped`` event for the bytes overwritten meanwhile (ember.applog)."""
        vm_id = vm.id

        async def read(start: int, limit: int, wait_s: float) -> LogChunk:
            return await engine.read_log(vm_id, start, limit, wait_s)

        head = await applog.first_chunk(read)  # a VM without an app, or not running: an error, not a 200

        async def stream() -> AsyncIterator[bytes]:
            try:
                async for event in applog.events(read, head, tail=tail, follow=follow):
                    yield ndjson(event)
            except EmberError as exc:
                yield ndjson({"error": type(exc).__name__, "message": str(exc)})

        return StreamingResponse(stream(), media_type="application/x-ndjson")

    @app.put(
        "/v1/vms/{vm_id}/exec/stdin/{stdin_id}", response_model=StdinWritten, responses=errors(409, 422, 503),
        openapi_extra=raw_body("application/octet-stream", "The exec's stdin"),
    )  # fmt: skip
    async def exec_stdin(stdin_id: str, request: Request, vm: VmRecord = Depends(owned_vm)) -> dict[str, Any]:
        """The stdin of a running exec, as the raw request body (streamed, flow-controlled)."""
        pipe = stdin_pipes.claim(vm.id, stdin_id)
        return {"bytes": await pipe.attach(request.stream())}

    @app.put(
        "/v1/vms/{vm_id}/files", response_model=FileWritten, responses=errors(409, 422, 503, 507),
        openapi_extra=raw_body("application/octet-stream", "The file's bytes"),
    )  # fmt: skip
    async def put_file(
        request: Request, vm: VmRecord = Depends(owned_vm), path: str = Query(...),
        mode: int = Query(0o644, ge=0, le=0o7777), mkdirs: bool = False,
        user: str | None = Query(None, max_length=256, pattern=NO_NUL,
                                 description="Owner: a name or uid[:gid] (default: the image's USER, else root)"),
    ) -> dict[str, Any]:  # fmt: skip
        """Write a file (a relative ``path`` is under the image's WORKDIR)."""
        async with await _busy(vm.id, "copy files into"):
            size = await engine.write_file(vm.id, path, request.stream(), mode, mkdirs, user=user)
        return {"path": path, "bytes": size}

    @app.get(
        "/v1/vms/{vm_id}/files", response_class=StreamingResponse,
        responses={**streamed("application/octet-stream", "The file's bytes (X-Ember-Size: its size)"),
                   **errors(409, 422, 503)},
    )  # fmt: skip
    async def get_file(vm: VmRecord = Depends(owned_vm), path: str = Query(...)) -> StreamingResponse:
        busy = await _busy(vm.id, "copy files from")  # until the file has streamed
        try:
            size, chunks = await engine.read_file(vm.id, path)
        except BaseException:
            await busy.aclose()
            raise

        async def release() -> None:
            async with busy:
                with contextlib.suppress(Exception):
                    await chunks.aclose()  # type: ignore[attr-defined]

        # the size at open time; the stream ends at EOF even if the file grew
        return ReleasingResponse(
            chunks, release=release, release_timeout_s=daemon.settings.agent_timeout_s,
            media_type="application/octet-stream", headers={"X-Ember-Size": str(size)},
        )  # fmt: skip

    @app.get("/v1/vms/{vm_id}/ls", response_model=Listing, responses=errors(409, 422, 503))
    async def list_files(vm: VmRecord = Depends(owned_vm), path: str = Query(...)) -> dict[str, Any]:
        """``entries`` sorted by name; ``truncated``: the directory has more than EMBER_LS_MAX_ENTRIES."""
        async with await _busy(vm.id, "list files in"):
            listing = await engine.list_dir(vm.id, path)
        entries = [
            {"name": e.name, "mode": e.mode, "size": e.size, "mtime": e.mtime}
            for e in sorted(listing.entries, key=lambda entry: entry.name)
        ]
        return {"entries": entries, "truncated": listing.truncated}
