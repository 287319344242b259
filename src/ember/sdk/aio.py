"""The :class:`AsyncClient` (httpx): the verbs of :class:`ember.sdk.client.Client`, awaited."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar

import httpx

from ember.config import Settings
from ember.sdk import core
from ember.sdk.core import Op, Request
from ember.sdk.errors import ConnectError, ProtocolError
from ember.sdk.types import (
    ApiKey,
    AuthToken,
    Build,
    CreatedKey,
    CreatedWebhook,
    Delivery,
    Event,
    ExecEvent,
    ExecExit,
    ExecOutput,
    ExecResult,
    Image,
    Info,
    Listing,
    LogEvent,
    Process,
    Tenant,
    Transition,
    Usage,
    VmData,
    Webhook,
    Whoami,
    decode,
)

if TYPE_CHECKING:
    from ember.sdk.shell import AsyncShell

T = TypeVar("T")
OnOutput = Callable[[str, bytes], None]
Input = bytes | Iterable[bytes] | AsyncIterable[bytes]
TIMEOUT = httpx.Timeout(core.CONNECT_TIMEOUT_S, read=None)


class AsyncClient:
    """As :class:`ember.sdk.client.Client`, for asyncio:

    async with AsyncClient() as ember:
        vm = await ember.vms.run("debian")
        print((await vm.exec(["python3", "-c", "print(6*7)"])).stdout)
    """

    def __init__(self, url: str | None = None, *, api_key: str | None = None, settings: Settings | None = None) -> None:
        self.endpoint = core.endpoint(url, api_key=api_key, settings=settings)
        ep = self.endpoint
        transport = httpx.AsyncHTTPTransport(uds=ep.socket or None)
        self._http = httpx.AsyncClient(
            base_url=ep.base_url, transport=transport, timeout=TIMEOUT, headers=dict(ep.headers)
        )
        self.vms = AsyncVms(self)
        self.files = AsyncFiles(self)
        self.images = AsyncImages(self)
        self.tenants = AsyncTenants(self)
        self.keys = AsyncKeys(self)
        self.webhooks = AsyncWebhooks(self)
        self.events = AsyncEvents(self)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    @contextlib.asynccontextmanager
    async def open(self, req: Request) -> AsyncIterator[httpx.Response]:
        """Send ``req``; yields its answer once the status is known, raising the typed error of an error."""
        body, headers = req.encoded()
        if body is not None and not isinstance(body, bytes | AsyncIterable):
            body = _aiter(body)  # httpx's AsyncClient sends only async streams
        try:
            async with self._http.stream(req.method, req.target, content=body, headers=headers) as resp:
                if resp.status_code >= 400:
                    core.check(resp.status_code, await resp.aread(), resp.headers.get("Retry-After"))
                yield resp
        except httpx.TransportError as exc:
            raise ConnectError(core.connect_hint(self.endpoint.where, exc)) from None

    # ---- the raw API: any request, its JSON ----

    async def send(self, req: Request) -> Any:
        """``req``'s answer as JSON (None when empty); an error answer raises its typed exception."""
        async with self.open(req) as resp:
            return core.parse(await resp.aread())

    async def text(self, req: Request) -> str:
        async with self.open(req) as resp:
            return (await resp.aread()).decode(errors="replace")

    async def stream(self, req: Request) -> AsyncGenerator[dict[str, Any], None]:
        """``req``'s NDJSON events; an error event raises its typed exception."""
        async with self.open(req) as resp:
            pending = b""
            async for chunk in resp.aiter_bytes():
                pending += chunk
                *lines, pending = pending.split(b"\n")
                if len(pending) > core.MAX_LINE:
                    raise ProtocolError(f"the daemon sent a stream line over {core.MAX_LINE} bytes")
                for line in lines:
                    event = core.stream_line(line)
                    if event is not None:
                        yield event
            event = core.stream_line(pending)
            if event is not None:
                yield event

    async def call(self, op: Op[T]) -> T:
        return op.read(await self.send(op.request))

    # ---- account-wide verbs ----

    async def usage(self, *, tenant: str | None = None, since: str | None = None, until: str | None = None) -> Usage:
        return await self.call(core.usage(tenant=tenant, since=since, until=until))

    async def whoami(self) -> Whoami:
        return await self.call(core.whoami())

    async def info(self) -> Info:
        return await self.call(core.info())


@dataclass(frozen=True)
class AsyncVm(VmData):
    """A VM with its verbs; its fields are as of when it was fetched (``refresh()`` fetches again)."""

    client: AsyncClient = field(kw_only=True, repr=False, compare=False)

    @property
    def files(self) -> AsyncVmFiles:
        return AsyncVmFiles(self.client.files, self.id)

    async def refresh(self) -> AsyncVm:
        return await self.client.vms.get(self.id)

    async def exec(
        self, argv: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: str = "", user: str = "",
        timeout_s: float = 0, stdin: Input | None = None, on_output: OnOutput | None = None,
    ) -> ExecResult:  # fmt: skip
        return await self.client.vms.exec(
            self.id, argv, env=env, cwd=cwd, user=user, timeout_s=timeout_s, stdin=stdin, on_output=on_output
        )

    def exec_events(
        self, argv: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: str = "", user: str = "",
        timeout_s: float = 0, stdin: Input | None = None,
    ) -> AsyncIterator[ExecEvent]:  # fmt: skip
        return self.client.vms.exec_events(self.id, argv, env=env, cwd=cwd, user=user, timeout_s=timeout_s,
                                           stdin=stdin)  # fmt: skip

    async def suspend(self) -> Transition:
        return await self.client.vms.suspend(self.id)

    async def resume(self) -> Transition:
        return await self.client.vms.resume(self.id)

    async def snapshot(self, name: str, *, client_token: str | None = None) -> Image:
        return await self.client.vms.snapshot(self.id, name, client_token=client_token)

    async def remove(self) -> None:
        await self.client.vms.remove(self.id)

    async def events(self) -> list[Event]:
        return await self.client.vms.events(self.id)

    async def logs(self, *, follow: bool = False, tail: int | None = None) -> AsyncIterator[LogEvent]:
        async for event in self.client.vms.logs(self.id, follow=follow, tail=tail):
            yield event

    async def auth_token(self, *, ports: int | str = 8080, minutes: int = 10) -> AuthToken:
        """A token for this VM's ingress endpoint (``endpoint``): the X-Ember-Proxy-Auth header's value."""
        return await self.client.vms.auth_token(self.id, ports=ports, minutes=minutes)


class AsyncVms:
    def __init__(self, client: AsyncClient) -> None:
        self.client = client

    def _bind(self, data: Any) -> AsyncVm:
        return AsyncVm(**VmData.fields_from(data), client=self.client)

    async def run(
        self, image: str, *, version: int | None = None, memory_mib: int | None = None, vcpus: int | None = None,
        env: Mapping[str, str] | None = None, tags: Mapping[str, str] | None = None, client_token: str | None = None,
        run_payload: str | None = None, idle: core.IdlePolicy | None = None,
        egress: str | None = None, allow: Sequence[str] | None = None,
    ) -> AsyncVm:  # fmt: skip
        req = core.vm_run(image, version=version, memory_mib=memory_mib, vcpus=vcpus, env=env, tags=tags,
                          client_token=client_token, run_payload=run_payload, idle=idle,
                          egress=egress, allow=allow)  # fmt: skip
        return self._bind(await self.client.send(req))

    async def get(self, vm_id: str) -> AsyncVm:
        return self._bind(await self.client.send(core.vm_get(vm_id)))

    async def exec(
        self, vm_id: str, argv: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: str = "", user: str = "",
        timeout_s: float = 0, stdin: Input | None = None, on_output: OnOutput | None = None,
    ) -> ExecResult:  # fmt: skip
        """Run ``argv`` to its end: its output (``on_output`` gets each piece as it comes) and exit status."""
        out, err = bytearray(), bytearray()
        async for event in self.exec_events(vm_id, argv, env=env, cwd=cwd, user=user, timeout_s=timeout_s, stdin=stdin):
            if isinstance(event, ExecOutput):
                (out if event.stream == "stdout" else err).extend(event.data)
                if on_output is not None:
                    on_output(event.stream, event.data)
            else:
                return ExecResult(event.exit_code, event.signal, event.timed_out, bytes(out), bytes(err))
        raise ProtocolError("the exec stream ended without an exit status")

    async def exec_events(
        self, vm_id: str, argv: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: str = "", user: str = "",
        timeout_s: float = 0, stdin: Input | None = None,
    ) -> AsyncIterator[ExecEvent]:  # fmt: skip
        """The command's output and exit events as they come; ``stdin`` streams to it from a task,
        in a request of its own (PUT .../exec/stdin/ID), as the command reads it."""
        req = core.exec_request(vm_id, argv, env=env, cwd=cwd, user=user, timeout_s=timeout_s,
                                stdin=stdin is not None)  # fmt: skip
        feed = _Feed(stdin) if stdin is not None else None
        sender: asyncio.Task[Any] | None = None
        try:
            async with contextlib.aclosing(self.client.stream(req)) as stream:
                async for raw in stream:
                    if feed is not None and "stdin" in raw:
                        put = core.exec_stdin_request(vm_id, str(raw["stdin"]), feed.chunks())
                        sender = asyncio.create_task(self.client.send(put))
                        continue
                    event = core.exec_event(raw)
                    if event is not None:
                        yield event
                        if isinstance(event, ExecExit):
                            return
        finally:
            if feed is not None:
                feed.over = True
            if sender is not None:
                # the daemon reports a failed upload in the exec's events
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(sender, core.STDIN_JOIN_S)
        if feed is not None and feed.error is not None:
            raise feed.error

    async def suspend(self, vm_id: str) -> Transition:
        return await self.client.call(core.vm_transition(vm_id, "suspend"))

    async def resume(self, vm_id: str) -> Transition:
        return await self.client.call(core.vm_transition(vm_id, "resume"))

    async def snapshot(self, vm_id: str, name: str, *, client_token: str | None = None) -> Image:
        return await self.client.call(core.vm_snapshot(vm_id, name, client_token=client_token))

    async def remove(self, vm_id: str) -> None:
        await self.client.call(core.vm_remove(vm_id))

    async def events(self, vm_id: str) -> list[Event]:
        return await self.client.call(core.vm_events(vm_id))

    async def logs(self, vm_id: str, *, follow: bool = False, tail: int | None = None) -> AsyncIterator[LogEvent]:
        """The app's stdout and stderr as they are kept (``follow``: then new output as it comes)."""
        async with contextlib.aclosing(self.client.stream(core.vm_logs(vm_id, follow=follow, tail=tail))) as stream:
            async for raw in stream:
                event = core.log_event(raw)
                if event is not None:
                    yield event

    async def shell(
        self, vm_id: str, command: Sequence[str] = (), *, user: str = "", cwd: str = "", rows: int = 24,
        cols: int = 80, term: str = "xterm-256color",
    ) -> AsyncShell:  # fmt: skip
        """A terminal running ``command`` (none: the user's login shell) in the VM, on a connection of its own."""
        from ember.sdk.shell import AsyncShell, shell_target

        ep = self.client.endpoint
        target = shell_target(ep, vm_id, command, user=user, cwd=cwd, rows=rows, cols=cols, term=term)
        return await AsyncShell.open(ep, target)

    async def start_process(
        self, vm_id: str, argv: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: str = "", user: str = ""
    ) -> Process:
        """Start ``argv`` in the background (output to /dev/null); list it with :meth:`processes`."""
        return await self.client.call(core.process_start(vm_id, argv, env=env, cwd=cwd, user=user))

    async def processes(self, vm_id: str) -> list[Process]:
        """The VM's background processes: running ones, and exited ones with their status."""
        return await self.client.call(core.process_list(vm_id))

    async def kill(self, vm_id: str, pid: int, signal: str | int = "TERM") -> None:
        """Signal a running background process (NotFound for any other pid)."""
        await self.client.call(core.process_kill(vm_id, pid, signal))

    async def auth_token(self, vm_id: str, *, ports: int | str = 8080, minutes: int = 10) -> AuthToken:
        return await self.client.call(core.vm_auth_token(vm_id, ports=ports, minutes=minutes))

    async def list(
        self, *, state: str | None = None, image: str | None = None, tags: Mapping[str, str] | None = None,
        all: bool = False, tenant: str | None = None,
    ) -> list[AsyncVm]:  # fmt: skip
        rows = await self.client.send(core.vm_list(state=state, image=image, tags=tags, all=all, tenant=tenant))
        if not isinstance(rows, list):
            raise ProtocolError("the daemon's VM list is not a list")
        return [self._bind(row) for row in rows]


class AsyncFiles:
    def __init__(self, client: AsyncClient) -> None:
        self.client = client

    async def write(
        self, vm_id: str, path: str, data: Input, *, mode: int = 0o644, mkdirs: bool = False, user: str | None = None
    ) -> int:
        """Write ``data`` (bytes, or chunks streamed as they come) to ``path``; the bytes written."""
        return await self.client.call(core.file_write(vm_id, path, data, mode=mode, mkdirs=mkdirs, user=user))

    async def read(self, vm_id: str, path: str) -> bytes:
        async with self.client.open(core.file_read(vm_id, path)) as resp:
            return await resp.aread()

    async def read_to(self, vm_id: str, path: str, out: Path | IO[bytes]) -> int:
        """Copy ``path`` into the local file ``out`` (a path or a binary file) as it streams; the bytes copied."""
        n = 0
        async with self.client.open(core.file_read(vm_id, path)) as resp:
            f = open(out, "wb") if isinstance(out, Path) else out  # noqa: SIM115
            try:
                async for chunk in resp.aiter_bytes():
                    f.write(chunk)
                    n += len(chunk)
            finally:
                if isinstance(out, Path):
                    f.close()
        return n

    async def ls(self, vm_id: str, path: str) -> Listing:
        return await self.client.call(core.file_ls(vm_id, path))


@dataclass(frozen=True)
class AsyncVmFiles:
    """One VM's files (``vm.files``)."""

    files: AsyncFiles
    vm_id: str

    async def write(
        self, path: str, data: Input, *, mode: int = 0o644, mkdirs: bool = False, user: str | None = None
    ) -> int:
        return await self.files.write(self.vm_id, path, data, mode=mode, mkdirs=mkdirs, user=user)

    async def read(self, path: str) -> bytes:
        return await self.files.read(self.vm_id, path)

    async def read_to(self, path: str, out: Path | IO[bytes]) -> int:
        return await self.files.read_to(self.vm_id, path, out)

    async def ls(self, path: str) -> Listing:
        return await self.files.ls(self.vm_id, path)


class AsyncImages:
    def __init__(self, client: AsyncClient) -> None:
        self.client = client

    async def get(self, name: str) -> Image:
        return await self.client.call(core.image_get(name))

    async def prepare(self, name: str = "debian", *, on_progress: Callable[[str], None] | None = None) -> Image:
        """Build the built-in base image ``name`` unless it is built (the first time: minutes)."""
        async with contextlib.aclosing(self.client.stream(core.image_prepare(name))) as stream:
            async for event in stream:
                if "progress" in event and on_progress is not None:
                    on_progress(str(event["progress"]))
                elif "image" in event:
                    return decode(Image, event["image"])
        raise ProtocolError("the prepare stream ended without its image")

    async def build(
        self, context_dir: Path, *, name: str, dockerfile: str = "Dockerfile",
        build_args: Mapping[str, str] | None = None, target: str = "", ready_cmd: str = "",
        ready_timeout: float | None = None, no_cache: bool = False, network: bool = True,
        host_ca_certs: bool = False, client_token: str | None = None, on_log: Callable[[str], None] | None = None,
    ) -> Build:  # fmt: skip
        """Build ``name`` from ``context_dir`` (uploaded as it is read); ``on_log`` gets each log line.
        A failed build step is a Build with ``ok`` False (its ``error`` and ``failed_step``)."""
        from ember.sdk.context import context_tar  # only builds need .dockerignore matching

        req = core.build_request(
            name, context_tar(context_dir, dockerfile), dockerfile=dockerfile, build_args=build_args, target=target,
            ready_cmd=ready_cmd, ready_timeout=ready_timeout, no_cache=no_cache, network=network,
            host_ca_certs=host_ca_certs, client_token=client_token,
        )  # fmt: skip
        async with contextlib.aclosing(self.client.stream(req)) as stream:
            async for event in stream:
                if "log" in event and on_log is not None:
                    on_log(str(event["log"]))
                elif "build" in event:
                    return decode(Build, event["build"])
        raise ProtocolError("the build stream ended without its result")

    async def logs(self, name: str, *, tail: int | None = None) -> str:
        return await self.client.text(core.image_logs(name, tail=tail))

    async def remove(self, name: str, *, all_versions: bool = False) -> None:
        await self.client.call(core.image_remove(name, all_versions=all_versions))

    async def list(self) -> list[Image]:
        return await self.client.call(core.image_list())


class AsyncTenants:
    def __init__(self, client: AsyncClient) -> None:
        self.client = client

    async def create(self, name: str, *, quotas: Mapping[str, int] | None = None) -> Tenant:
        return await self.client.call(core.tenant_create(name, quotas=quotas))

    async def get(self, name: str) -> Tenant:
        return await self.client.call(core.tenant_get(name))

    async def set_quotas(self, name: str, quotas: Mapping[str, int]) -> Tenant:
        return await self.client.call(core.tenant_set_quotas(name, quotas))

    async def list(self) -> list[Tenant]:
        return await self.client.call(core.tenant_list())


class AsyncKeys:
    def __init__(self, client: AsyncClient) -> None:
        self.client = client

    async def create(
        self, *, tenant: str | None = None, name: str | None = None, client_token: str | None = None
    ) -> CreatedKey:
        return await self.client.call(core.key_create(tenant=tenant, name=name, client_token=client_token))

    async def revoke(self, key_id: str) -> None:
        await self.client.call(core.key_revoke(key_id))

    async def list(self, *, tenant: str | None = None) -> list[ApiKey]:
        return await self.client.call(core.key_list(tenant=tenant))


class AsyncWebhooks:
    def __init__(self, client: AsyncClient) -> None:
        self.client = client

    async def create(self, url: str, *, client_token: str | None = None) -> CreatedWebhook:
        return await self.client.call(core.webhook_create(url, client_token=client_token))

    async def get(self, webhook_id: str) -> Webhook:
        return await self.client.call(core.webhook_get(webhook_id))

    async def delete(self, webhook_id: str) -> None:
        await self.client.call(core.webhook_delete(webhook_id))

    async def deliveries(self, webhook_id: str, *, limit: int | None = None) -> list[Delivery]:
        return await self.client.call(core.webhook_deliveries(webhook_id, limit=limit))

    async def list(self) -> list[Webhook]:
        return await self.client.call(core.webhook_list())


class AsyncEvents:
    def __init__(self, client: AsyncClient) -> None:
        self.client = client

    async def list(self, *, vm: str | None = None, after: int | None = None, limit: int | None = None) -> list[Event]:
        return await self.client.call(core.event_list(vm=vm, after=after, limit=limit))


async def _aiter(chunks: Iterable[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


class _Feed:
    """An exec's input, stopped at the next chunk once the exec is over; an error of the caller's own
    input is kept and raised by the exec."""

    def __init__(self, data: Input) -> None:
        self.data = data
        self.over = False
        self.error: BaseException | None = None

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            if isinstance(self.data, AsyncIterable):
                async for chunk in self.data:
                    if self.over:
                        return
                    yield chunk
                return
            for chunk in core.stdin_chunks(self.data):
                if self.over:
                    return
                yield chunk
        except Exception as exc:
            self.error = exc
            raise
