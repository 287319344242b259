"""The VM's shell on the ingress: ``ws://<vm-id>.<domain>:<port>/ember/shell`` (or ``/vm/<vm-id>/ember/shell``),
opened with a shell token only (:mod:`ember.ingress.shelltokens`), for clients that reach the ingress and not the API.

The path ``/ember/shell`` is Ember's: it never reaches the app. Such a WebSocket upgrade is served by the
daemon's own shell route (``GET /v1/vms/{id}/shell``, :mod:`ember.api.shell`) behind its request guard,
which checks the token (kind, expiry, VM) exactly as on the API listener: this module only runs that ASGI
app on the ingress's connection (wsproto for the handshake and frames). The scope carries no peer uid (never
root) and no Authorization or Ember header; a message over EMBER_SHELL_MAX_MESSAGE_BYTES closes the socket
(1009), as uvicorn does on the API listener. On the proxy path, a subprotocol carrying a shell token is
refused (403): the token would otherwise reach the app.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from ember.errors import Forbidden, Unauthorized
from ember.ingress.http import HeadError, Route, is_upgrade
from ember.ingress.shelltokens import AUTH_PREFIXES, shell_credential

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Asgi = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]
SHELL_PATH = b"/ember/shell"
READ_CHUNK = 64 * 1024
_KEPT_OUT = (b"authorization", b"x-ember-", b"x-aws-proxy-", b"sec-websocket-protocol")  # in "subprotocols" if at all


def is_shell(where: Route) -> bool:
    return where.target.partition(b"?")[0] == SHELL_PATH


def refuse_token_on_proxy(headers: list[tuple[bytes, bytes]]) -> None:
    """A shell token in a subprotocol opens the shell alone: on the proxy path it is refused (Forbidden),
    not forwarded to the app."""
    for k, v in headers:
        if k == b"sec-websocket-protocol" and any(
            p.strip().startswith(prefix.encode()) for p in v.split(b",") for prefix in AUTH_PREFIXES
        ):
            raise Forbidden(f"a shell token opens only the VM's shell ({SHELL_PATH.decode()}), not the app")


def shell_scope(
    head: bytes, headers: list[tuple[bytes, bytes]], where: Route, client: Any
) -> tuple[Scope, WSConnection]:
    """The ASGI scope of the shell route for a WebSocket upgrade to ``/ember/shell``, and the server side of its
    handshake; HeadError (400) for no or a malformed upgrade, 400/401 for a missing or ambiguous token."""
    if is_upgrade(headers) is None:
        raise HeadError(400, f"{SHELL_PATH.decode()} is the VM's shell, a WebSocket: send a WebSocket upgrade")
    ws = WSConnection(ConnectionType.SERVER)
    try:
        ws.receive_data(head)
        request = next(ws.events(), None)
    except (RemoteProtocolError, UnicodeError):
        request = None
    if not isinstance(request, Request):
        raise HeadError(400, "a malformed WebSocket handshake (Sec-WebSocket-Key and Version 13 are needed)")
    query = where.target.partition(b"?")[2]
    key = any(k == b"authorization" for k, _ in headers)
    if shell_credential(request.subprotocols, query, authorization=key).token is None:
        raise Unauthorized(
            "the shell on the ingress takes a shell token ('ember token create ID --shell'): offer the WebSocket "
            "subprotocols ember.authentication.<token> and ember, or send ?token=<token>"
        )
    path = f"/v1/vms/{where.vm_id}/shell"
    scope: Scope = {
        "type": "websocket", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
        "scheme": "ws", "server": None, "client": client, "root_path": "", "path": path,
        "raw_path": path.encode(), "query_string": query, "subprotocols": request.subprotocols,
        "headers": [(k, v) for k, v in headers if not k.startswith(_KEPT_OUT)], "state": {},
        "extensions": {"websocket.http.response": {}},
    }  # fmt: skip
    return scope, ws


class AsgiWebSocket:
    """An ASGI app's side of one WebSocket on an ingress connection: ``receive`` and ``send`` over wsproto."""

    def __init__(
        self, ws: WSConnection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, rest: bytes, *,
        max_message: int, write_timeout_s: float, on_accept: Callable[[], None] = lambda: None,
    ) -> None:  # fmt: skip
        self.ws, self.reader, self.writer = ws, reader, writer
        self.on_accept = on_accept  # the app accepted: the connection is an authorised one (ember.ingress.admission)
        self.rest = rest  # client bytes after the head (frames sent ahead of the 101)
        self.max_message = max_message
        self.write_timeout_s = write_timeout_s
        self.connected = False  # the app got websocket.connect
        self.answered = False  # the app accepted or refused the handshake
        self.refusal: RejectConnection | None = None
        self.message = bytearray()  # a message's fragments so far (text as UTF-8)

    async def _write(self, data: bytes) -> None:
        if data:
            self.writer.write(data)
            try:
                await asyncio.wait_for(self.writer.drain(), self.write_timeout_s)
            except TimeoutError:
                raise ConnectionResetError("the client reads nothing") from None

    async def receive(self) -> Message:
        if not self.connected:
            self.connected = True
            return {"type": "websocket.connect"}
        while True:
            for event in self.ws.events():
                message = await self._event(event)
                if message is not None:
                    return message
            data = self.rest or await self.reader.read(READ_CHUNK)
            self.rest = b""
            if not data:
                return {"type": "websocket.disconnect", "code": 1006}
            try:
                self.ws.receive_data(data)
            except (RemoteProtocolError, LocalProtocolError):
                return {"type": "websocket.disconnect", "code": 1002}

    async def _event(self, event: Event) -> Message | None:
        if isinstance(event, BytesMessage | TextMessage):
            self.message += event.data.encode() if isinstance(event, TextMessage) else event.data
            if len(self.message) > self.max_message:
                reason = f"Message exceeds the maximum size ({self.max_message} bytes)"
                await self._write(self.ws.send(CloseConnection(code=1009, reason=reason)))
                return {"type": "websocket.disconnect", "code": 1009, "reason": reason}
            if not event.message_finished:
                return None
            whole, self.message = bytes(self.message), bytearray()
            if isinstance(event, TextMessage):
                return {"type": "websocket.receive", "text": whole.decode()}
            return {"type": "websocket.receive", "bytes": whole}
        if isinstance(event, Ping):
            await self._write(self.ws.send(event.response()))
        elif isinstance(event, CloseConnection):
            if self.ws.state is ConnectionState.REMOTE_CLOSING:
                await self._write(self.ws.send(event.response()))
            return {"type": "websocket.disconnect", "code": event.code, "reason": event.reason}
        return None

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "websocket.accept":
            self.answered = True
            self.on_accept()
            headers = list(message.get("headers") or [])
            await self._write(self.ws.send(AcceptConnection(subprotocol=message.get("subprotocol"),
                                                            extra_headers=headers)))  # fmt: skip
        elif kind == "websocket.http.response.start":
            self.answered = True
            self.refusal = RejectConnection(status_code=message["status"], headers=list(message.get("headers") or []),
                                            has_body=True)  # fmt: skip
            await self._write(self.ws.send(self.refusal))
        elif kind == "websocket.http.response.body":
            more = bool(message.get("more_body"))
            await self._write(self.ws.send(RejectData(data=message.get("body", b""), body_finished=not more)))
        elif self.ws.state is not ConnectionState.OPEN:
            if not self.answered and kind == "websocket.close":  # refused without an answer: a bare 403
                self.answered = True
                await self._write(self.ws.send(RejectConnection(status_code=403)))
                return
            raise ConnectionResetError("the WebSocket is closed")
        elif kind == "websocket.send":
            text, data = message.get("text"), message.get("bytes")
            await self._write(
                self.ws.send(TextMessage(data=text) if text is not None else BytesMessage(data=data or b""))
            )
        elif kind == "websocket.close":
            await self._write(self.ws.send(CloseConnection(code=message.get("code", 1000),
                                                           reason=message.get("reason") or None)))  # fmt: skip
