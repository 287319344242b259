"""The sync :class:`Client` (stdlib HTTP; see :mod:`ember.sdk.aio` for the async twin, same verbs)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

from ember.config import Settings
from ember.sdk import core
from ember.sdk import types as t
from ember.sdk.core import Op, Request
from ember.sdk.errors import ProtocolError
from ember.sdk.results.vms import VmData
from ember.sdk.transport import Response, Transport
from ember.sdk.types import decode

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (2.5 ms of the CLI's start)
if TYPE_CHECKING:
    from typing import IO, Any, TypeVar

    from ember.sdk.shell import Shell
    from ember.sdk.types import (
        ApiKey,
        AuthToken,
        Build,
        CreatedKey,
        CreatedWebhook,
        Delivery,
        Event,
        ExecEvent,
        ExecResult,
        Image,
        Info,
        Listing,
        LogEvent,
        Process,
        Tenant,
        Transition,
        Usage,
        Webhook,
        Whoami,
    )

    T = TypeVar("T")

OnOutput = Callable[[str, bytes], None]


class Client:
    """A connection to the daemon: ``url`` (default Settings.url, EMBER_URL), else the Unix socket
    (EMBER_SOCKET); ``api_key`` (default EMBER_API_KEY; for a loopback URL, the daemon's token file).

        with Client() as ember:
            vm = ember.vms.run("debian")
            print(vm.exec(["python3", "-c", "print(6*7)"]).stdout)
    """

    def __init__(self, url: str | None = None, *, api_key: str | None = None, settings: Settings | None = None) -> None:
        self.endpoint = core.endpoint(url, api_key=api_key, settings=settings)
        self._http = Transport(self.endpoint)
        self.vms = Vms(self)
        self.files = Files(self)
        self.images = Images(self)
        self.tenants = Tenants(self)
        self.keys = Keys(self)
        self.webhooks = Webhooks(self)
        self.events = Events(self)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # ---- the raw API: any request, its JSON ----

    def open(self, req: Request) -> AbstractContextManager[Response]:
        """Send ``req``; the answer, its status known and its body to read (an error raised typed)."""
        return self._http.open(req)

    def send(self, req: Request) -> Any:
        """``req``'s answer as JSON (None when empty); an error answer raises its typed exception."""
        return core.parse(self._http.call(req))

    def text(self, req: Request) -> str:
        return bytes(self._http.call(req)).decode(errors="replace")

    def stream(self, req: Request) -> Generator[dict[str, Any], None, None]:
        """``req``'s NDJSON events; an error event raises its typed exception."""
        with self.open(req) as resp:
            for line in resp.iter_lines():
                event = core.stream_line(line)
                if event is not None:
                    yield event

    def call(self, op: Op[T]) -> T:
        return op.read(self.send(op.request))

    # ---- account-wide verbs ----

    def usage(self, *, tenant: str | None = None, since: str | None = None, until: str | None = None) -> Usage:
        return self.call(core.usage(tenant=tenant, since=since, until=until))

    def whoami(self) -> Whoami:
        return self.call(core.whoami())

    def info(self) -> Info:
        return self.call(core.info())


@dataclass(frozen=True, eq=False, repr=False)  # VmData's own __eq__, __hash__ and __repr__ (``client`` is in none)
class Vm(VmData):
    """A VM with its verbs; its fields are as of when it was fetched (``refresh()`` fetches again)."""

    client: Client = field(kw_only=True, repr=False, compare=False)

    @property
    def files(self) -> VmFiles:
        return VmFiles(self.client.files, self.id)

    def refresh(self) -> Vm:
        return self.client.vms.get(self.id)

    def exec(
        self, argv: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: str = "", user: str = "",
        timeout_s: float = 0, stdin: bytes | Iterable[bytes] | None = None, on_output: OnOutput | None = None,
    ) -> ExecResult:  # fmt: skip
        return self.client.vms.exec(
            self.id, argv, env=env, cwd=cwd, user=user, timeout_s=timeout_s, stdin=stdin, on_output=on_output
        )

    def exec_events(
        self, argv: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: str = "", user: str = "",
        timeout_s: float = 0, stdin: bytes | Iterable[bytes] | None = None,
    ) -> Iterator[ExecEvent]:  # fmt: skip
        return self.client.vms.exec_events(self.id, argv, env=env, cwd=cwd, user=user, timeout_s=timeout_s,
                                           stdin=stdin)  # fmt: skip

    def suspend(self) -> Transition:
        return self.client.vms.suspend(self.id)

    def resume(self) -> Transition:
        return self.client.vms.resume(self.id)

    def snapshot(self, name: str, *, client_token: str | None = None) -> Image:
        return self.client.vms.snapshot(self.id, name, client_token=client_token)

    def remove(self) -> None:
        self.client.vms.remove(self.id)

    def events(self) -> list[Event]:
        return self.client.vms.events(self.id)

    def logs(self, *, follow: bool = False, tail: int | None = None) -> Iterator[LogEvent]:
        return self.client.vms.logs(self.id, follow=follow, tail=tail)

    def auth_token(self, *, ports: int | str = 8080, minutes: int = 10) -> AuthToken:
        """A token for this VM's ingress endpoint (``endpoint``): the X-Ember-Proxy-Auth header's value."""
        return self.client.vms.auth_token(self.id, ports=ports, minutes=minutes)


class Vms:
    def __init__(self, client: Client) -> None:
        self.client = client

    def _bind(self, data: Any) -> Vm:
        return Vm(**VmData.fields_from(data), client=self.client)

    def run(
        self, image: str, *, version: int | None = None, memory_mib: int | None = None, vcpus: int | None = None,
        env: Mapping[str, str] | None = None, tags: Mapping[str, str] | None = None, client_token: str | None = None,
        run_payload: str | None = None, idle: core.IdlePolicy | None = None,
        egress: str | None = None, allow: Sequence[str] | None = None,
    ) -> Vm:  # fmt: skip
        req = core.vm_run(image, version=version, memory_mib=memory_mib, vcpus=vcpus, env=env, tags=tags,
                          client_token=client_token, run_payload=run_payload, idle=idle,
                          egress=egress, allow=allow)  # fmt: skip
        return self._bind(self.client.send(req))

    def get(self, vm_id: str) -> Vm:
        return self._bind(self.client.send(core.vm_get(vm_id)))

    def exec(
        self, vm_id: str, argv: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: str = "", user: str = "",
        timeout_s: float = 0, stdin: bytes | Iterable[bytes] | None = None, on_output: OnOutput | None = None,
    ) -> ExecResult:  # fmt: skip
        """Run ``argv`` to its end: its output (``on_output`` gets each piece as it comes) and exit status."""
        out, err = bytearray(), bytearray()
        for event in self.exec_events(vm_id, argv, env=env, cwd=cwd, user=user, timeout_s=timeout_s, stdin=stdin):
            if isinstance(event, t.ExecOutput):
                (out if event.stream == "stdout" else err).extend(event.data)
                if on_output is not None:
                    on_output(event.stream, event.data)
            else:
                return t.ExecResult(event.exit_code, event.signal, event.timed_out, bytes(out), bytes(err))
        raise ProtocolError("the exec stream ended without an exit status")

    def exec_events(
        self, vm_id: str, argv: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: str = "", user: str = "",
        timeout_s: float = 0, stdin: bytes | Iterable[bytes] | None = None,
    ) -> Iterator[ExecEvent]:  # fmt: skip
        """The command's output and exit events as they come; ``stdin`` streams to it from a thread,
        in a request of its own (PUT .../exec/stdin/ID), as the command reads it."""
        req = core.exec_request(vm_id, argv, env=env, cwd=cwd, user=user, timeout_s=timeout_s,
                                stdin=stdin is not None)  # fmt: skip
        feed = _Feed(stdin) if stdin is not None else None
        sender: threading.Thread | None = None
        try:
            with contextlib.closing(self.client.stream(req)) as stream:
                for raw in stream:
                    if feed is not None and "stdin" in raw:
                        put = core.exec_stdin_request(vm_id, str(raw["stdin"]), feed.chunks())
                        import threading  # only an exec with input starts a thread

                        sender = threading.Thread(target=self._send_stdin, args=(put,), daemon=True)
                        sender.start()
                        continue
                    event = core.exec_event(raw)
                    if event is not None:
                        yield event
                        if isinstance(event, t.ExecExit):
                            return
        finally:
            if feed is not None:
                feed.over = True
            if sender is not None:
                sender.join(core.STDIN_JOIN_S)  # a read of a terminal may block on: leave that daemon thread
        if feed is not None and feed.error is not None:
            raise feed.error

    def _send_stdin(self, put: Request) -> None:
        with contextlib.suppress(Exception):  # the daemon reports a failed upload in the exec's events
            self.client.send(put)

    def suspend(self, vm_id: str) -> Transition:
        return self.client.call(core.vm_transition(vm_id, "suspend"))

    def resume(self, vm_id: str) -> Transition:
        return self.client.call(core.vm_transition(vm_id, "resume"))

    def snapshot(self, vm_id: str, name: str, *, client_token: str | None = None) -> Image:
        return self.client.call(core.vm_snapshot(vm_id, name, client_token=client_token))

    def remove(self, vm_id: str) -> None:
        self.client.call(core.vm_remove(vm_id))

    def events(self, vm_id: str) -> list[Event]:
        return self.client.call(core.vm_events(vm_id))

    def logs(self, vm_id: str, *, follow: bool = False, tail: int | None = None) -> Iterator[LogEvent]:
        """The app's stdout and stderr as they are kept (``follow``: then new output as it comes)."""
        with contextlib.closing(self.client.stream(core.vm_logs(vm_id, follow=follow, tail=tail))) as stream:
            for raw in stream:
                event = core.log_event(raw)
                if event is not None:
                    yield event

    def shell(
        self, vm_id: str, command: Sequence[str] = (), *, user: str = "", cwd: str = "", rows: int = 24,
        cols: int = 80, term: str = "xterm-256color",
    ) -> Shell:  # fmt: skip
        """A terminal running ``command`` (none: the user's login shell) in the VM, on a connection of its own."""
        from ember.sdk.shell import Shell, ShellProtocol, shell_target

        ep = self.client.endpoint
        target = shell_target(ep, vm_id, command, user=user, cwd=cwd, rows=rows, cols=cols, term=term)
        return Shell(self.client._http.new_socket(), ShellProtocol(ep, target))

    def start_process(
        self, vm_id: str, argv: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: str = "", user: str = ""
    ) -> Process:
        """Start ``argv`` in the background (output to /dev/null); list it with :meth:`processes`."""
        return self.client.call(core.process_start(vm_id, argv, env=env, cwd=cwd, user=user))

    def processes(self, vm_id: str) -> list[Process]:
        """The VM's background processes: running ones, and exited ones with their status."""
        return self.client.call(core.process_list(vm_id))

    def kill(self, vm_id: str, pid: int, signal: str | int = "TERM") -> None:
        """Signal a running background process (NotFound for any other pid)."""
        self.client.call(core.process_kill(vm_id, pid, signal))

    def auth_token(self, vm_id: str, *, ports: int | str = 8080, minutes: int = 10) -> AuthToken:
        return self.client.call(core.vm_auth_token(vm_id, ports=ports, minutes=minutes))

    def list(
        self, *, state: str | None = None, image: str | None = None, tags: Mapping[str, str] | None = None,
        all: bool = False, tenant: str | None = None,
    ) -> list[Vm]:  # fmt: skip
        rows = self.client.send(core.vm_list(state=state, image=image, tags=tags, all=all, tenant=tenant))
        if not isinstance(rows, list):
            raise ProtocolError("the daemon's VM list is not a list")
        return [self._bind(row) for row in rows]


class _Feed:
    """An exec's input, stopped at the next chunk once the exec is over; an error of the caller's own
    input is kept and raised by the exec."""

    def __init__(self, data: bytes | Iterable[bytes]) -> None:
        self.data = data
        self.over = False
        self.error: BaseException | None = None

    def chunks(self) -> Iterator[bytes]:
        try:
            for chunk in core.stdin_chunks(self.data):
                if self.over:
                    return
                yield chunk
        except Exception as exc:
            self.error = exc
            raise


class Files:
    def __init__(self, client: Client) -> None:
        self.client = client

    def write(
        self, vm_id: str, path: str, data: bytes | Iterable[bytes], *, mode: int = 0o644, mkdirs: bool = False,
        user: str | None = None,
    ) -> int:  # fmt: skip
        """Write ``data`` (bytes, or chunks streamed as they come) to ``path``; the bytes written."""
        return self.client.call(core.file_write(vm_id, path, data, mode=mode, mkdirs=mkdirs, user=user))

    def read(self, vm_id: str, path: str) -> bytes:
        with self.client.open(core.file_read(vm_id, path)) as resp:
            return resp.read()

    def read_to(self, vm_id: str, path: str, out: Path | IO[bytes]) -> int:
        """Copy ``path`` into the local file ``out`` (a path or a binary file) as it streams; the bytes copied."""
        n = 0
        with self.client.open(core.file_read(vm_id, path)) as resp:
            f = open(out, "wb") if isinstance(out, Path) else out  # noqa: SIM115
            try:
                for chunk in resp.iter_bytes():
                    f.write(chunk)
                    n += len(chunk)
            finally:
                if isinstance(out, Path):
                    f.close()
        return n

    def ls(self, vm_id: str, path: str) -> Listing:
        return self.client.call(core.file_ls(vm_id, path))


@dataclass(frozen=True)
class VmFiles:
    """One VM's files (``vm.files``)."""

    files: Files
    vm_id: str

    def write(
        self, path: str, data: bytes | Iterable[bytes], *, mode: int = 0o644, mkdirs: bool = False,
        user: str | None = None,
    ) -> int:  # fmt: skip
        return self.files.write(self.vm_id, path, data, mode=mode, mkdirs=mkdirs, user=user)

    def read(self, path: str) -> bytes:
        return self.files.read(self.vm_id, path)

    def read_to(self, path: str, out: Path | IO[bytes]) -> int:
        return self.files.read_to(self.vm_id, path, out)

    def ls(self, path: str) -> Listing:
        return self.files.ls(self.vm_id, path)


class Images:
    def __init__(self, client: Client) -> None:
        self.client = client

    def get(self, name: str) -> Image:
        return self.client.call(core.image_get(name))

    def prepare(self, name: str = "debian", *, on_progress: Callable[[str], None] | None = None) -> Image:
        """Build the built-in base image ``name`` unless it is built (the first time: minutes)."""
        for event in self.client.stream(core.image_prepare(name)):
            if "progress" in event and on_progress is not None:
                on_progress(str(event["progress"]))
            elif "image" in event:
                return decode(t.Image, event["image"])
        raise ProtocolError("the prepare stream ended without its image")

    def build(
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
        for event in self.client.stream(req):
            if "log" in event and on_log is not None:
                on_log(str(event["log"]))
            elif "build" in event:
                return decode(t.Build, event["build"])
        raise ProtocolError("the build stream ended without its result")

    def logs(self, name: str, *, tail: int | None = None) -> str:
        return self.client.text(core.image_logs(name, tail=tail))

    def remove(self, name: str, *, all_versions: bool = False) -> None:
        self.client.call(core.image_remove(name, all_versions=all_versions))

    def list(self) -> list[Image]:
        return self.client.call(core.image_list())


class Tenants:
    def __init__(self, client: Client) -> None:
        self.client = client

    def create(self, name: str, *, quotas: Mapping[str, int] | None = None) -> Tenant:
        return self.client.call(core.tenant_create(name, quotas=quotas))

    def get(self, name: str) -> Tenant:
        return self.client.call(core.tenant_get(name))

    def set_quotas(self, name: str, quotas: Mapping[str, int]) -> Tenant:
        return self.client.call(core.tenant_set_quotas(name, quotas))

    def list(self) -> list[Tenant]:
        return self.client.call(core.tenant_list())


class Keys:
    def __init__(self, client: Client) -> None:
        self.client = client

    def create(
        self, *, tenant: str | None = None, name: str | None = None, client_token: str | None = None
    ) -> CreatedKey:
        return self.client.call(core.key_create(tenant=tenant, name=name, client_token=client_token))

    def revoke(self, key_id: str) -> None:
        self.client.call(core.key_revoke(key_id))

    def list(self, *, tenant: str | None = None) -> list[ApiKey]:
        return self.client.call(core.key_list(tenant=tenant))


class Webhooks:
    def __init__(self, client: Client) -> None:
        self.client = client

    def create(self, url: str, *, client_token: str | None = None) -> CreatedWebhook:
        return self.client.call(core.webhook_create(url, client_token=client_token))

    def get(self, webhook_id: str) -> Webhook:
        return self.client.call(core.webhook_get(webhook_id))

    def delete(self, webhook_id: str) -> None:
        self.client.call(core.webhook_delete(webhook_id))

    def deliveries(self, webhook_id: str, *, limit: int | None = None) -> list[Delivery]:
        return self.client.call(core.webhook_deliveries(webhook_id, limit=limit))

    def list(self) -> list[Webhook]:
        return self.client.call(core.webhook_list())


class Events:
    def __init__(self, client: Client) -> None:
        self.client = client

    def list(self, *, vm: str | None = None, after: int | None = None, limit: int | None = None) -> list[Event]:
        return self.client.call(core.event_list(vm=vm, after=after, limit=limit))
