"""What every request passes before the API sees it (pure ASGI: streamed bodies and answers flow through).

- Body caps: a ``Content-Length`` over the route's cap is refused (413) before a byte of the
  body is read; a chunked body is counted as it streams and cut off at the cap.
- On the TCP listener only: the ``Host`` must be one of the listener's own names (DNS
  rebinding), and an ``Origin`` must be the listener's own (CSRF from a browser tab).
- WebSockets: only the shell route opens; it passes the same checks, and a refusal is the handshake's
  HTTP answer (the WebSocket Denial Response extension), else a close before the handshake.
- On both listeners: the caller is authenticated (:mod:`ember.api.auth`): root on the Unix
  socket, or a bearer API key; the principal goes into the scope and the request's context. The
  shell's WebSocket may carry a shell token instead (:mod:`ember.ingress.shelltokens`).
- The AWS API's paths (:mod:`ember.aws.router`) pass the same checks with their own body cap
  (EMBER_AWS_MAX_BODY_BYTES); they are routed as sent, percent-encoded (a path with an empty, ``.`` or ``..``
  segment refused: :func:`ember.aws.sigv4.routable_path`); the router verifies their SigV4 signature, and every
  refusal on them is an AWS error (``x-amzn-ErrorType``, ``{"message": ...}``) that botocore parses.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from ember.api.auth import PEER_UID, PRINCIPAL, Authenticator
from ember.aws.errors import AwsError, from_ember, render
from ember.aws.sigv4 import routable_path
from ember.config import Settings
from ember.errors import (
    EmberError,
    Forbidden,
    HostSetupError,
    InvalidRequest,
    PayloadTooLarge,
    TooManyRequests,
    Unauthorized,
)
from ember.ingress.shelltokens import SUBPROTOCOL, shell_credential, shell_principal
from ember.ingress.tokens import TokenSigner
from ember.tenancy.principal import CURRENT, Principal

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Asgi = Callable[[Scope, Receive, Send], Awaitable[None]]

_WEBSOCKETS = re.compile(r"^/v1/vms/[^/]+/shell$")  # the only WebSocket routes: any other is closed unanswered
_STREAMED_INTO_VM = re.compile(r"^/v1/vms/[^/]+/(files|exec/stdin/[^/]+)$")  # a file upload, an exec's stdin
AWS_PATHS = re.compile(r"^/(2025-09-09|2017-03-31)/")  # the AWS Lambda MicroVMs API's (ember.aws.router)


@dataclass(frozen=True)
class BodyCap:
    limit: int
    setting: str  # the variable that raises it
    hint: str  # what to do instead

    def refusal(self, size: int | None) -> PayloadTooLarge:
        got = f"is {size} bytes" if size is not None else "passed the cap while streaming"
        return PayloadTooLarge(
            f"the request body {got}; this route takes at most {self.limit} bytes ({self.setting} on the daemon): "
            f"{self.hint}"
        )


@dataclass(frozen=True)
class BodyCaps:
    json: BodyCap
    build_context: BodyCap
    file_upload: BodyCap
    aws: BodyCap

    @classmethod
    def from_settings(cls, settings: Settings) -> BodyCaps:
        return cls(
            json=BodyCap(settings.max_json_body_bytes, "EMBER_MAX_JSON_BODY_BYTES",
                         "copy large data into the VM with 'ember cp' instead"),
            build_context=BodyCap(settings.max_build_context_bytes, "EMBER_MAX_BUILD_CONTEXT_BYTES",
                                  "exclude files from the build context with .dockerignore"),
            file_upload=BodyCap(settings.max_file_upload_bytes, "EMBER_MAX_FILE_UPLOAD_BYTES",
                                "send the data in parts, or raise the cap"),
            aws=BodyCap(settings.aws_max_body_bytes, "EMBER_AWS_MAX_BODY_BYTES", "send a smaller request"),
        )  # fmt: skip

    def for_route(self, method: str, path: str) -> BodyCap:
        if method == "POST" and path == "/v1/images/build":
            return self.build_context
        if method == "PUT" and _STREAMED_INTO_VM.match(path):
            return self.file_upload
        if AWS_PATHS.match(path):
            return self.aws
        return self.json


_UNSPECIFIED = {"0.0.0.0", "::", "[::]"}  # the names of "every address"


def tcp_listener(listen: str) -> tuple[str, int]:
    """EMBER_LISTEN as (host without brackets, port)."""
    host, _, port = listen.rpartition(":")
    if not host or not (port.isascii() and port.isdigit()):
        raise HostSetupError(f"EMBER_LISTEN={listen!r} is not HOST:PORT (e.g. 127.0.0.1:7070)")
    return host.strip("[]"), int(port)


@dataclass(frozen=True)
class TcpPolicy:
    """The TCP listener's own names."""

    port: int
    hosts: frozenset[str]  # lowercase host names/addresses (IPv6 in brackets), without the port
    any_address: bool  # bound to every address: any IP literal names it (never a DNS name)

    @classmethod
    def for_listener(cls, listen: str) -> TcpPolicy:
        host, port = tcp_listener(listen)
        host = f"[{host.lower()}]" if ":" in host else host.lower()
        names = {"localhost", "127.0.0.1", "[::1]", host}
        return cls(port=port, hosts=frozenset(names), any_address=host in _UNSPECIFIED)

    def _own_host(self, value: str) -> bool:
        host, sep, port = value.lower().rpartition(":")
        if not sep or port != str(self.port) or (host.startswith("[") != host.endswith("]")):
            return False
        if host in self.hosts:
            return True
        if not self.any_address:
            return False
        try:
            ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            return False
        return True

    def refusal(self, headers: list[tuple[str, str]]) -> EmberError | None:
        """Why this request is refused, or None if it may pass."""
        hosts = [v for k, v in headers if k == "host"]
        if len(hosts) != 1 or not self._own_host(hosts[0]):
            return Forbidden(
                "the Host header does not name this listener: use the address it listens on "
                f"(or localhost) with port {self.port}"
            )
        origins = [v for k, v in headers if k == "origin"]
        if origins and (len(origins) > 1 or origins[0].lower() != f"http://{hosts[0].lower()}"):
            return Forbidden("requests from another origin (a web page) are refused; call the API directly")
        return None


def error_body(exc: EmberError) -> dict[str, Any]:
    """Ember's error answer: ``{"error": KIND, "message": ...}``, and a 429's details."""
    extra = exc.details() if isinstance(exc, TooManyRequests) else {}
    return {"error": type(exc).__name__, "message": str(exc), **extra}


def _answer(exc: EmberError, *, aws: bool = False) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """The headers and body of ``exc`` as Ember's JSON error (``aws``: as the AWS API's error)."""
    if aws:
        _, headers, body = render(from_ember(exc))
        return headers, body
    body = json.dumps(error_body(exc)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if isinstance(exc, Unauthorized):
        headers.append((b"www-authenticate", b"Bearer"))
    if isinstance(exc, TooManyRequests) and exc.retry_after is not None:
        headers.append((b"retry-after", str(max(1, math.ceil(exc.retry_after))).encode()))
    return headers, body


async def reply(send: Send, exc: EmberError, *, close: bool = False, aws: bool = False) -> None:
    """Answer with ``exc`` as Ember's JSON error (``aws``: as the AWS API's error)."""
    headers, body = _answer(exc, aws=aws)
    if close:  # the body was not read: the connection cannot carry another request
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": exc.http_status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def deny(scope: Scope, send: Send, exc: EmberError) -> None:
    """Refuse a WebSocket handshake with ``exc`` as Ember's JSON error (a bare close where the server
    cannot answer a handshake with HTTP)."""
    if "websocket.http.response" not in scope.get("extensions", {}):
        await send({"type": "websocket.close", "code": 1008})
        return
    headers, body = _answer(exc)
    await send({"type": "websocket.http.response.start", "status": exc.http_status, "headers": headers})
    await send({"type": "websocket.http.response.body", "body": body})


class _Cut:
    """Counts a request body as it streams; past the cap it cuts it off and answers 413 itself."""

    def __init__(self, cap: BodyCap, receive: Receive, send: Send, *, aws: bool = False) -> None:
        self.cap, self._receive, self._send = cap, receive, send
        self.aws = aws
        self.received = 0
        self.refused: PayloadTooLarge | None = None
        self.app_started = False
        self.replied = False

    async def receive(self) -> Message:
        message = await self._receive()
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self.cap.limit:
                self.refused = self.cap.refusal(None)
                raise self.refused
        return message

    async def send(self, message: Message) -> None:
        if self.refused is None:
            self.app_started = self.app_started or message["type"] == "http.response.start"
            await self._send(message)
        elif not self.app_started and not self.replied:  # whatever the app answers to the cut body: our 413
            self.replied = True
            await reply(self._send, self.refused, close=True, aws=self.aws)


class RequestGuard:
    def __init__(
        self, app: Asgi, caps: BodyCaps, tcp: TcpPolicy | None, auth: Authenticator, tokens: TokenSigner
    ) -> None:
        self.app = app
        self.caps = caps
        self.tcp = tcp
        self.auth = auth
        self.tokens = tokens  # shell tokens

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        websocket = scope["type"] == "websocket"
        if not (scope["type"] == "http" or (websocket and _WEBSOCKETS.match(scope["path"]))):
            await send({"type": "websocket.close", "code": 1008})  # fail closed
            return
        headers = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in scope["headers"]]
        aws = not websocket and bool(AWS_PATHS.match(scope["path"]))

        async def answer(exc: EmberError, *, close: bool = True) -> None:
            await (deny(scope, send, exc) if websocket else reply(send, exc, close=close, aws=aws))

        if self.tcp is not None and (refused := self.tcp.refusal(headers)) is not None:
            await answer(refused)
            return
        if "\x00" in scope["path"] or b"%00" in scope["query_string"].lower():
            await answer(InvalidRequest("a NUL character in the path or query: no name or id holds one"), close=False)
            return
        if aws:  # signed requests: ember.aws.router verifies them once it has read the (capped) body
            try:  # routed as sent: a label's %2F stays in its segment
                scope["path"] = routable_path((scope.get("raw_path") or scope["path"].encode()).decode("latin-1"))
            except AwsError as exc:
                status, answer_headers, body = render(exc)
                await send({"type": "http.response.start", "status": status,
                            "headers": [*answer_headers, (b"connection", b"close")]})  # fmt: skip
                await send({"type": "http.response.body", "body": body})
                return
            await self._guarded(scope, receive, send)
            return
        if websocket:
            who = self._websocket_principal(scope, headers)
        else:
            who = self.auth.principal(headers, scope.get(PEER_UID))
        if isinstance(who, EmberError):
            await answer(who)
            return
        scope[PRINCIPAL] = who
        acting = CURRENT.set(who)
        try:
            await (self.app(scope, receive, send) if websocket else self._guarded(scope, receive, send))
        finally:
            CURRENT.reset(acting)

    def _websocket_principal(self, scope: Scope, headers: list[tuple[str, str]]) -> Principal | EmberError:
        """A shell token's principal, else the key's (or root's); the token leaves the query (it reaches no
        route nor log line), and the subprotocol the shell selects goes into the scope."""
        try:
            key = any(k == "authorization" for k, _ in headers)
            offered = shell_credential(list(scope.get("subprotocols", ())), scope["query_string"], authorization=key)
            scope["query_string"] = offered.query_string  # in place: the server's own log line loses it too
            scope[SUBPROTOCOL] = offered.subprotocol
            if offered.token is not None:
                return shell_principal(self.tokens, offered.token, scope["path"])
        except EmberError as exc:
            return exc
        return self.auth.principal(headers, scope.get(PEER_UID))

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in scope["headers"]]
        cap = self.caps.for_route(scope["method"], scope["path"])
        length = next((v for k, v in headers if k == "content-length"), None)
        aws = cap is self.caps.aws
        if length is not None and length.isascii() and length.isdigit() and int(length) > cap.limit:
            await reply(send, cap.refusal(int(length)), close=True, aws=aws)
            return
        cut = _Cut(cap, receive, send, aws=aws)
        try:
            await self.app(scope, cut.receive, cut.send)
        except Exception:
            if cut.refused is None:
                raise
        if cut.refused is not None and not cut.app_started and not cut.replied:
            await reply(send, cut.refused, close=True, aws=aws)
