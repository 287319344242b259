"""A terminal in a VM (``GET /v1/vms/{id}/shell``, a WebSocket): :class:`Shell` (sync, on a plain
socket: ``fileno()`` works with ``select``) and :class:`AsyncShell` (asyncio streams).

The WebSocket framing is wsproto's (sans-IO); :class:`ShellProtocol` turns it into what a
terminal needs: output bytes, the exit status, input, resizes. The daemon is trusted, but
its answers stay bounded: an exit message or refusal body over ``MAX_CONTROL`` is a
:class:`ProtocolError`.
"""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Sequence
from urllib.parse import urlencode

from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Message,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.utilities import RemoteProtocolError

from ember.sdk.core import Endpoint, _vm_path, check, connect_hint
from ember.sdk.errors import ConnectError, ProtocolError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (the CLI's start)
if TYPE_CHECKING:
    import asyncio

MAX_CONTROL = 1 << 20  # bytes of a text message or a refusal's body
READ_SIZE = 64 * 1024


def shell_target(
    endpoint: Endpoint, vm_id: str, command: Sequence[str], *, user: str, cwd: str, rows: int, cols: int, term: str
) -> str:
    params: list[tuple[str, str | int]] = [("command", a) for a in command]
    params += [("rows", rows), ("cols", cols), ("term", term)]
    params += [(k, v) for k, v in (("user", user), ("cwd", cwd)) if v]
    return f"{endpoint.prefix}{_vm_path(vm_id, 'shell')}?{urlencode(params)}"


class ShellProtocol:
    """The client side of a shell's WebSocket, without I/O: bytes in (:meth:`feed`), bytes out."""

    def __init__(self, endpoint: Endpoint, target: str, *, subprotocols: Sequence[str] = ()) -> None:
        """``subprotocols``: offered to the daemon (a shell token: ``ember.authentication.<token>``, ``ember``)."""
        self._ws = WSConnection(ConnectionType.CLIENT)
        host = "ember" if endpoint.socket else f"{endpoint.host}:{endpoint.port}"
        headers = [(k.encode(), v.encode()) for k, v in endpoint.headers.items()]
        request = Request(host=host, target=target, extra_headers=headers, subprotocols=list(subprotocols))
        self.handshake = self._ws.send(request)
        self.subprotocol: str | None = None  # the one the daemon selected
        self.accepted = False
        self.exit_code: int | None = None  # set from the server's exit message
        self.signal = 0
        self.close_reason = ""  # why the daemon closed the socket without an exit status (idle, too big...)
        self.ended = False  # the socket was closed (by either side) or the exit message came
        self._held = bytearray()  # output that came in the same reads as the handshake's answer
        self._refused: tuple[int, list[tuple[bytes, bytes]], bytearray] | None = None
        self._refusal_done = False
        self._text = bytearray()

    def feed(self, data: bytes) -> tuple[bytes, bytes]:
        """Take what the socket read (b"" at its end); returns (terminal output, bytes to send back)."""
        if not data and not self.accepted and self._refused is None:
            raise ProtocolError("the daemon closed the connection before the shell opened")
        out, reply = bytearray(), bytearray()
        try:
            self._ws.receive_data(data or None)
            for event in self._ws.events():
                self._event(event, out, reply)
        except RemoteProtocolError as exc:
            raise ProtocolError(f"the daemon's WebSocket answer is malformed ({exc})") from None
        if self._refused is not None and (self._refusal_done or not data):
            self._raise_refusal()
        if not data:
            self.ended = True
        return bytes(out), bytes(reply)

    def hold(self, out: bytes) -> None:
        """Keep output read while waiting for the handshake's answer (a fast command's whole output, its exit
        and the close can come in the same read as the 101): :meth:`take_held` gives it back once."""
        self._held += out

    def take_held(self) -> bytes:
        held, self._held = bytes(self._held), bytearray()
        return held

    def _event(self, event: Event, out: bytearray, reply: bytearray) -> None:
        if isinstance(event, AcceptConnection):
            self.accepted = True
            self.subprotocol = event.subprotocol
        elif isinstance(event, RejectConnection):
            self._refused = (event.status_code, list(event.headers), bytearray())
            self._refusal_done = not event.has_body
        elif isinstance(event, RejectData) and self._refused is not None:
            self._refused[2].extend(event.data)
            if len(self._refused[2]) > MAX_CONTROL:
                raise ProtocolError(f"the daemon's refusal is over {MAX_CONTROL} bytes")
            self._refusal_done = event.body_finished
        elif isinstance(event, BytesMessage):
            out += event.data
        elif isinstance(event, TextMessage):
            self._control(event)
        elif isinstance(event, Ping):
            reply += self._ws.send(event.response())
        elif isinstance(event, CloseConnection):
            self.close_reason = (event.reason or "")[:200]
            if self._ws.state is not ConnectionState.CLOSED:
                reply += self._ws.send(event.response())
            self.ended = True

    def _control(self, event: Message[str]) -> None:
        self._text += event.data.encode()
        if len(self._text) > MAX_CONTROL:
            raise ProtocolError(f"a control message over {MAX_CONTROL} bytes")
        if not event.message_finished:
            return
        try:
            message = json.loads(self._text)
        except ValueError:
            raise ProtocolError("the daemon sent a control message that is not JSON") from None
        self._text.clear()
        if isinstance(message, dict) and message.get("type") == "exit":
            code, sig = message.get("code"), message.get("signal", 0)
            self.exit_code = code if type(code) is int else -1
            self.signal = sig if type(sig) is int else 0

    def _raise_refusal(self) -> None:
        assert self._refused is not None
        status, headers, body = self._refused
        retry = next((v.decode("latin-1") for k, v in headers if k.lower() == b"retry-after"), None)
        check(status, bytes(body), retry)
        raise ProtocolError(f"the daemon answered the shell's handshake with HTTP {status}")

    def input(self, data: bytes) -> bytes:
        return self._ws.send(BytesMessage(data=data)) if self._open else b""

    def resize(self, rows: int, cols: int) -> bytes:
        message = json.dumps({"type": "resize", "rows": rows, "cols": cols})
        return self._ws.send(TextMessage(data=message)) if self._open else b""

    def close(self) -> bytes:
        return self._ws.send(CloseConnection(code=1000)) if self._open else b""

    @property
    def _open(self) -> bool:
        return self._ws.state is ConnectionState.OPEN


class Shell:
    """A terminal in a VM, on a socket of its own: :meth:`recv` its output, :meth:`send` input,
    :meth:`resize`; ``exit_code`` once it ended. ``fileno()`` is the socket (for ``select``)."""

    def __init__(self, sock: socket.socket, proto: ShellProtocol) -> None:
        self._sock = sock
        self._proto = proto
        try:
            sock.sendall(proto.handshake)
            while not proto.accepted:
                proto.hold(self.pump())
        except BaseException:
            sock.close()
            raise

    def pump(self) -> bytes:
        """One read of the socket (it blocks while nothing came): the output it carried, maybe b""."""
        try:
            data = self._sock.recv(READ_SIZE)
        except OSError as exc:
            raise ProtocolError(f"the connection to the daemon broke ({exc})") from None
        out, reply = self._proto.feed(data)
        if reply:
            with contextlib.suppress(OSError):  # a pong or the close's answer: the daemon may be gone already
                self._sock.sendall(reply)
        return out

    def fileno(self) -> int:
        return self._sock.fileno()

    def take_held(self) -> bytes:
        """Output that came with the handshake's answer (once): :meth:`recv` returns it first; a caller that
        reads with :meth:`pump` takes it here."""
        return self._proto.take_held()

    @property
    def exit_code(self) -> int | None:
        return self._proto.exit_code

    @property
    def ended(self) -> bool:
        return self._proto.ended

    @property
    def signal(self) -> int:
        return self._proto.signal

    @property
    def close_reason(self) -> str:
        return self._proto.close_reason

    def recv(self) -> bytes:
        """What the terminal printed (blocks until something comes); b"" once the shell ended."""
        if held := self._proto.take_held():
            return held
        while not self._proto.ended:
            out = self.pump()
            if out:
                return out
        return b""

    def send(self, data: bytes) -> None:
        self._sock.sendall(self._proto.input(data))

    def resize(self, rows: int, cols: int) -> None:
        self._sock.sendall(self._proto.resize(rows, cols))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.sendall(self._proto.close())
        self._sock.close()

    def __enter__(self) -> Shell:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class AsyncShell:
    """:class:`Shell` for asyncio: ``await recv()``, ``await send()``, ``await resize()``."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, proto: ShellProtocol) -> None:
        self._reader, self._writer, self._proto = reader, writer, proto

    @classmethod
    async def open(cls, endpoint: Endpoint, target: str) -> AsyncShell:
        import asyncio

        proto = ShellProtocol(endpoint, target)
        try:
            if endpoint.socket:
                reader, writer = await asyncio.open_unix_connection(endpoint.socket)
            else:
                tls = endpoint.scheme == "https"
                reader, writer = await asyncio.open_connection(endpoint.host.strip("[]"), endpoint.port, ssl=tls)
        except OSError as exc:
            raise ConnectError(connect_hint(endpoint.where, exc)) from None
        shell = cls(reader, writer, proto)
        try:
            writer.write(proto.handshake)
            while not proto.accepted:
                proto.hold(await shell._pump())
        except BaseException:
            writer.close()
            raise
        return shell

    async def _pump(self) -> bytes:
        try:
            data = await self._reader.read(READ_SIZE)
        except OSError as exc:
            raise ProtocolError(f"the connection to the daemon broke ({exc})") from None
        out, reply = self._proto.feed(data)
        if reply:
            with contextlib.suppress(OSError):  # a pong or the close's answer: the daemon may be gone already
                await self._write(reply)
        return out

    async def _write(self, data: bytes) -> None:
        if data:
            self._writer.write(data)
            await self._writer.drain()

    @property
    def exit_code(self) -> int | None:
        return self._proto.exit_code

    @property
    def ended(self) -> bool:
        return self._proto.ended

    @property
    def signal(self) -> int:
        return self._proto.signal

    @property
    def close_reason(self) -> str:
        return self._proto.close_reason

    async def recv(self) -> bytes:
        """What the terminal printed; b"" once the shell ended."""
        if held := self._proto.take_held():
            return held
        while not self._proto.ended:
            out = await self._pump()
            if out:
                return out
        return b""

    async def send(self, data: bytes) -> None:
        await self._write(self._proto.input(data))

    async def resize(self, rows: int, cols: int) -> None:
        await self._write(self._proto.resize(rows, cols))

    async def close(self) -> None:
        with contextlib.suppress(OSError):
            await self._write(self._proto.close())
        self._writer.close()

    async def __aenter__(self) -> AsyncShell:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()
