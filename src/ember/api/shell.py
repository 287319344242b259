"""``GET /v1/vms/{id}/shell``: a command on a pseudo-terminal in the VM, over a WebSocket.

Query: ``command`` (repeatable: the argv; none = the user's login shell, else /bin/sh), ``user``,
``cwd``, ``rows`` and ``cols`` (the terminal's size at start, default 24x80), ``term`` (TERM,
default xterm-256color). The VM's own environment (``env`` at run) comes first.

Messages: binary = terminal bytes, both ways. Text = JSON control messages: the client sends
``{"type": "resize", "rows": R, "cols": C}``; the server sends ``{"type": "exit", "code": N,
"signal": S}`` when the command ends, then closes (1000). Bounds: a client message over
EMBER_SHELL_MAX_MESSAGE_BYTES closes the socket (1009; uvicorn refuses larger frames before
reading them); a malformed control message closes it (1007); no input nor output for
EMBER_SHELL_IDLE_TIMEOUT closes it (1000, reason "idle"). Closing the socket kills the command.
Output flows only as fast as the client reads it (the agent channel's credit and budgets, then
the socket's), input only as fast as the command reads it.

Refusals before the upgrade (unknown or another tenant's VM: the same 404; not running: 409;
bad query: 400) are Ember's JSON errors, sent as the handshake's HTTP answer. A shell token may stand
for the API key (:mod:`ember.ingress.shelltokens`); the ingress serves this route too (``/ember/shell``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, WebSocket
from fastapi.responses import JSONResponse
from starlette.websockets import WebSocketDisconnect, WebSocketState

from ember.agent import ExecRequest, ExecResult
from ember.agentproc import PtySession, TermSize, open_pty
from ember.api.auth import PRINCIPAL
from ember.api.guard import error_body
from ember.errors import EmberError, InvalidRequest
from ember.imagecfg import exec_settings
from ember.ingress.shelltokens import SUBPROTOCOL
from ember.models import VmRecord
from ember.tenancy.principal import Principal

if TYPE_CHECKING:
    from ember.daemon import Daemon

TERM = re.compile(r"^[A-Za-z0-9._+-]{1,64}$")
MAX_CONTROL = 1024  # bytes of one JSON control message
MAX_FIELD = 4096  # characters of one query value (user, cwd, an argument)
MAX_ARGS = 1000
CLOSE_NORMAL, CLOSE_INVALID, CLOSE_TOO_BIG = 1000, 1007, 1009


@dataclass(frozen=True)
class ShellOptions:
    command: tuple[str, ...]
    user: str
    cwd: str
    size: TermSize
    term: str


def _one(query: Mapping[str, Sequence[str]], name: str, default: str) -> str:
    values = query.get(name, [])
    if len(values) > 1:
        raise InvalidRequest(f"give {name} at most once")
    value = values[0] if values else default
    if len(value) > MAX_FIELD or "\x00" in value:
        raise InvalidRequest(f"{name} is at most {MAX_FIELD} characters, without NUL")
    return value


def _dim(query: Mapping[str, Sequence[str]], name: str, default: int) -> int:
    raw = _one(query, name, str(default))
    if not raw.isascii() or not raw.isdigit() or len(raw) > 6:
        raise InvalidRequest(f"{name} is a number of character cells")
    return int(raw)


def shell_options(query: Mapping[str, Sequence[str]]) -> ShellOptions:
    """The shell's options from its query string (each name to its values); InvalidRequest says what is wrong."""
    unknown = set(query) - {"command", "user", "cwd", "rows", "cols", "term"}
    if unknown:
        raise InvalidRequest(
            f"unknown query parameter {sorted(unknown)[0][:40]!r}: use command, user, cwd, rows, cols, term"
        )
    command = tuple(query.get("command", []))
    if len(command) > MAX_ARGS or any(len(a) > MAX_FIELD or "\x00" in a for a in command):
        raise InvalidRequest(f"command: at most {MAX_ARGS} arguments of {MAX_FIELD} characters, without NUL")
    term = _one(query, "term", "xterm-256color")
    if not TERM.match(term):
        raise InvalidRequest("term is a terminal type such as xterm-256color")
    size = TermSize(rows=_dim(query, "rows", 24), cols=_dim(query, "cols", 80))
    return ShellOptions(command, _one(query, "user", ""), _one(query, "cwd", ""), size, term)


def control_message(text: str) -> TermSize:
    """A client's control message: only ``resize`` exists. InvalidRequest for anything else."""
    if len(text.encode()) > MAX_CONTROL:
        raise InvalidRequest(f"a control message is at most {MAX_CONTROL} bytes")
    try:
        message = json.loads(text)
    except ValueError:
        raise InvalidRequest('a text message must be JSON: {"type": "resize", "rows": R, "cols": C}') from None
    if not isinstance(message, dict) or message.get("type") != "resize":
        raise InvalidRequest('the only control message is {"type": "resize", "rows": R, "cols": C}')
    rows, cols = message.get("rows"), message.get("cols")
    if type(rows) is not int or type(cols) is not int:
        raise InvalidRequest("resize takes integer rows and cols")
    return TermSize(rows=rows, cols=cols)


def exit_message(result: ExecResult) -> str:
    return json.dumps({"type": "exit", "code": result.exit_code, "signal": result.signal})


class _Idle:
    """When the shell last saw input or output."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.last = time.monotonic()

    def touch(self) -> None:
        self.last = time.monotonic()

    async def expired(self) -> None:
        """Raises once the shell was idle for the timeout."""
        while (left := self.last + self.timeout_s - time.monotonic()) > 0:
            await asyncio.sleep(left)
        raise _Close(CLOSE_NORMAL, "idle")


class _Close(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason[:120]  # a close frame's reason is at most 123 bytes


async def _output(ws: WebSocket, session: PtySession, idle: _Idle) -> None:
    while True:
        item = await session.read()
        idle.touch()
        if isinstance(item, ExecResult):
            await ws.send_text(exit_message(item))
            raise _Close(CLOSE_NORMAL, "exited")
        await ws.send_bytes(item)


async def _input(ws: WebSocket, session: PtySession, idle: _Idle, max_bytes: int) -> None:
    while True:
        message = await ws.receive()
        if message["type"] == "websocket.disconnect":
            return
        idle.touch()
        data, text = message.get("bytes"), message.get("text")
        if len(data or b"") > max_bytes or len((text or "").encode()) > max_bytes:
            raise _Close(CLOSE_TOO_BIG, f"messages are at most {max_bytes} bytes (EMBER_SHELL_MAX_MESSAGE_BYTES)")
        if data is not None:
            await session.write(data)
        elif text is not None:
            try:
                size = control_message(text)
            except InvalidRequest as exc:
                raise _Close(CLOSE_INVALID, str(exc)) from None
            await session.resize(size)


def add_shell_routes(app: FastAPI, daemon: Daemon, owned: Callable[[str, Principal], VmRecord]) -> None:
    engine, settings = daemon.engine, daemon.settings

    async def open_session(ws: WebSocket, vm_id: str, stack: contextlib.AsyncExitStack) -> PtySession:
        who = ws.scope.get(PRINCIPAL)
        assert isinstance(who, Principal), "every WebSocket passes the request guard"
        vm = owned(vm_id, who)
        query: dict[str, list[str]] = {}
        for name, value in ws.query_params.multi_items():
            query.setdefault(name, []).append(value)
        options = shell_options(query)
        run = exec_settings(engine.image_defaults(vm), vm.env, {"TERM": options.term}, cwd=options.cwd,
                            user=options.user)  # fmt: skip
        req = ExecRequest(argv=options.command, env=list(run.env), cwd=run.cwd, user=run.user)
        # held busy (no idle suspend) while the shell is open, and woken for it (auto-resume)
        agent = await stack.enter_async_context(engine.using(vm.id, "open a shell in"))
        return await open_pty(agent, req, options.size)

    @app.websocket("/v1/vms/{vm_id}/shell")
    async def shell(ws: WebSocket, vm_id: str) -> None:
        async with contextlib.AsyncExitStack() as stack:
            try:
                session = await open_session(ws, vm_id, stack)
            except EmberError as exc:
                await ws.send_denial_response(JSONResponse(error_body(exc), status_code=exc.http_status))
                return
            await _serve(ws, session)

    async def _serve(ws: WebSocket, session: PtySession) -> None:
        idle = _Idle(settings.shell_idle_timeout_s)
        close = _Close(CLOSE_NORMAL, "")
        try:
            await ws.accept(subprotocol=ws.scope.get(SUBPROTOCOL))  # a shell token's companion (ember.ingress)
            tasks = [asyncio.ensure_future(_output(ws, session, idle)),
                     asyncio.ensure_future(_input(ws, session, idle, settings.shell_max_message_bytes)),
                     asyncio.ensure_future(idle.expired())]  # fmt: skip
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            close = _closing(next(iter(done)))
        finally:
            await session.close()
            if ws.client_state is WebSocketState.CONNECTED:
                with contextlib.suppress(Exception):
                    await ws.close(close.code, close.reason)


def _closing(task: asyncio.Future[Any]) -> _Close:
    """How the socket closes after the first of the shell's tasks ended."""
    exc = task.exception()
    if exc is None:  # the client closed
        return _Close(CLOSE_NORMAL, "")
    if isinstance(exc, _Close):
        return exc
    if isinstance(exc, WebSocketDisconnect | OSError):
        return _Close(CLOSE_NORMAL, "")
    if isinstance(exc, EmberError):
        return _Close(1011, str(exc))
    raise exc
