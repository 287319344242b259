"""The ingress listener: HTTP/1.1 from clients to apps in VMs, relayed over each VM's agent channel.

Every request is routed (:func:`ember.ingress.http.route`) and authorised on its own, kept-alive ones
too: a VM auth token (``X-Ember-Proxy-Auth``/``X-aws-proxy-auth``, checked by its MAC alone) or a tenant's
or an admin's API key (``Authorization: Bearer``). A refused request never reaches the VM: no agent
call. Another tenant's VM answers exactly like a missing one (404). The guest never sees a token, a
proxy header, or the Authorization header of an Ember key.

Bodies stream both ways without being held whole (h11 on both sides: the request is written to the
guest afresh); a relay is kept for the client's next request to the same VM and port. A request asking
to upgrade (WebSocket) becomes a byte tunnel once the app answers 101; one to ``/ember/shell`` is the VM's shell
instead, opened with a shell token (:mod:`ember.ingress.shell`). Errors are small JSON bodies:
400/431 bad request, 401/403 access, 404 no such VM, 502 the app failed, 503 the VM is not serving,
504 the app took too long.

What anyone who can reach the listener can hold, with no login (:mod:`ember.ingress.admission`):
connections from one address are limited (``EMBER_INGRESS_MAX_PER_ADDRESS``), and those whose first request
is not yet authorised are a smaller pool (``EMBER_INGRESS_MAX_UNAUTHENTICATED``) whose oldest member is
closed to make room, so idle or half-sent heads (each cut after ``EMBER_INGRESS_HEAD_TIMEOUT``) never keep
a prompt client out. A request body must keep up a minimum average rate (``EMBER_INGRESS_BODY_MIN_RATE``
bytes/s of time spent waiting for the client, after a grace of ``EMBER_INGRESS_HEAD_TIMEOUT``), else 408:
a token holder cannot hold a connection by trickling a body either.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

import h11
from prometheus_client import Counter

from ember.api.guard import tcp_listener
from ember.errors import (
    AgentUnavailable,
    EmberError,
    Forbidden,
    GuestError,
    GuestProtocolError,
    HostSetupError,
    InvalidStateTransition,
    Unauthorized,
    VmNotFound,
    VmNotServing,
    log_with_id,
)
from ember.ingress.admission import Admission, Limits
from ember.ingress.http import (
    HEAD_MAX,
    TENANT_HEADER,
    TOKEN_HEADERS,
    HeadError,
    Route,
    check_head,
    forwarded,
    is_upgrade,
    read_head,
    response_headers,
    route,
)
from ember.ingress.shell import Asgi, AsgiWebSocket, is_shell, refuse_token_on_proxy, shell_scope
from ember.ingress.tokens import TokenKind, TokenSigner
from ember.metrics import REGISTRY
from ember.models import VmRecord, VmState
from ember.relay import RelayClosed, TcpStream

if TYPE_CHECKING:
    from ember.agent import AgentConnection
    from ember.api.auth import Authenticator
    from ember.config import Settings
    from ember.engine import Engine

log = logging.getLogger("ember.ingress")
RESPONSE_HEAD_MAX = 64 * 1024  # a guest's response head (h11 refuses a longer one: 502)
READ_CHUNK = 64 * 1024
REQUESTS = Counter(
    "ember_ingress_requests", "Ingress requests by outcome (proxied, or the status class that refused them)",
    ["outcome"], registry=REGISTRY,
)  # fmt: skip
_OUTCOMES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 408: "bad_request",
             429: "throttled", 431: "bad_request", 502: "bad_gateway", 503: "unavailable", 504: "timeout"}  # fmt: skip


def status_of(exc: EmberError) -> int:
    """The status a failure answers through the ingress: the app's failures are the gateway's (502)."""
    if isinstance(exc, GuestProtocolError) or (isinstance(exc, GuestError) and not isinstance(exc, AgentUnavailable)):
        return 502
    return exc.http_status if exc.http_status in _OUTCOMES else 502


class IngressServer:
    def __init__(
        self, settings: Settings, engine: Engine, auth: Authenticator, signer: TokenSigner, *, shell: Asgi
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.auth = auth
        self.signer = signer
        self.shell = shell  # the daemon's API behind its request guard: it serves /ember/shell
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.Task[None]] = set()
        self.admission = Admission(
            Limits(total=settings.ingress_max_connections, per_address=settings.ingress_max_per_address,
                   unauthenticated=settings.ingress_max_unauthenticated)
        )  # fmt: skip

    async def start(self) -> None:
        host, port = tcp_listener(self.settings.ingress_listen)
        try:
            self._server = await asyncio.start_server(self._accept, host, port, limit=HEAD_MAX, backlog=512)
        except OSError as exc:
            raise HostSetupError(
                f"the ingress cannot listen on {self.settings.ingress_listen} ({exc.strerror}): free it, or set "
                "EMBER_INGRESS_LISTEN (empty: no ingress)"
            ) from None
        log.info("ingress on %s (http://<vm-id>.%s:%d/)", self.settings.ingress_listen, self.domain, self.port)

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def domain(self) -> str:
        return self.settings.ingress_domain

    async def run(self) -> None:
        """Serve until cancelled (the daemon's chores are cancelled when it stops), then close every client."""
        try:
            await asyncio.Event().wait()
        finally:
            if self._server is not None:
                self._server.close()
            for task in list(self._clients):
                task.cancel()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        client = ClientConnection(self, reader, writer)
        try:
            refusal = self.admission.admit(client, writer.get_extra_info("peername"), writer.transport.abort)
            if refusal is not None:
                await client.refuse(503, "VmNotServing", refusal)
                return
            await client.serve()
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError):
            pass  # the client went away or stalled: nothing to answer
        except Exception as exc:
            log_with_id("ingress connection", exc=exc)
        finally:
            self._clients.discard(task)
            self.admission.leave(client)
            await client.close()


@dataclass
class _Relay:
    """A guest connection kept for the client's next request to the same VM and port."""

    vm_id: str
    port: int
    agent: AgentConnection
    stream: TcpStream
    http: h11.Connection


class ClientConnection:
    def __init__(self, server: IngressServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.settings = server.settings
        self.reader = reader
        self.writer = writer
        self.buf = bytearray()  # client bytes read but not yet parsed (a pipelined request)
        self.relay: _Relay | None = None
        self.idle = server.settings.ingress_idle_timeout_s
        # the VM this connection holds busy (no idle suspend while it is open: ember.lifecycle)
        self.held: tuple[str, contextlib.AsyncExitStack] | None = None

    async def close(self) -> None:
        self._drop_relay()
        await self._release()
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()

    async def _hold(self, vm_id: str) -> None:
        if self.held is not None and self.held[0] == vm_id:
            return
        await self._release()
        stack = contextlib.AsyncExitStack()
        await stack.enter_async_context(self.server.engine.activity.hold(vm_id))
        self.held = (vm_id, stack)

    async def _release(self) -> None:
        if self.held is not None:
            _, stack = self.held
            self.held = None
            await stack.aclose()

    def _drop_relay(self) -> None:
        if self.relay is not None:
            self.relay.stream.drop()
            self.relay = None

    async def serve(self) -> None:
        while True:
            try:
                head = await asyncio.wait_for(read_head(self.reader, self.buf), self.settings.ingress_head_timeout_s)
            except TimeoutError:
                if self.buf:
                    await self.refuse(408, "RequestTimeout", "the request head did not arrive in time")
                return
            except HeadError as exc:
                await self.refuse(exc.status, "InvalidRequest", str(exc))
                return
            if head is None or not await self.exchange(head):
                return

    async def refuse(self, status: int, kind: str, message: str) -> None:
        """Answer with a small JSON error and close the connection."""
        REQUESTS.labels(_OUTCOMES.get(status, "bad_gateway")).inc()
        body = json.dumps({"error": kind, "message": message}).encode()
        head = (
            f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
        )
        with contextlib.suppress(ConnectionError, TimeoutError):
            self.writer.write(head.encode() + body)
            await asyncio.wait_for(self.writer.drain(), 5)

    async def _refuse_error(self, exc: EmberError) -> None:
        await self.refuse(status_of(exc), type(exc).__name__, str(exc)[:1000])

    # ---- one request ------------------------------------------------------------------------------

    async def exchange(self, head: bytes) -> bool:
        """Route, authorise and forward one request; True when the connection may take another."""
        client = h11.Connection(h11.SERVER, max_incomplete_event_size=HEAD_MAX)
        try:
            check_head(head)
            client.receive_data(head)
            request = client.next_event()
        except HeadError as exc:
            await self.refuse(exc.status, "InvalidRequest", str(exc))
            return False
        except h11.RemoteProtocolError as exc:
            await self.refuse(400, "InvalidRequest", f"a malformed request: {exc}"[:300])
            return False
        assert isinstance(request, h11.Request)
        if self.buf:  # what followed the head: body bytes (or a pipelined request); b"" would mean EOF to h11
            client.receive_data(bytes(self.buf))
            self.buf.clear()
        headers = list(request.headers)
        try:
            host = next((v for k, v in headers if k == b"host"), None)
            where = route(host, request.target, headers, self.server.domain)
            if is_shell(where):
                await self.shell(head, headers, where)
                return False
            refuse_token_on_proxy(headers)
            record, used_key = self.authorize(headers, where)
            self.server.admission.authorised(self)
            relay = await self.reach(record, where)
        except HeadError as exc:
            await self.refuse(exc.status, "InvalidRequest" if exc.status != 404 else "NotFound", str(exc))
            return False
        except EmberError as exc:
            await self._refuse_error(exc)
            return False
        return await self.forward(client, request, headers, where, relay, drop_authorization=used_key)

    async def shell(self, head: bytes, headers: list[tuple[bytes, bytes]], where: Route) -> None:
        """The VM's shell, served by the daemon's shell route (which checks the token); HeadError or EmberError
        before anything was answered."""
        scope, ws = shell_scope(head, headers, where, self.writer.get_extra_info("peername"))
        self._drop_relay()
        limit = self.settings.shell_max_message_bytes
        socket = AsgiWebSocket(
            ws,
            self.reader,
            self.writer,
            bytes(self.buf),
            max_message=limit,
            write_timeout_s=self.idle,
            on_accept=lambda: self.server.admission.authorised(self),  # an open shell is never evicted
        )
        self.buf.clear()
        await self.server.shell(scope, socket.receive, socket.send)
        if not socket.answered:
            await self.refuse(500, "InternalError", "the shell ended without an answer")

    def authorize(self, headers: list[tuple[bytes, bytes]], where: Route) -> tuple[VmRecord, bool]:
        """The VM, if the request may reach ``where``; raises 401/403/404 (without touching the VM).
        The flag: the Authorization header was an Ember key (not forwarded)."""
        tokens = [v for k, v in headers if k in TOKEN_HEADERS]
        if len(tokens) > 1:
            raise Unauthorized("send one X-Ember-Proxy-Auth (or X-aws-proxy-auth) header")
        store = self.server.engine.store
        if tokens:
            grant = self.server.signer.verify(tokens[0].decode("latin-1"), kind=TokenKind.PROXY)
            if grant.vm_id != where.vm_id:
                raise Unauthorized("the auth token is for another VM")
            if where.port not in grant.ports:
                raise Forbidden(f"the auth token does not allow port {where.port} (it allows {grant.ports})")
            record = store.get_vm(where.vm_id)
            if record is None or record.tenant != grant.tenant or record.state is VmState.TERMINATED:
                raise VmNotFound(where.vm_id)
            return record, self._is_ember_key(headers)
        keys = [(k.decode(), v.decode("latin-1")) for k, v in headers if k in (b"authorization", TENANT_HEADER)]
        if not any(k == "authorization" for k, _ in keys):
            raise Unauthorized(
                "send X-Ember-Proxy-Auth: <token> ('ember token create VM --port N') or Authorization: Bearer <api key>"
            )
        who = self.server.auth.principal(keys, None)
        if isinstance(who, EmberError):
            raise who
        record = store.get_vm(where.vm_id)
        if record is None or (not who.admin and record.tenant != who.tenant) or record.state is VmState.TERMINATED:
            raise VmNotFound(where.vm_id)
        return record, True

    def _is_ember_key(self, headers: list[tuple[bytes, bytes]]) -> bool:
        """Whether the Authorization header sent beside a token is an Ember API key (a client that sends
        its key by default): it is dropped then, as when the key authorised the request. An app's own
        credentials pass."""
        values = [v.decode("latin-1") for k, v in headers if k == b"authorization"]
        if not values:
            return False
        return not isinstance(self.server.auth.principal([("authorization", values[0])], None), EmberError)

    async def reach(self, record: VmRecord, where: Route) -> _Relay:
        """THE place a request reaches its VM, after it was authorised and before any byte goes in:
        the connection holds the VM busy from now until it closes or turns to another VM (an open
        ingress connection is activity), and a suspended VM run with auto-resume is resumed (one
        resume for all concurrent callers); without auto-resume a VM that is not running is refused."""
        engine = self.server.engine
        await self._hold(record.id)
        engine.activity.touch(record.id)
        try:
            record = await engine.wake(record.id, action="reach the app in")
        except InvalidStateTransition as exc:  # not running and not resumed for us: an HTTP client's 503
            raise VmNotServing(str(exc)) from exc
        agent = engine._agent(record, "reach the app in")
        relay = self.relay
        # kept for the same VM and port, over the same agent channel (a suspend and resume since: a new one)
        if relay is not None and (relay.vm_id, relay.port, relay.agent) == (record.id, where.port, agent):
            return relay
        self._drop_relay()
        stream = await agent.open_tcp(where.port, timeout_s=self.settings.ingress_connect_timeout_s)
        http = h11.Connection(h11.CLIENT, max_incomplete_event_size=RESPONSE_HEAD_MAX)
        self.relay = _Relay(record.id, where.port, agent, stream, http)
        return self.relay

    async def forward(
        self,
        client: h11.Connection,
        request: h11.Request,
        headers: list[tuple[bytes, bytes]],
        where: Route,
        relay: _Relay,
        *,
        drop_authorization: bool,
    ) -> bool:
        guest = relay.http
        upgrade = is_upgrade(headers)
        out = forwarded(headers, drop_authorization=drop_authorization)
        lengths = [v for k, v in headers if k == b"content-length"]
        if lengths:
            out.append((b"content-length", lengths[0]))
        elif any(k == b"transfer-encoding" for k, _ in headers):
            out.append((b"transfer-encoding", b"chunked"))
        if upgrade is not None:
            out += [(b"connection", b"upgrade"), (b"upgrade", upgrade)]
        try:
            data = guest.send(h11.Request(method=request.method, target=where.target, headers=out))
            assert data is not None
            await relay.stream.write(data)
        except (EmberError, ConnectionError) as exc:
            self._drop_relay()
            await self._refuse_error(
                exc if isinstance(exc, EmberError) else GuestError("the app closed the connection")
            )
            return False
        pump = asyncio.create_task(self._pump_body(client, guest, relay.stream))
        answer = asyncio.create_task(self._relay_response(client, guest, relay.stream, upgrade=upgrade is not None))
        try:
            done, _ = await asyncio.wait({pump, answer}, return_when=asyncio.FIRST_COMPLETED)
            if pump in done:
                pump.result()  # a malformed or stalled request body ends the exchange
            switch = await answer
            if switch is not None:  # the request of an upgrade has no body: its end is read at once
                await asyncio.wait_for(pump, self.settings.ingress_head_timeout_s)
                await self._switch(client, switch)
        except BaseException as exc:
            for task in (pump, answer):
                task.cancel()
            await asyncio.gather(pump, answer, return_exceptions=True)
            self._drop_relay()
            if isinstance(exc, _Failed) and exc.status and client.our_state is h11.SEND_RESPONSE:
                await self.refuse(exc.status, exc.kind, exc.message)  # nothing of a response went out yet
            else:
                REQUESTS.labels("aborted").inc()
            log.debug("ingress request to %s ended early: %r", where.vm_id, exc)
            if isinstance(exc, Exception):
                return False
            raise
        REQUESTS.labels("proxied").inc()
        if switch is not None:
            await self._tunnel(client, guest, relay.stream)
            return False
        if not pump.done():
            # the app answered before the pump was through: the request's rest (if the client sent it all) is
            # skipped, and the relay, whose request may be incomplete, is not kept
            pump.cancel()
            await asyncio.gather(pump, return_exceptions=True)
            _skip_received_body(client)
        if guest.our_state is h11.DONE and guest.their_state is h11.DONE:
            guest.start_next_cycle()
        else:
            self._drop_relay()
        if client.our_state is h11.DONE and client.their_state is h11.DONE:
            self.buf[:0] = client.trailing_data[0]
            return True
        return False

    async def _pump_body(self, client: h11.Connection, guest: h11.Connection, stream: TcpStream) -> None:
        """The request body, client to guest, as it arrives (and only as fast as the app reads)."""
        pace = _Pace(self.settings.ingress_head_timeout_s, self.settings.ingress_body_min_rate)
        while True:
            try:
                event = client.next_event()
            except h11.RemoteProtocolError as exc:
                raise _Failed(400, "InvalidRequest", f"a malformed request body: {exc}"[:300]) from None
            if event is h11.NEED_DATA:
                data = await self._read_client(pace)
                client.receive_data(data)
                continue
            if isinstance(event, h11.Data):
                out = guest.send(h11.Data(data=event.data))
            elif isinstance(event, h11.EndOfMessage):
                out = guest.send(h11.EndOfMessage())
            else:
                return
            if out:
                try:
                    await stream.write(out)
                except (ConnectionError, EmberError):
                    return  # the app stopped reading: its answer (or its absence) decides
            if isinstance(event, h11.EndOfMessage):
                return

    async def _read_client(self, pace: _Pace) -> bytes:
        allowed = pace.left_s()
        started = time.monotonic()
        try:
            data = await asyncio.wait_for(self.reader.read(READ_CHUNK), max(0.0, min(self.idle, allowed)))
        except TimeoutError:
            if allowed < self.idle:
                raise _Failed(408, "RequestTimeout", f"the request body came slower than {pace.min_rate} bytes/s "
                              "(EMBER_INGRESS_BODY_MIN_RATE)") from None  # fmt: skip
            raise _Failed(408, "RequestTimeout", f"no request bytes for {self.idle:g} s") from None
        pace.waited_s += time.monotonic() - started
        pace.received += len(data)
        return data

    async def _guest_event(self, guest: h11.Connection, stream: TcpStream) -> Any:
        while True:
            event = guest.next_event()
            if event is not h11.NEED_DATA:
                return event
            try:
                data = await asyncio.wait_for(stream.read(READ_CHUNK), self.idle)
            except TimeoutError:
                raise _Failed(504, "GatewayTimeout", f"the app sent nothing for {self.idle:g} s") from None
            guest.receive_data(data)

    async def _relay_response(self, client: h11.Connection, guest: h11.Connection, stream: TcpStream, *,
                              upgrade: bool) -> h11.InformationalResponse | None:  # fmt: skip
        """The app's response, guest to client, as it arrives; a 101 to an upgrade is returned instead."""
        try:
            while True:
                event = await self._guest_event(guest, stream)
                if isinstance(event, h11.InformationalResponse):
                    if event.status_code == 101:
                        if upgrade:
                            return event
                        raise h11.RemoteProtocolError("a 101 to a request that asked no upgrade")
                    kept = response_headers(list(event.headers))
                    early = h11.InformationalResponse(status_code=event.status_code, headers=kept, reason=event.reason)
                    await self._write(client.send(early))
                elif isinstance(event, h11.Response):
                    kept = response_headers(list(event.headers))
                    await self._write(
                        client.send(h11.Response(status_code=event.status_code, headers=kept, reason=event.reason))
                    )
                elif isinstance(event, h11.Data):
                    await self._write(client.send(h11.Data(data=event.data)))
                elif isinstance(event, h11.EndOfMessage):
                    await self._write(client.send(h11.EndOfMessage()))
                    return None
                else:
                    raise h11.RemoteProtocolError("the connection closed before a response")
        except AgentUnavailable as exc:  # the VM stopped (removed, crashed) or its relays are all in use
            raise _Failed(503, type(exc).__name__, str(exc)[:500]) from None
        except (h11.RemoteProtocolError, GuestError, RelayClosed):
            raise _Failed(502, "BadGateway", "the app closed the connection or sent a malformed response") from None

    async def _switch(self, client: h11.Connection, event: h11.InformationalResponse) -> None:
        """The app accepted the upgrade: pass its 101 on."""
        kept = response_headers(list(event.headers))
        upgrade = [v for k, v in event.headers if k == b"upgrade"][:1]
        kept += [(b"connection", b"upgrade"), *((b"upgrade", v) for v in upgrade)]
        await self._write(client.send(h11.InformationalResponse(status_code=101, headers=kept, reason=event.reason)))

    async def _write(self, data: bytes | None) -> None:
        if data:
            self.writer.write(data)
            try:
                await asyncio.wait_for(self.writer.drain(), self.idle)
            except TimeoutError:
                raise _Failed(0, "", "") from None

    async def _tunnel(self, client: h11.Connection, guest: h11.Connection, stream: TcpStream) -> None:
        """After a 101: raw bytes both ways until both sides closed, or neither sent anything for the idle
        timeout."""
        last = [time.monotonic()]

        async def up() -> None:
            if client.trailing_data[0]:
                await stream.write(client.trailing_data[0])
            while data := await self.reader.read(READ_CHUNK):
                last[0] = time.monotonic()
                await stream.write(data)
            await stream.close_write()

        async def down() -> None:
            if guest.trailing_data[0]:
                self.writer.write(guest.trailing_data[0])
            while data := await stream.read(READ_CHUNK):
                last[0] = time.monotonic()
                self.writer.write(data)
                await self.writer.drain()
            if self.writer.can_write_eof():
                self.writer.write_eof()

        async def watchdog() -> None:
            while time.monotonic() - last[0] < self.idle:
                await asyncio.sleep(min(self.idle, 5.0))

        tasks = [asyncio.create_task(up()), asyncio.create_task(down())]
        dog = asyncio.create_task(watchdog())
        try:
            waiters: set[asyncio.Future[Any]] = {asyncio.gather(*tasks), dog}
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (*tasks, dog):
                task.cancel()
            await asyncio.gather(*tasks, dog, return_exceptions=True)
            self._drop_relay()


class _Pace:
    """A request body's allowance of time spent waiting for the client (not for the app to read): ``grace_s``,
    plus one second for every ``min_rate`` bytes received."""

    def __init__(self, grace_s: float, min_rate: int) -> None:
        self.grace_s = grace_s
        self.min_rate = min_rate
        self.waited_s = 0.0
        self.received = 0

    def left_s(self) -> float:
        return self.grace_s + self.received / self.min_rate - self.waited_s


def _skip_received_body(client: h11.Connection) -> None:
    """Consume what is left of a request body among the bytes already received (none is read)."""
    with contextlib.suppress(h11.RemoteProtocolError):
        while client.their_state is h11.SEND_BODY and client.next_event() is not h11.NEED_DATA:
            pass


class _Failed(Exception):
    """An exchange that cannot go on: ``status`` to answer (0: the response started, just close)."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message
