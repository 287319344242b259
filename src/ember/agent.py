"""Host side of the guest-agent channel (one connection per running VM).

The daemon connects to QEMU's chardev socket, proves it knows the VM's token
(HELLO), and resynchronizes by scanning for the agent's acknowledgement, which
echoes a fresh nonce: bytes left in the channel by an earlier daemon cannot be
mistaken for it. A reader task then routes frames to per-stream queues. The
queues are bounded, so a slow consumer pauses the whole channel (and, through
the agent's bounded buffers, the guest) instead of growing host memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ember.errors import AgentUnavailable, GuestError, InvalidRequest
from ember.guest.protocol import (
    ACK_MAGIC,
    HEADER,
    MAX_PAYLOAD,
    NONCE_LEN,
    DirEntry,
    Field,
    Frame,
    Msg,
    ProtocolError,
    Tag,
    decode_entries,
    decode_fields,
    decode_header,
    encode_fields,
    encode_frame,
    field_int,
    field_str,
)

QUEUE_FRAMES = 64
RESYNC_LIMIT = 8 * 1024 * 1024  # stale bytes we are willing to skip while resyncing
CHUNK = 128 * 1024
MAX_ARGS = 1000  # the agent takes at most 1023 arguments and 1023 environment entries


@dataclass(frozen=True)
class ExecRequest:
    argv: Sequence[str]
    env: Sequence[str] = ()
    cwd: str = ""
    user: str = ""
    timeout_s: float = 0.0
    root: str = ""  # build VMs only: run chrooted into this directory
    tool: bool = False  # build VMs only: argv[0] is an Ember tool outside ``root``


@dataclass(frozen=True)
class ExecResult:
    exit_code: int
    signal: int
    timed_out: bool


def _raise_for(frame: Frame) -> None:
    if frame.type is Msg.ERROR:
        fields = decode_fields(frame.payload)
        raise GuestError(field_str(fields, Tag.MESSAGE, "guest error")[:1000], field_int(fields, Tag.ERRNO, 0))


def identity_request(hostname: str, new_token: str, entropy: bytes, time_ns: int) -> tuple[Msg, list[Field]]:
    """After a restore: reseed the guest RNG, set its clock and hostname, rotate the token."""
    fields: list[Field] = [(Tag.ENTROPY, entropy), (Tag.TIME_NS, time_ns), (Tag.HOSTNAME, hostname)]
    return Msg.RESTORE, [*fields, (Tag.NEW_TOKEN, new_token)]


class AgentConnection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout_s: float) -> None:
        self._reader = reader
        self._writer = writer
        self._timeout = timeout_s
        self._streams: dict[int, asyncio.Queue[Frame | None]] = {}
        self._ids = itertools.count(1)
        self._write_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._leftover = b""
        self.error: str | None = None

    # ---- connection ------------------------------------------------------

    @classmethod
    async def open(cls, sock: Path, timeout_s: float) -> AgentConnection:
        """Connect to the VM's agent socket without talking yet (QEMU may still be restoring)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(str(sock), limit=MAX_PAYLOAD * 2)
                return cls(reader, writer, timeout_s)
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise AgentUnavailable(f"cannot reach the guest agent socket: {exc}") from None
                await asyncio.sleep(0.002)

    async def authenticate(self, token: str, timeout_s: float, then: tuple[Msg, list[Field]] | None = None) -> None:
        """Prove the token, resynchronize the stream, start routing frames.

        ``then`` is a request pipelined right behind the HELLO (one round trip
        instead of two: it matters on a freshly restored TCG guest); an error
        reply to it raises GuestError.
        """
        stream = 0
        if then is not None:
            stream = next(self._ids)
            self._streams[stream] = asyncio.Queue(QUEUE_FRAMES)
        try:
            await asyncio.wait_for(
                self._handshake(token, then and encode_frame(then[0], stream, encode_fields(then[1]))), timeout_s
            )
        except (TimeoutError, OSError, asyncio.IncompleteReadError) as exc:
            self._writer.close()
            raise AgentUnavailable(f"the guest agent did not answer ({type(exc).__name__ or 'timeout'})") from None
        except BaseException:
            self._writer.close()
            raise
        self._task = asyncio.create_task(self._read_loop(), name="agent-reader")
        if then is None:
            return
        try:
            _raise_for(await self._recv(stream))
        finally:
            self._close(stream)

    @classmethod
    async def connect(cls, sock: Path, token: str, timeout_s: float) -> AgentConnection:
        conn = await cls.open(sock, timeout_s)
        await conn.authenticate(token, timeout_s)
        return conn

    async def _handshake(self, token: str, pipelined: bytes | None = None) -> None:
        nonce = os.urandom(NONCE_LEN)
        self._writer.write(encode_frame(Msg.HELLO, 0, encode_fields([(Tag.TOKEN, token), (Tag.NONCE, nonce)])))
        if pipelined:
            self._writer.write(pipelined)
        await self._writer.drain()
        expected = encode_frame(Msg.HELLO_ACK, 0, ACK_MAGIC + nonce)
        buf = b""
        skipped = 0
        while True:
            chunk = await self._reader.read(65536)
            if not chunk:
                raise AgentUnavailable("the guest agent closed the channel during the handshake")
            buf += chunk
            idx = buf.find(expected)
            if idx >= 0:
                # frames that followed the ack belong to this session
                self._leftover = buf[idx + len(expected) :]
                return
            skipped += len(buf) - len(expected)
            if skipped > RESYNC_LIMIT:
                raise AgentUnavailable("the guest agent channel is flooded with garbage")
            buf = buf[-len(expected) :]

    async def _readexactly(self, n: int) -> bytes:
        if not self._leftover:
            return await self._reader.readexactly(n)
        head, self._leftover = self._leftover[:n], self._leftover[n:]
        return head + (await self._reader.readexactly(n - len(head)) if len(head) < n else b"")

    async def _read_loop(self) -> None:
        try:
            while True:
                length, stream, type_ = decode_header(await self._readexactly(HEADER.size))
                payload = await self._readexactly(length) if length else b""
                queue = self._streams.get(stream)
                if queue is None:
                    continue  # a stream we gave up on (or one the guest made up)
                await queue.put(Frame(type_, stream, payload))
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            self.error = "the guest agent channel closed (VM stopped or crashed)"
        except ProtocolError as exc:
            self.error = f"the guest agent broke the protocol: {exc}"
        finally:
            for queue in self._streams.values():
                with contextlib.suppress(asyncio.QueueFull):
                    queue.put_nowait(None)
            self._writer.close()

    @property
    def closed(self) -> bool:
        return self._task is None or self._task.done()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        self._writer.close()

    # ---- streams ---------------------------------------------------------

    def _open(self) -> int:
        if self.closed:
            raise AgentUnavailable(self.error or "not connected to the guest agent")
        stream = next(self._ids)
        self._streams[stream] = asyncio.Queue(QUEUE_FRAMES)
        return stream

    def _close(self, stream: int) -> None:
        self._streams.pop(stream, None)

    async def _send(self, type_: Msg, stream: int, payload: bytes = b"") -> None:
        async with self._write_lock:
            try:
                self._writer.write(encode_frame(type_, stream, payload))
                await self._writer.drain()
            except (ConnectionError, OSError) as exc:
                raise AgentUnavailable(f"lost the guest agent channel: {exc}") from None

    async def _recv(self, stream: int, timeout: float | None = 0) -> Frame:
        """The next frame of a stream; ``timeout`` 0 = the agent's default, None = no limit
        (exec output: the command's own timeout is enforced by the agent)."""
        queue = self._streams[stream]
        try:
            frame = await asyncio.wait_for(queue.get(), self._timeout if timeout == 0 else timeout)
        except TimeoutError:
            raise AgentUnavailable("the guest agent did not answer in time") from None
        if frame is None:
            raise AgentUnavailable(self.error or "the guest agent channel closed")
        return frame

    async def request(self, type_: Msg, fields: list[Field]) -> Frame:
        """One request, one reply (raises the agent's error as GuestError)."""
        stream = self._open()
        try:
            await self._send(type_, stream, encode_fields(fields))
            frame = await self._recv(stream)
            _raise_for(frame)
            return frame
        finally:
            self._close(stream)

    # ---- operations ------------------------------------------------------

    async def ping(self) -> None:
        await self.request(Msg.PING, [])

    async def sync(self) -> None:
        await self.request(Msg.SYNC, [])

    async def probe(self, port: int, http: bool) -> int:
        """Connect to the guest's 127.0.0.1:``port``; with ``http`` POST the ready hook
        and return its HTTP status. Raises GuestError while nothing listens."""
        reply = await self.request(Msg.PROBE, [(Tag.PORT, port), (Tag.HTTP, http)])
        return field_int(decode_fields(reply.payload), Tag.EXIT_CODE, 0)

    async def restore_identity(self, hostname: str, new_token: str, entropy: bytes, time_ns: int) -> None:
        await self.request(*identity_request(hostname, new_token, entropy, time_ns))

    async def exec(
        self, req: ExecRequest, stdin: AsyncIterator[bytes] | None = None
    ) -> AsyncIterator[tuple[str, bytes] | ExecResult]:
        """Run a command; yields ("stdout"|"stderr", bytes) then one ExecResult."""
        fields: list[Field] = [(Tag.ARG, a) for a in req.argv]
        fields += [(Tag.ENV, e) for e in req.env]
        if req.cwd:
            fields.append((Tag.CWD, req.cwd))
        if req.user:
            fields.append((Tag.USER, req.user))
        if req.timeout_s:
            fields.append((Tag.TIMEOUT_MS, max(1, int(req.timeout_s * 1000))))
        if req.root:
            fields.append((Tag.ROOT, req.root))
        if req.tool:
            fields.append((Tag.TOOL, True))
        fields.append((Tag.STDIN, stdin is not None))
        payload = encode_fields(fields)
        if len(payload) > MAX_PAYLOAD or len(req.argv) > MAX_ARGS or len(req.env) > MAX_ARGS:
            raise InvalidRequest(
                f"the command line and environment must fit in {MAX_PAYLOAD // 1024} KiB and {MAX_ARGS} entries "
                "each: pass large input through stdin or a file ('ember cp')"
            )
        stream = self._open()
        feeder: asyncio.Task[None] | None = None
        running = False
        try:
            await self._send(Msg.EXEC, stream, payload)
            first = await self._recv(stream)
            _raise_for(first)
            if first.type is not Msg.STARTED:
                raise GuestError(f"unexpected agent reply {first.type.name} to exec")
            running = True
            if stdin is not None:
                feeder = asyncio.create_task(self._feed_stdin(stream, stdin))
            while True:
                frame = await self._recv(stream, timeout=None)
                if frame.type is Msg.STDOUT:
                    yield ("stdout", frame.payload)
                elif frame.type is Msg.STDERR:
                    yield ("stderr", frame.payload)
                elif frame.type is Msg.EXIT:
                    f = decode_fields(frame.payload)
                    code = field_int(f, Tag.EXIT_CODE)
                    running = False
                    yield ExecResult(
                        exit_code=code - (1 << 64) if code >= 1 << 63 else code,
                        signal=field_int(f, Tag.EXIT_SIGNAL, 0),
                        timed_out=bool(field_int(f, Tag.TIMED_OUT, 0)),
                    )
                    return
                else:
                    _raise_for(frame)
                    raise GuestError(f"unexpected agent reply {frame.type.name} during exec")
        finally:
            if feeder is not None:
                feeder.cancel()
            if running and not self.closed:
                # the caller went away (client disconnected, Ctrl-C): stop the command
                with contextlib.suppress(AgentUnavailable):
                    await self._send(Msg.SIGNAL, stream, encode_fields([(Tag.SIGNAL, 9)]))
            self._close(stream)

    async def _feed_stdin(self, stream: int, stdin: AsyncIterator[bytes]) -> None:
        async for chunk in stdin:
            for i in range(0, len(chunk), CHUNK):
                await self._send(Msg.STDIN, stream, chunk[i : i + CHUNK])
        await self._send(Msg.STDIN_EOF, stream)

    async def write_file(self, path: str, data: AsyncIterator[bytes], mode: int = 0o644, mkdirs: bool = False) -> int:
        stream = self._open()
        try:
            fields: list[Field] = [(Tag.PATH, path), (Tag.MODE, mode), (Tag.MKDIRS, mkdirs)]
            await self._send(Msg.WRITE, stream, encode_fields(fields))
            _raise_for(await self._recv(stream))
            async for chunk in data:
                for i in range(0, len(chunk), CHUNK):
                    await self._send(Msg.WDATA, stream, chunk[i : i + CHUNK])
                # a write error arrives early; stop sending as soon as it does
                if not self._streams[stream].empty():
                    _raise_for(await self._recv(stream))
            await self._send(Msg.WEOF, stream)
            done = await self._recv(stream, timeout=max(self._timeout, 300))  # fsync of a large file
            _raise_for(done)
            return field_int(decode_fields(done.payload), Tag.SIZE, 0)
        finally:
            self._close(stream)

    async def read_file(self, path: str) -> tuple[int, AsyncIterator[bytes]]:
        """Open a guest file; returns its size and an iterator over its bytes."""
        stream = self._open()
        try:
            await self._send(Msg.READ, stream, encode_fields([(Tag.PATH, path)]))
            first = await self._recv(stream)
            _raise_for(first)
        except BaseException:
            self._close(stream)
            raise
        size = field_int(decode_fields(first.payload), Tag.SIZE, 0)

        async def chunks() -> AsyncIterator[bytes]:
            try:
                while True:
                    frame = await self._recv(stream)
                    if frame.type is Msg.RDATA:
                        yield frame.payload
                    elif frame.type is Msg.REOF:
                        return
                    else:
                        _raise_for(frame)
                        raise GuestError(f"unexpected agent reply {frame.type.name} while reading")
            finally:
                self._close(stream)

        return size, chunks()

    async def list_dir(self, path: str) -> list[DirEntry]:
        stream = self._open()
        try:
            await self._send(Msg.LIST, stream, encode_fields([(Tag.PATH, path)]))
            blob = bytearray()
            while True:
                frame = await self._recv(stream)
                _raise_for(frame)
                if frame.type is Msg.REOF:
                    return decode_entries(bytes(blob))
                if len(blob) > 64 * 1024 * 1024:
                    raise GuestError("directory listing too large")
                blob += frame.payload
        finally:
            self._close(stream)
