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

import base64
import io
import json
import tarfile
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from ember.build.context import BuildContext
from ember.build.tarread import TarLimits
from ember.config import Settings

TIMEOUT = httpx.Timeout(30.0, read=None)


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
    timeout_s: float = 0, stdin: bytes | None = None,
) -> Call:  # fmt: skip
    body: dict[str, Any] = {"argv": argv, "env": env or {}, "cwd": cwd, "user": user, "timeout_s": timeout_s}
    if stdin is not None:
        body["stdin_b64"] = base64.b64encode(stdin).decode()
    return Call("POST", f"/v1/vms/{vm_id}/exec", json=body)


def call_build(name: str, context_tar: bytes, dockerfile: str = "Dockerfile", **options: Any) -> Call:
    """Build an image from a tar of its context; ``options``: build_arg (list of NAME=VALUE),
    target, ready_cmd, ready_timeout, no_cache, network, host_ca_certs."""
    params = {"name": name, "dockerfile": dockerfile, **{k: v for k, v in options.items() if v not in (None, "")}}
    return Call("POST", "/v1/images/build", params=params, content=context_tar)


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


def transport_for(base_url: str | None, settings: Settings | None) -> tuple[str, dict[str, Any]]:
    if base_url:
        return base_url, {}
    sock = (settings or Settings.from_env()).socket_path
    return "http://ember", {"uds": str(sock)}


# ---- sync ----------------------------------------------------------------------


class Client:
    def __init__(self, base_url: str | None = None, settings: Settings | None = None) -> None:
        url, transport = transport_for(base_url, settings)
        self._http = httpx.Client(base_url=url, transport=httpx.HTTPTransport(**transport), timeout=TIMEOUT)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self._http.close()

    def send(self, call: Call) -> Any:
        r = self._http.request(call.method, call.path, params=call.params, json=call.json, content=call.content)
        raise_for(r.status_code, r.content)
        return r.json() if r.content else None

    def text(self, call: Call) -> str:
        r = self._http.request(call.method, call.path, params=call.params)
        raise_for(r.status_code, r.content)
        return r.text

    def stream_events(self, call: Call) -> Iterator[dict[str, Any]]:
        with self._http.stream(call.method, call.path, params=call.params, json=call.json, content=call.content) as r:
            if r.status_code >= 400:
                raise_for(r.status_code, r.read())
            for line in r.iter_lines():
                if line:
                    yield decode_event(line.encode())

    def run(self, image: str) -> dict[str, Any]:
        return dict(self.send(call_run(image)))

    def exec(
        self, vm_id: str, argv: list[str], on_output: Callable[[str, bytes], None] | None = None, **kw: Any
    ) -> ExecOutput:
        return collect(self.stream_events(call_exec(vm_id, argv, **kw)), on_output)

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
    def __init__(self, base_url: str | None = None, settings: Settings | None = None) -> None:
        url, transport = transport_for(base_url, settings)
        self._http = httpx.AsyncClient(base_url=url, transport=httpx.AsyncHTTPTransport(**transport), timeout=TIMEOUT)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self._http.aclose()

    async def send(self, call: Call) -> Any:
        r = await self._http.request(call.method, call.path, params=call.params, json=call.json, content=call.content)
        raise_for(r.status_code, r.content)
        return r.json() if r.content else None

    async def stream_events(self, call: Call) -> AsyncIterator[dict[str, Any]]:
        async with self._http.stream(
            call.method, call.path, params=call.params, json=call.json, content=call.content
        ) as r:
            if r.status_code >= 400:
                raise_for(r.status_code, await r.aread())
            async for line in r.aiter_lines():
                if line:
                    yield decode_event(line.encode())

    async def run(self, image: str) -> dict[str, Any]:
        return dict(await self.send(call_run(image)))

    async def exec(self, vm_id: str, argv: list[str], **kw: Any) -> ExecOutput:
        events = [e async for e in self.stream_events(call_exec(vm_id, argv, **kw))]
        return collect(events, None)
