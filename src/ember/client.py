"""Ember's Python SDK: a pure request-building core, thin sync and async clients.

    from ember.client import Client
    with Client() as ember:                      # the local daemon's Unix socket
        vm = ember.run("debian")
        result = ember.exec(vm["id"], ["python3", "-c", "print(6*7)"])
        print(result.stdout, result.exit_code)

Every request is described once by a :class:`Call`; :class:`Client` and
:class:`AsyncClient` only send it. Errors from the daemon raise
:class:`ApiError` carrying the daemon's message (which says what to do).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import ipaddress
import json
import tarfile
import threading
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from ember.build.context import BuildContext
from ember.build.tarread import TarLimits
from ember.config import Settings

TIMEOUT = httpx.Timeout(30.0, read=None)
STDIN_CHUNK = 256 * 1024
STDIN_JOIN_S = 5.0  # after an exec ends, how long its stdin sender may take to finish


class ApiError(Exception):
    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    params: dict[str, Any] = field(default_factory=dict)
    json: Any = None
    content: bytes | None = None  # a raw body (e.g. a build context tar) instead of JSON
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ExecOutput:
    exit_code: int
    signal: int
    timed_out: bool
    stdout: bytes
    stderr: bytes


# ---- the pure core -----------------------------------------------------------


def call_run(image: str) -> Call:
    return Call("POST", "/v1/vms", json={"image": image})


def call_exec(
    vm_id: str, argv: list[str], env: dict[str, str] | None = None, cwd: str = "", user: str = "",
    timeout_s: float = 0, *, stdin: bool = False,
) -> Call:  # fmt: skip
    """Run a command. With ``stdin`` the first event is ``{"stdin": ID}``: send the input as the
    body of :func:`call_exec_stdin` while reading the events (the clients' ``exec`` do both)."""
    body: dict[str, Any] = {"argv": argv, "env": env or {}, "cwd": cwd, "user": user, "timeout_s": timeout_s}
    if stdin:
        body["stdin"] = True
    return Call("POST", f"/v1/vms/{vm_id}/exec", json=body)


def call_exec_stdin(vm_id: str, stdin_id: str) -> Call:
    """The stdin of a running exec; its body (streamed) is the input."""
    return Call("PUT", f"/v1/vms/{vm_id}/exec/stdin/{stdin_id}")


class StdinFeed:
    """Input for an exec, sent alongside its events. It stops at the next chunk once the exec is
    over; an error of the caller's own input is kept and re-raised (the daemon reports the rest:
    undelivered stdin kills the command and ends the events with an error)."""

    def __init__(self, data: bytes | Iterable[bytes] | AsyncIterable[bytes]) -> None:
        self.data = data
        self.over = False
        self.error: BaseException | None = None

    def chunks(self) -> Iterator[bytes]:
        assert not isinstance(self.data, AsyncIterable)
        source = [self.data] if isinstance(self.data, bytes) else self.data
        try:
            for chunk in source:
                for i in range(0, len(chunk), STDIN_CHUNK):
                    if self.over:
                        return
                    yield chunk[i : i + STDIN_CHUNK]
        except Exception as exc:
            self.error = exc
            raise

    async def achunks(self) -> AsyncIterator[bytes]:
        if not isinstance(self.data, AsyncIterable):
            for chunk in self.chunks():
                yield chunk
            return
        try:
            async for chunk in self.data:
                if self.over:
                    return
                yield chunk
        except Exception as exc:
            self.error = exc
            raise


def call_build(name: str, context_tar: bytes, dockerfile: str = "Dockerfile", **options: Any) -> Call:
    """Build an image from a tar of its context; ``options``: build_arg (list of NAME=VALUE),
    target, ready_cmd, ready_timeout, no_cache, network, host_ca_certs."""
    params = {"name": name, "dockerfile": dockerfile, **{k: v for k, v in options.items() if v not in (None, "")}}
    return Call("POST", "/v1/images/build", params=params, content=context_tar,
                headers={"Content-Type": "application/x-tar"})  # fmt: skip


def context_tar(root: Path, dockerfile: str = "Dockerfile") -> bytes:
    """The build context as a tar, without what its .dockerignore excludes (the daemon applies it again)."""
    buf = io.BytesIO()
    with (
        BuildContext(root, TarLimits.from_settings(Settings.from_env()), dockerfile) as ctx,
        tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar,
    ):
        for rel in ctx.walk("")[1:]:
            tar.add(root / rel, arcname=rel, recursive=False)  # walk() never descends through a symlink
        if ctx.excluded(dockerfile):
            tar.add(root / dockerfile, arcname=dockerfile, recursive=False)
    return buf.getvalue()


def call_simple(method: str, url: str, **params: Any) -> Call:
    return Call(method, url, params=params)


def raise_for(status: int, body: bytes) -> None:
    if status < 400:
        return
    try:
        data = json.loads(body)
        kind, message = data.get("error", "Error"), data.get("message") or data.get("detail") or body.decode()
    except ValueError:
        kind, message = "Error", body.decode(errors="replace")
    raise ApiError(status, kind, str(message))


def decode_event(line: bytes) -> dict[str, Any]:
    event: dict[str, Any] = json.loads(line)
    if "error" in event:
        raise ApiError(500, event["error"], event.get("message", ""))
    if "data" in event:
        event["data"] = base64.b64decode(event["data"])
    return event


def collect(events: Iterable[dict[str, Any]], on_output: Callable[[str, bytes], None] | None) -> ExecOutput:
    out, err = bytearray(), bytearray()
    for event in events:
        if "stream" in event:
            (out if event["stream"] == "stdout" else err).extend(event["data"])
            if on_output:
                on_output(event["stream"], event["data"])
        elif "exit_code" in event:
            return ExecOutput(event["exit_code"], event["signal"], event["timed_out"], bytes(out), bytes(err))
    raise ApiError(502, "AgentUnavailable", "the exec stream ended without an exit status")


def read_api_token(settings: Settings) -> str | None:
    """The daemon's bearer token for its TCP listener (a root-only file); None if unreadable here."""
    try:
        return settings.api_token_path.read_text().strip() or None
    except OSError:
        return None


def is_loopback(url: str) -> bool:
    """The URL names this host: localhost, 127.0.0.0/8 or ::1."""
    host = httpx.URL(url).host.lower()
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def transport_for(
    base_url: str | None, settings: Settings | None, token: str | None
) -> tuple[str, dict[str, Any], dict[str, str]]:
    """(base URL, transport options, headers): the Unix socket, or a TCP URL with the bearer token
    (``token``, or else the local daemon's token file, which is only sent to a loopback address)."""
    settings = settings or Settings.from_env()
    if base_url:
        token = token or (read_api_token(settings) if is_loopback(base_url) else None)
        return base_url, {}, {"Authorization": f"Bearer {token}"} if token else {}
    return "http://ember", {"uds": str(settings.socket_path)}, {}


# ---- sync ----------------------------------------------------------------------


class Client:
    """``base_url`` (e.g. http://127.0.0.1:7070) talks TCP with ``token``, by default the daemon's token file
    (read, and sent, only for a loopback address: elsewhere pass ``token``)."""

    def __init__(self, base_url: str | None = None, settings: Settings | None = None, token: str | None = None) -> None:
        url, transport, headers = transport_for(base_url, settings, token)
        self._http = httpx.Client(
            base_url=url, transport=httpx.HTTPTransport(**transport), timeout=TIMEOUT, headers=headers
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self._http.close()

    def send(self, call: Call) -> Any:
        r = self._http.request(
            call.method, call.path, params=call.params, json=call.json, content=call.content, headers=call.headers
        )
        raise_for(r.status_code, r.content)
        return r.json() if r.content else None

    def text(self, call: Call) -> str:
        r = self._http.request(call.method, call.path, params=call.params)
        raise_for(r.status_code, r.content)
        return r.text

    def stream_events(self, call: Call) -> Iterator[dict[str, Any]]:
        with self._http.stream(
            call.method, call.path, params=call.params, json=call.json, content=call.content, headers=call.headers
        ) as r:
            if r.status_code >= 400:
                raise_for(r.status_code, r.read())
            for line in r.iter_lines():
                if line:
                    yield decode_event(line.encode())

    def run(self, image: str) -> dict[str, Any]:
        return dict(self.send(call_run(image)))

    def exec(
        self, vm_id: str, argv: list[str], on_output: Callable[[str, bytes], None] | None = None,
        stdin: bytes | Iterable[bytes] | None = None, **kw: Any,
    ) -> ExecOutput:  # fmt: skip
        return collect(self.exec_events(vm_id, argv, stdin=stdin, **kw), on_output)

    def exec_events(
        self, vm_id: str, argv: list[str], stdin: bytes | Iterable[bytes] | None = None, **kw: Any
    ) -> Iterator[dict[str, Any]]:
        """The exec's events; ``stdin`` streams to the command from a thread, in a request of its own."""
        events = self.stream_events(call_exec(vm_id, argv, stdin=stdin is not None, **kw))
        if stdin is None:
            yield from events
            return
        feed, sender = StdinFeed(stdin), None
        try:
            for event in events:
                if "stdin" in event:
                    sender = threading.Thread(target=self._send_stdin, args=(vm_id, event["stdin"], feed), daemon=True)
                    sender.start()
                    continue
                yield event
        finally:
            feed.over = True
            if sender is not None:
                sender.join(STDIN_JOIN_S)  # a read of a terminal may block on: leave that daemon thread
        if feed.error is not None:
            raise feed.error

    def _send_stdin(self, vm_id: str, stdin_id: str, feed: StdinFeed) -> None:
        put = call_exec_stdin(vm_id, stdin_id)
        # a failed upload shows in the exec's events (the daemon kills the command and says why)
        with contextlib.suppress(httpx.HTTPError):
            self._http.request(put.method, put.path, content=feed.chunks())

    def put_file(self, vm_id: str, path: str, data: Iterable[bytes] | bytes, mode: int = 0o644) -> Any:
        r = self._http.put(f"/v1/vms/{vm_id}/files", params={"path": path, "mode": mode}, content=data)
        raise_for(r.status_code, r.content)
        return r.json()

    def get_file(self, vm_id: str, path: str, out: Path) -> int:
        with self._http.stream("GET", f"/v1/vms/{vm_id}/files", params={"path": path}) as r:
            if r.status_code >= 400:
                raise_for(r.status_code, r.read())
            n = 0
            with open(out, "wb") as f:
                for chunk in r.iter_bytes():
                    f.write(chunk)
                    n += len(chunk)
        return n


# ---- async ---------------------------------------------------------------------


class AsyncClient:
    def __init__(self, base_url: str | None = None, settings: Settings | None = None, token: str | None = None) -> None:
        url, transport, headers = transport_for(base_url, settings, token)
        self._http = httpx.AsyncClient(
            base_url=url, transport=httpx.AsyncHTTPTransport(**transport), timeout=TIMEOUT, headers=headers
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self._http.aclose()

    async def send(self, call: Call) -> Any:
        r = await self._http.request(
            call.method, call.path, params=call.params, json=call.json, content=call.content, headers=call.headers
        )
        raise_for(r.status_code, r.content)
        return r.json() if r.content else None

    async def stream_events(self, call: Call) -> AsyncIterator[dict[str, Any]]:
        async with self._http.stream(
            call.method, call.path, params=call.params, json=call.json, content=call.content, headers=call.headers
        ) as r:
            if r.status_code >= 400:
                raise_for(r.status_code, await r.aread())
            async for line in r.aiter_lines():
                if line:
                    yield decode_event(line.encode())

    async def run(self, image: str) -> dict[str, Any]:
        return dict(await self.send(call_run(image)))

    async def exec(
        self, vm_id: str, argv: list[str], stdin: bytes | Iterable[bytes] | AsyncIterable[bytes] | None = None,
        **kw: Any,
    ) -> ExecOutput:  # fmt: skip
        return collect([e async for e in self.exec_events(vm_id, argv, stdin=stdin, **kw)], None)

    async def exec_events(
        self, vm_id: str, argv: list[str], stdin: bytes | Iterable[bytes] | AsyncIterable[bytes] | None = None,
        **kw: Any,
    ) -> AsyncIterator[dict[str, Any]]:  # fmt: skip
        """The exec's events; ``stdin`` streams to the command from a task, in a request of its own."""
        feed, sender = (StdinFeed(stdin) if stdin is not None else None), None
        try:
            async for event in self.stream_events(call_exec(vm_id, argv, stdin=feed is not None, **kw)):
                if "stdin" in event and feed is not None:
                    put = call_exec_stdin(vm_id, event["stdin"])
                    sender = asyncio.create_task(self._http.request(put.method, put.path, content=feed.achunks()))
                    continue
                yield event
        finally:
            if feed is not None:
                feed.over = True
            if sender is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(sender, STDIN_JOIN_S)
        if feed is not None and feed.error is not None:
            raise feed.error
