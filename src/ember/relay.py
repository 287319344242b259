"""TCP relays into a guest (the ingress): a connection to the guest's 127.0.0.1:PORT over the agent channel.

Bytes flow both ways on credit (``ember.guest.protocol``): the host sends only what the agent's window
has room for, and grants the agent more only as its caller reads, so a relay never holds more than one
window (``TCP_WINDOW``) of the guest's bytes, whatever the guest sends; a frame beyond the credit is a
protocol error. A VM has at most ``EMBER_INGRESS_VM_CONNECTIONS`` relays open at once.
"""

from __future__ import annotations

import asyncio
import errno

from ember.agent import AgentConnection, _Credit, _raise_for
from ember.errors import (
    AgentUnavailable,
    GatewayTimeout,
    GuestError,
    GuestProtocolError,
    InvalidRequest,
    RelayUnavailable,
)
from ember.guest.protocol import TCP_WINDOW, Msg, Tag, decode_fields, encode_fields, field_int

SEND_CHUNK = 64 * 1024
CREDIT_BATCH = TCP_WINDOW // 4  # bytes read before the agent is granted them again


class RelayClosed(ConnectionResetError):
    """The app in the guest stopped reading (it closed or reset its side): nothing more can be written."""


class TcpStream:
    """One relayed connection: ``read`` (b"" at the app's EOF), ``write``, ``close_write``, ``close``."""

    def __init__(self, conn: AgentConnection, stream: int, credit: _Credit) -> None:
        self._conn = conn
        self._stream = stream
        self._credit = credit  # what the agent may take of our bytes
        self._owed = 0  # bytes read by our caller, not yet granted back
        self._rest = b""
        self._eof = False
        self._shut = False
        self._closed = False

    @classmethod
    async def open(cls, conn: AgentConnection, port: int, *, timeout_s: float) -> TcpStream:
        if not 1 <= port <= 65535:
            raise InvalidRequest(f"port {port}: ports are 1-65535")
        if conn.tcp_open >= conn._limits.tcp_relays:
            raise RelayUnavailable(
                f"the VM has {conn.tcp_open} ingress connections open, its limit: retry when one closes"
            )
        stream = conn._open()
        conn.tcp_open += 1
        conn.tcp_credit[stream] = TCP_WINDOW  # checked as frames arrive (the reader loop)
        try:
            await conn._send(Msg.TCP_CONNECT, stream, encode_fields([(Tag.PORT, port), (Tag.SIZE, TCP_WINDOW)]))
            try:
                frame = await asyncio.wait_for(conn._recv(stream, timeout=None), timeout_s)
            except TimeoutError:
                raise GatewayTimeout(f"port {port} in the VM did not accept a connection in {timeout_s:g} s") from None
            try:
                _raise_for(frame, Msg.TCP_CONNECTED)
            except GuestError as exc:
                if exc.errno == errno.ECONNREFUSED:
                    raise GuestError(f"nothing in the VM listens on port {port}", exc.errno) from None
                raise
            window = field_int(decode_fields(frame.payload), Tag.SIZE)
            credit = conn._credits[stream] = _Credit(window)
        except BaseException:
            conn._cancel(stream)
            conn.tcp_open -= 1
            raise
        return cls(conn, stream, credit)

    async def read(self, n: int = SEND_CHUNK) -> bytes:
        """Up to ``n`` bytes the app sent; b"" once it closed its side."""
        if not self._rest:
            if self._eof or self._closed:
                return b""
            frame = await self._conn._recv(self._stream, timeout=None)
            if frame.type is Msg.TCP_EOF:
                self._eof = True
                return b""
            if frame.type is not Msg.TCP_RECV:
                _raise_for(frame)
                raise GuestProtocolError(f"{frame.type.name} in a TCP relay")
            self._rest = frame.payload
        data, self._rest = self._rest[:n], self._rest[n:]
        self._owed += len(data)
        if self._owed >= CREDIT_BATCH and not self._eof:
            owed, self._owed = self._owed, 0
            if self._conn.closed:  # say why (a hostile agent's flood, say), not just that the channel went
                raise AgentUnavailable(self._conn.error or "the guest agent channel closed")
            if self._stream in self._conn.tcp_credit:
                self._conn.tcp_credit[self._stream] += owed
            await self._conn._send(Msg.TCP_CREDIT, self._stream, encode_fields([(Tag.SIZE, owed)]))
        return data

    async def write(self, data: bytes) -> None:
        """Send ``data`` to the app, as fast as it reads; raises :class:`RelayClosed` once it stopped reading."""
        view = memoryview(data)
        while view:
            if self._shut or self._closed:
                raise RelayClosed("the connection to the app is closed for writing")
            n = await self._credit.take(min(len(view), SEND_CHUNK))
            if n == 0:
                if self._conn.closed:
                    raise AgentUnavailable(self._conn.error or "the guest agent channel closed")
                raise RelayClosed("the app in the VM stopped reading the connection")
            await self._conn._send(Msg.TCP_SEND, self._stream, bytes(view[:n]))
            view = view[n:]

    async def close_write(self) -> None:
        """Half-close: the app reads EOF after the bytes written so far."""
        if not self._shut and not self._closed:
            self._shut = True
            await self._conn._send(Msg.TCP_SHUT, self._stream)

    def drop(self) -> None:
        """Drop the connection (the agent closes its socket); frames still queued are given back."""
        if not self._closed:
            self._closed = True
            self._conn._cancel(self._stream)
            self._conn.tcp_open -= 1

    async def close(self) -> None:
        self.drop()
