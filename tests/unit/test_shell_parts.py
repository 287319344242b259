"""The pure parts of interactive work: the shell route's query and control messages, signal names,
the terminal size bounds, the background-process frames, the SDK's WebSocket client state, and the
request guard on WebSocket handshakes."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path
from typing import Any

import pytest
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, BytesMessage, CloseConnection, RejectConnection, RejectData, TextMessage

from ember.agentproc import TermSize, _process
from ember.api.auth import PEER_UID, Authenticator
from ember.api.guard import BodyCaps, RequestGuard, TcpPolicy
from ember.api.processes import parse_signal
from ember.api.shell import control_message, shell_options
from ember.config import Settings
from ember.db.store import connect
from ember.db.tenants import TenantStore
from ember.errors import GuestProtocolError, InvalidRequest
from ember.guest.protocol import Msg, Tag, encode_fields
from ember.ingress.tokens import TokenSigner
from ember.sdk import NotFound, ProtocolError
from ember.sdk.core import Endpoint
from ember.sdk.shell import AsyncShell, Shell, ShellProtocol, shell_target
from ember.tenancy.ratelimit import RateLimiter


def test_shell_options_defaults_and_bounds() -> None:
    options = shell_options({})
    assert (options.command, options.size, options.term) == ((), TermSize(24, 80), "xterm-256color")
    options = shell_options({"command": ["sh", "-c", "echo hi"], "rows": ["50"], "cols": ["200"], "user": ["nobody"]})
    assert options.command == ("sh", "-c", "echo hi") and options.size == TermSize(50, 200)
    for bad in ({"rows": ["0"]}, {"cols": ["1001"]}, {"rows": ["-3"]}, {"rows": ["²"]}, {"rows": ["9" * 40]},
                {"term": ["xterm; rm -rf /"]}, {"user": ["a", "b"]}, {"cwd": ["/tmp\x00"]}, {"shell": ["bash"]},
                {"command": ["x"] * 1001}):  # fmt: skip
        with pytest.raises(InvalidRequest):
            shell_options(bad)


def test_control_messages() -> None:
    assert control_message(json.dumps({"type": "resize", "rows": 40, "cols": 120})) == TermSize(40, 120)
    for bad in ("{nope", "[]", '{"type": "exit"}', '{"type": "resize", "rows": "40", "cols": 80}',
                '{"type": "resize", "rows": true, "cols": 80}', '{"type": "resize", "rows": 0, "cols": 80}',
                json.dumps({"type": "resize", "rows": 1, "cols": 1, "pad": "x" * 2000})):  # fmt: skip
        with pytest.raises(InvalidRequest):
            control_message(bad)


def test_signals_by_name_or_number() -> None:
    assert [parse_signal(s) for s in ("TERM", "sigkill", "SIGINT", "hup", 15, "9")] == [15, 9, 2, 1, 15, 9]
    for bad in ("NOPE", "SIG_DFL", 0, 65, "1000", "TERM;", "", "²", "٣"):
        with pytest.raises(InvalidRequest):
            parse_signal(bad)


def test_process_frames_are_checked() -> None:
    running = encode_fields([(Tag.PID, 42), (Tag.ARG, "sleep 300"), (Tag.TIME_NS, 10**18), (Tag.RUNNING, 1)])
    proc = _process(running)
    assert (proc.pid, proc.command, proc.running, proc.exit_code) == (42, "sleep 300", True, None)
    exited = encode_fields([(Tag.PID, 7), (Tag.TIME_NS, 1), (Tag.RUNNING, 0), (Tag.EXIT_CODE, 2**64 - 1),
                            (Tag.EXIT_SIGNAL, 9)])  # fmt: skip
    assert (_process(exited).exit_code, _process(exited).signal) == (-1, 9)
    with pytest.raises(GuestProtocolError):
        _process(encode_fields([(Tag.ARG, "no pid")]))
    assert Msg.PROC == 80 and Msg.RESIZE == 20 and Tag.PTY == 45  # the numbers pre-assigned to this part


def _server_bytes(client: ShellProtocol) -> tuple[WSConnection, bytes]:
    server = WSConnection(ConnectionType.SERVER)
    server.receive_data(client.handshake)
    next(server.events())
    return server, server.send(AcceptConnection())


def test_sdk_shell_protocol_output_exit_and_close() -> None:
    ep = Endpoint(socket="/run/ember.sock", headers={"Authorization": "Bearer k"})
    target = shell_target(ep, "vm-1", ["sh", "-c", "a b"], user="", cwd="/tmp", rows=5, cols=6, term="xterm")
    assert target == "/v1/vms/vm-1/shell?command=sh&command=-c&command=a+b&rows=5&cols=6&term=xterm&cwd=%2Ftmp"
    client = ShellProtocol(ep, target)
    assert b"Authorization: Bearer k" in client.handshake
    server, accept = _server_bytes(client)
    out, _ = client.feed(accept)
    assert client.accepted and out == b""
    data = server.send(BytesMessage(data=b"hello ")) + server.send(BytesMessage(data=b"world"))
    data += server.send(TextMessage(data=json.dumps({"type": "exit", "code": 3, "signal": 0})))
    data += server.send(CloseConnection(code=1000))
    out, reply = client.feed(data)
    assert (out, client.exit_code, client.ended) == (b"hello world", 3, True) and reply  # the close answered
    assert client.input(b"late") == b""  # nothing is sent on a closed socket


def _whole_answer(server: WSConnection, accept: bytes) -> bytes:
    """The 101, a fast command's whole output, its exit and the close, as one read can bring them."""
    data = accept + server.send(BytesMessage(data=b"ran-42\r\n"))
    data += server.send(TextMessage(data=json.dumps({"type": "exit", "code": 3, "signal": 0})))
    return data + server.send(CloseConnection(code=1000))


def test_sdk_shells_keep_output_that_came_with_the_handshake() -> None:
    """Sent in the same read as the 101, the output was dropped (the ingress's shell test saw b"" once)."""
    mine, theirs = socket.socketpair()
    with theirs:
        proto = ShellProtocol(Endpoint(socket="/run/ember.sock"), "/v1/vms/vm-1/shell")
        server = WSConnection(ConnectionType.SERVER)
        server.receive_data(proto.handshake)  # what Shell will send, answered before it reads
        next(server.events())
        theirs.sendall(_whole_answer(server, server.send(AcceptConnection())))
        shell = Shell(mine, proto)
        assert (shell.recv(), shell.recv(), shell.exit_code) == (b"ran-42\r\n", b"", 3)
        shell.close()


async def test_the_async_shell_keeps_output_that_came_with_the_handshake(tmp_path: Path) -> None:
    path = str(tmp_path / "sock")
    answered = asyncio.Event()

    async def daemon(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        server = WSConnection(ConnectionType.SERVER)
        server.receive_data(await reader.read(65536))
        next(server.events())
        writer.write(_whole_answer(server, server.send(AcceptConnection())))
        await writer.drain()
        answered.set()
        await reader.read()  # until the client closes
        writer.close()

    async with await asyncio.start_unix_server(daemon, path):
        shell = await AsyncShell.open(Endpoint(socket=path), "/v1/vms/vm-1/shell")
        await answered.wait()
        assert (await shell.recv(), await shell.recv(), shell.exit_code) == (b"ran-42\r\n", b"", 3)
        await shell.close()


def test_sdk_shell_protocol_refusals_raise_typed_errors() -> None:
    client = ShellProtocol(Endpoint(), "/v1/vms/vm-1/shell")
    server = WSConnection(ConnectionType.SERVER)
    server.receive_data(client.handshake)
    next(server.events())
    body = json.dumps({"error": "VmNotFound", "message": "no VM vm-1"}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    refusal = server.send(RejectConnection(status_code=404, headers=headers, has_body=True))
    refusal += server.send(RejectData(data=body))
    with pytest.raises(NotFound, match="no VM vm-1"):
        client.feed(refusal)
    with pytest.raises(ProtocolError, match="before the shell opened"):
        ShellProtocol(Endpoint(), "/x").feed(b"")


async def _handshake(guard: RequestGuard, path: str, headers: list[tuple[bytes, bytes]], uid: int | None) -> list[dict]:
    """What the guard sends for a WebSocket handshake (the app behind it accepts at once)."""
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "websocket.connect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "websocket", "path": path, "query_string": b"", "headers": headers, PEER_UID: uid,
             "extensions": {"websocket.http.response": {}}}  # fmt: skip
    await guard(scope, receive, send)
    return sent


async def test_the_guard_opens_only_the_shell_websocket_and_authenticates_it(tmp_path: Path) -> None:
    async def app(scope: dict, receive: object, send: Any) -> None:
        await send({"type": "websocket.accept"})

    tenants = TenantStore(connect(tmp_path / "db"))
    guard = RequestGuard(app, BodyCaps.from_settings(Settings()), TcpPolicy.for_listener("127.0.0.1:7070"),
                         Authenticator(tenants, RateLimiter(1000.0, 1000)), TokenSigner(b"k" * 32))  # fmt: skip
    host = [(b"host", b"127.0.0.1:7070")]
    assert await _handshake(guard, "/v1/vms/vm-1/shell", host, 0) == [{"type": "websocket.accept"}]
    # no key and not root: a 401 as the handshake's answer, with Ember's error body
    refused = await _handshake(guard, "/v1/vms/vm-1/shell", host, 1000)
    assert refused[0]["type"] == "websocket.http.response.start" and refused[0]["status"] == 401
    assert b'"Unauthorized"' in refused[1]["body"]
    bad_key = await _handshake(guard, "/v1/vms/vm-1/shell", [*host, (b"authorization", b"Bearer " + b"x" * 43)], 0)
    assert bad_key[0]["status"] == 401
    # the TCP listener's Host and Origin checks hold for WebSockets too (a page of another origin)
    other = await _handshake(guard, "/v1/vms/vm-1/shell", [*host, (b"origin", b"http://evil.example")], 0)
    assert other[0]["status"] == 403
    # any other WebSocket path is closed unanswered, root or not
    assert await _handshake(guard, "/v1/vms/vm-1/exec", host, 0) == [{"type": "websocket.close", "code": 1008}]
