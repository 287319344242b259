"""Host side of the guest-agent channel (one connection per running VM).

The daemon connects to QEMU's chardev socket, proves it knows the VM's token
(HELLO), and resynchronizes by scanning for the agent's answer (HELLO_ACK, or
HELLO_NAK for a token it refuses), which echoes a fresh nonce: bytes left in the
channel by an earlier daemon cannot be mistaken for it. A reader task then
routes frames to per-stream queues.

The token is on no command line. After a cold boot (template captures, build
VMs) the daemon hands it over the channel itself (``first_boot=True``: a
SET_TOKEN ahead of the HELLO), which a fresh agent accepts exactly once; every
restored agent already knows its token and gets a new one with the identity
request (see ``ember.guest.protocol``).

Every reply is hostile: a malformed or unexpected one raises
:class:`GuestProtocolError` (HTTP 503). Queued frames are paid for in bytes
from two budgets (:class:`ChannelLimits`): one per VM and one for the whole
daemon, which pays only for what a VM holds beyond a reserved share of its
own. When either is spent the reader stops reading the VM's channel until
consumers take frames (back-pressure, through the agent's bounded buffers, to
the guest), so one VM never holds more than its budget, all VMs together never
more than the daemon's plus each VM's share, and VMs flooding into clients that
never read cannot pause another VM's replies. A stream whose consumer goes away
(an abandoned file iterator included) is closed and its frames are given back.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import os
import re
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ember.applog import LogChunk, decode_chunk
from ember.config import Settings
from ember.errors import AgentUnavailable, GuestError, GuestProtocolError, HostSetupError, InvalidRequest, TokenRefused
from ember.guest.protocol import (
    HEADER,
    MAX_ID,
    MAX_PAYLOAD,
    NONCE_LEN,
    TCP_WINDOW,
    DirEntry,
    Field,
    Frame,
    Msg,
    Tag,
    decode_entries,
    decode_fields,
    decode_header,
    encode_fields,
    encode_frame,
    field_int,
    field_str,
    hello_answers,
    hello_frames,
)

if TYPE_CHECKING:
    from ember.relay import TcpStream

FRAME_COST = 256  # host bytes charged per queued frame beyond its payload (empty frames are not free)
RESYNC_LIMIT = 8 * 1024 * 1024  # stale bytes we are willing to skip while resyncing
CHUNK = 128 * 1024
MAX_ARGS = 1000  # the agent takes at most 1023 arguments and 1023 environment entries
_NUMERIC = re.compile(r"-?[0-9]+")


class ByteBudget:
    """Bytes that may be held at once; ``take`` waits (first come, first served) until they are free."""

    def __init__(self, limit: int, name: str) -> None:
        if limit < MAX_PAYLOAD + FRAME_COST:
            raise HostSetupError(f"{name} must be at least {MAX_PAYLOAD + FRAME_COST} bytes (one largest frame)")
        self.limit = limit
        self.used = 0
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    async def take(self, n: int) -> None:
        if not self._waiters and self.used + n <= self.limit:
            self.used += n
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append((n, waiter))
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.release(n)  # granted just as we were cancelled
            raise

    def release(self, n: int) -> None:
        self.used -= n
        while self._waiters and (self._waiters[0][1].done() or self.used + self._waiters[0][0] <= self.limit):
            size, waiter = self._waiters.popleft()
            if not waiter.done():
                self.used += size
                waiter.set_result(None)


_DAEMON_BUDGETS: dict[Settings, ByteBudget] = {}


class ChannelLimits:
    """What one VM's agent channel may hold on the host: its own budget; the daemon-wide one
    (shared by every channel of a daemon), charged only for the bytes beyond the VM's first
    ``reserved`` ones, so that share is always admitted (the daemon holds at most its budget
    + VMs x ``reserved``); and the most entries one listing returns."""

    def __init__(
        self, *, vm: ByteBudget, daemon: ByteBudget, reserved: int, ls_max_entries: int, tcp_relays: int = 32
    ) -> None:
        self.vm = vm
        self.daemon = daemon
        self.reserved = reserved
        self.ls_max_entries = ls_max_entries
        self.tcp_relays = tcp_relays  # TCP relays (ingress) open at once
        self._charged = 0  # bytes this VM holds of the daemon budget: its queue beyond ``reserved``

    @classmethod
    def of(cls, settings: Settings) -> ChannelLimits:
        daemon = _DAEMON_BUDGETS.get(settings)
        if daemon is None:
            daemon = _DAEMON_BUDGETS.setdefault(
                settings, ByteBudget(settings.agent_daemon_buffer_bytes, "EMBER_AGENT_DAEMON_BUFFER_BYTES")
            )
        vm = ByteBudget(settings.agent_vm_buffer_bytes, "EMBER_AGENT_VM_BUFFER_BYTES")
        reserved = max(0, settings.agent_vm_reserved_bytes)
        # relays hold at most their credit each: together at most half the VM's budget, leaving the rest to
        # every other reply
        relays = max(1, min(settings.ingress_vm_connections, settings.agent_vm_buffer_bytes // (2 * TCP_WINDOW)))
        limits = cls(vm=vm, daemon=daemon, reserved=reserved, ls_max_entries=max(1, settings.ls_max_entries))
        limits.tcp_relays = relays
        return limits

    async def take(self, n: int) -> None:
        await self.vm.take(n)
        try:
            need = max(0, self.vm.used - self.reserved) - self._charged
            if need > 0:
                await self.daemon.take(need)
                self._charged += need
                self._settle()  # frames taken by consumers while this waited
        except BaseException:
            self.release(n)
            raise

    def release(self, n: int) -> None:
        self.vm.release(n)
        self._settle()

    def _settle(self) -> None:
        """Give back to the daemon budget what this VM no longer holds beyond its share."""
        excess = self._charged - max(0, self.vm.used - self.reserved)
        if excess > 0:
            self._charged -= excess
            self.daemon.release(excess)


@dataclass(frozen=True)
class ExecRequest:
    argv: Sequence[str]
    env: Sequence[str] = ()
    cwd: str = ""
    user: str = ""
    timeout_s: float = 0.0
    root: str = ""  # build VMs only: run chrooted into this directory
    tool: bool = False  # build VMs only: argv[0] is an Ember tool outside ``root``
    log_bytes: int = 0  # the image's app: the agent keeps its output in a log of this size (ember.applog)


@dataclass(frozen=True)
class ExecResult:
    exit_code: int
    signal: int
    timed_out: bool


@dataclass(frozen=True)
class GuestIdleState:
    hold: bool  # the guest holds itself awake (ember-idle hold)
    suspend_now: bool  # the guest asked to be suspended now (ember-idle suspend)


IDLE_STATE_MAX = 64  # bytes of an IDLE_STATE answer (two 8-byte fields take 26)


@dataclass(frozen=True)
class Listing:
    entries: list[DirEntry]
    truncated: bool  # the directory has more entries than the listing limit


def _raise_for(frame: Frame, expected: Msg | None = None) -> None:
    """Raise the agent's error reply as GuestError; any other type than ``expected`` is a protocol error."""
    if frame.type is Msg.ERROR:
        fields = decode_fields(frame.payload)
        raise GuestError(field_str(fields, Tag.MESSAGE, "guest error")[:1000], field_int(fields, Tag.ERRNO, 0))
    if expected is not None and frame.type is not expected:
        raise GuestProtocolError(f"{frame.type.name} where {expected.name} was expected")


def check_user(spec: str) -> None:
    """``user`` is a name or uid[:gid]; numeric ids must be real ones (0 to 2^32-2)."""
    for part in spec.split(":", 1):
        if _NUMERIC.fullmatch(part) and not 0 <= int(part) <= MAX_ID:
            raise InvalidRequest(f"user {spec!r}: uids and gids are 0-{MAX_ID}")


def _failure(task: asyncio.Task[None] | None) -> BaseException | None:
    """The exception a finished task raised, if any."""
    if task is None or not task.done() or task.cancelled():
        return None
    return task.exception()


class _Credit:
    """Exec stdin bytes the agent has room for (it grants more as the command reads)."""

    def __init__(self, initial: int) -> None:
        self.available = initial
        self.closed = False  # the command closed its stdin, or the channel went away
        self._event = asyncio.Event()

    def grant(self, n: int, *, closed: bool) -> None:
        self.available += n
        self.closed = self.closed or closed
        self._event.set()

    async def take(self, want: int) -> int:
        """Up to ``want`` bytes of credit (0 once closed); waits while there is none."""
        while self.available <= 0 and not self.closed:
            self._event.clear()
            await self._event.wait()
        if self.closed:
            return 0
        n = min(want, self.available)
        self.available -= n
        return n


def exec_payload(req: ExecRequest, extra: list[Field]) -> bytes:
    """An EXEC request's fields (``extra``: the mode: STDIN, PTY, DETACH), bounded as the agent takes them."""
    check_user(req.user)
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
    if req.log_bytes:
        fields.append((Tag.APPLOG, req.log_bytes))
    payload = encode_fields([*fields, *extra])
    if len(payload) > MAX_PAYLOAD or len(req.argv) > MAX_ARGS or len(req.env) > MAX_ARGS:
        raise InvalidRequest(
            f"the command line and environment must fit in {MAX_PAYLOAD // 1024} KiB and {MAX_ARGS} entries "
            "each: pass large input through stdin or a file ('ember cp')"
        )
    return payload


def identity_request(hostname: str, new_token: str, entropy: bytes, time_ns: int) -> tuple[Msg, list[Field]]:
    """After a restore: reseed the guest RNG, set its clock and hostname, rotate the token."""
    fields: list[Field] = [(Tag.ENTROPY, entropy), (Tag.TIME_NS, time_ns), (Tag.HOSTNAME, hostname)]
    return Msg.RESTORE, [*fields, (Tag.NEW_TOKEN, new_token)]


class AgentConnection:
    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout_s: float, limits: ChannelLimits
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._timeout = timeout_s
        self._limits = limits
        self._streams: dict[int, asyncio.Queue[Frame | None]] = {}
        self._credits: dict[int, _Credit] = {}
        self._ids = itertools.count(1)
        self._write_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._leftover = b""
        self.error: str | None = None
        self.tcp_open = 0  # TCP relays open now (ember.relay)
        self.tcp_credit: dict[int, int] = {}  # per relay stream: bytes the agent may still send (ember.relay)

    # ---- connection ------------------------------------------------------

    @classmethod
    async def open(cls, sock: Path, timeout_s: float, *, limits: ChannelLimits) -> AgentConnection:
        """Connect to the VM's agent socket without talking yet (QEMU may still be restoring)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(str(sock), limit=MAX_PAYLOAD * 2)
                return cls(reader, writer, timeout_s, limits)
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise AgentUnavailable(f"cannot reach the guest agent socket: {exc}") from None
                await asyncio.sleep(0.002)

    async def authenticate(
        self, token: str, timeout_s: float, then: tuple[Msg, list[Field]] | None = None, *, first_boot: bool = False
    ) -> None:
        """Prove the token, resynchronize the stream, start routing frames.

        ``then`` is a request pipelined right behind the HELLO (one round trip
        instead of two: it matters on a freshly restored TCG guest); an error
        reply to it raises GuestError. ``first_boot``: the agent was cold-booted
        and has no token yet; it is given ``token`` first (accepted only once).
        """
        stream = 0
        if then is not None:
            stream = next(self._ids)
            self._streams[stream] = asyncio.Queue()
        try:
            pipelined = then and encode_frame(then[0], stream, encode_fields(then[1]))
            await asyncio.wait_for(self._handshake(token, pipelined, first_boot=first_boot), timeout_s)
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
            _raise_for(await self._recv(stream), Msg.OK)
        finally:
            self._close(stream)

    @classmethod
    async def connect(
        cls, sock: Path, token: str, timeout_s: float, *, limits: ChannelLimits, first_boot: bool = False
    ) -> AgentConnection:
        """Connect and authenticate; ``first_boot`` for a cold-booted agent, which learns ``token`` here."""
        conn = await cls.open(sock, timeout_s, limits=limits)
        await conn.authenticate(token, timeout_s, first_boot=first_boot)
        return conn

    async def _handshake(self, token: str, pipelined: bytes | None = None, *, first_boot: bool) -> None:
        nonce = os.urandom(NONCE_LEN)
        self._writer.write(hello_frames(token, nonce, first_boot=first_boot))
        if pipelined:
            self._writer.write(pipelined)
        await self._writer.drain()
        accepted, refused = hello_answers(nonce)
        buf = b""
        skipped = 0
        while True:
            chunk = await self._reader.read(65536)
            if not chunk:
                raise AgentUnavailable("the guest agent closed the channel during the handshake")
            buf += chunk
            idx = buf.find(accepted)
            if idx >= 0:
                # frames that followed the ack belong to this session
                self._leftover = buf[idx + len(accepted) :]
                return
            if refused in buf:
                raise TokenRefused("the guest agent refused this VM's token")
            skipped += len(buf) - len(accepted)
            if skipped > RESYNC_LIMIT:
                raise AgentUnavailable("the guest agent channel is flooded with garbage")
            buf = buf[-len(accepted) :]

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
                if type_ is Msg.CREDIT:
                    self._grant(stream, payload)
                    continue
                queue = self._streams.get(stream)
                if queue is None:
                    continue  # a stream we gave up on (or one the guest made up)
                if type_ is Msg.TCP_RECV and stream in self.tcp_credit:
                    self.tcp_credit[stream] -= length  # granted before the agent could use it: never below 0
                    if self.tcp_credit[stream] < 0:
                        raise GuestProtocolError("a TCP relay sent beyond its credit")
                cost = len(payload) + FRAME_COST
                await self._limits.take(cost)  # a spent budget pauses this channel here
                if self._streams.get(stream) is not queue:
                    self._limits.release(cost)  # closed while we waited
                    continue
                queue.put_nowait(Frame(type_, stream, payload))
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            self.error = "the guest agent channel closed (VM stopped or crashed)"
        except GuestProtocolError as exc:
            self.error = str(exc)
        finally:
            for queue in self._streams.values():
                queue.put_nowait(None)
            for credit in self._credits.values():
                credit.grant(0, closed=True)
            self._writer.close()

    def _grant(self, stream: int, payload: bytes) -> None:
        fields = decode_fields(payload)
        credit = self._credits.get(stream)
        if credit is not None:
            credit.grant(field_int(fields, Tag.SIZE), closed=bool(field_int(fields, Tag.CLOSED, 0)))

    @property
    def closed(self) -> bool:
        return self._task is None or self._task.done()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        self._writer.close()
        for stream in list(self._streams):
            self._drain(stream)

    # ---- streams ---------------------------------------------------------

    def _open(self) -> int:
        if self.closed:
            raise AgentUnavailable(self.error or "not connected to the guest agent")
        stream = next(self._ids)
        self._streams[stream] = asyncio.Queue()
        return stream

    def _drain(self, stream: int) -> None:
        """Give back the budget of a stream's queued frames (a None stays: it wakes a waiting consumer)."""
        queue = self._streams.get(stream)
        while queue is not None and not queue.empty():
            frame = queue.get_nowait()
            if frame is None:
                queue.put_nowait(None)
                return
            self._limits.release(len(frame.payload) + FRAME_COST)

    def _close(self, stream: int) -> None:
        self._drain(stream)
        self._streams.pop(stream, None)
        self._credits.pop(stream, None)
        self.tcp_credit.pop(stream, None)

    def _cancel(self, stream: int) -> None:
        """Close a file or listing stream the caller gave up on, and tell the agent to stop it
        (synchronous: it also runs from finalizers; a whole frame is one buffered write)."""
        self._close(stream)
        if not self.closed and not self._writer.is_closing():
            self._writer.write(encode_frame(Msg.SIGNAL, stream, encode_fields([(Tag.SIGNAL, 9)])))

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
            queue.put_nowait(None)  # every later call of this stream sees the end too
            raise AgentUnavailable(self.error or "the guest agent channel closed")
        self._limits.release(len(frame.payload) + FRAME_COST)
        return frame

    async def request(self, type_: Msg, fields: list[Field], *, timeout: float | None = 0) -> Frame:
        """One request, one OK reply (raises the agent's error as GuestError); ``timeout`` as ``_recv``'s."""
        stream = self._open()
        try:
            await self._send(type_, stream, encode_fields(fields))
            frame = await self._recv(stream, timeout)
            _raise_for(frame, Msg.OK)
            return frame
        finally:
            self._close(stream)

    # ---- operations ------------------------------------------------------

    async def ping(self) -> None:
        await self.request(Msg.PING, [])

    async def sync(self) -> None:
        await self.request(Msg.SYNC, [])

    async def probe(self, port: int) -> None:
        """Connect to the guest's 127.0.0.1:``port`` (app hooks, HTTP, are ``ember.hooks``). Raises
        GuestError while nothing listens."""
        await self.request(Msg.PROBE, [(Tag.PORT, port)])

    async def idle_state(self, timeout_s: float) -> GuestIdleState:
        """Whether the guest holds itself awake or asks to be suspended now (``ember-idle``). Hostile: the
        answer is two flags in a small frame, or a protocol error."""
        stream = self._open()
        try:
            await self._send(Msg.IDLE_QUERY, stream)
            frame = await self._recv(stream, timeout_s)
            _raise_for(frame, Msg.IDLE_STATE)
            if len(frame.payload) > IDLE_STATE_MAX:
                raise GuestProtocolError(f"an idle state of {len(frame.payload)} bytes")
            fields = decode_fields(frame.payload)
            return GuestIdleState(
                hold=field_int(fields, Tag.HOLD, 0) != 0, suspend_now=field_int(fields, Tag.SUSPEND_NOW, 0) != 0
            )
        finally:
            self._close(stream)

    async def open_tcp(self, port: int, *, timeout_s: float) -> TcpStream:
        """A TCP connection to the guest's 127.0.0.1:``port``, relayed over this channel
        (:class:`ember.relay.TcpStream`)."""
        from ember.relay import TcpStream

        return await TcpStream.open(self, port, timeout_s=timeout_s)

    async def restore_identity(self, hostname: str, new_token: str, entropy: bytes, time_ns: int) -> None:
        await self.request(*identity_request(hostname, new_token, entropy, time_ns))

    async def exec(
        self, req: ExecRequest, stdin: AsyncIterator[bytes] | None = None
    ) -> AsyncIterator[tuple[str, bytes] | ExecResult]:
        """Run a command; yields ("stdout"|"stderr", bytes) then one ExecResult.

        ``stdin`` is pulled only once the command runs, and only as fast as the agent grants
        credit (what the command has read). If the command closes its stdin, the rest is
        not pulled. If ``stdin`` raises, the command is killed and the error is raised.
        """
        payload = exec_payload(req, [(Tag.STDIN, stdin is not None)])
        stream = self._open()
        feeder: asyncio.Task[None] | None = None
        running = False
        try:
            await self._send(Msg.EXEC, stream, payload)
            first = await self._recv(stream)
            _raise_for(first, Msg.STARTED)
            running = True
            if stdin is not None:
                started = decode_fields(first.payload)
                if Tag.SIZE not in started:
                    raise GuestProtocolError("exec started without stdin credit (an agent older than this daemon)")
                credit = self._credits[stream] = _Credit(field_int(started, Tag.SIZE))
                feeder = asyncio.create_task(self._feed_stdin(stream, stdin, credit))
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
                    failed = _failure(feeder)
                    if failed is not None:
                        raise failed  # stdin was not delivered: the feeder killed the command
                    yield ExecResult(
                        exit_code=code - (1 << 64) if code >= 1 << 63 else code,
                        signal=field_int(f, Tag.EXIT_SIGNAL, 0),
                        timed_out=bool(field_int(f, Tag.TIMED_OUT, 0)),
                    )
                    return
                else:
                    _raise_for(frame)
                    raise GuestProtocolError(f"{frame.type.name} during exec")
        finally:
            if feeder is not None:
                feeder.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await feeder
            if running and not self.closed:
                # the caller went away (client disconnected, Ctrl-C): stop the command
                with contextlib.suppress(AgentUnavailable):
                    await self._send(Msg.SIGNAL, stream, encode_fields([(Tag.SIGNAL, 9)]))
            self._close(stream)

    async def _feed_stdin(self, stream: int, stdin: AsyncIterator[bytes], credit: _Credit) -> None:
        """Send stdin within the agent's credit; never more, never silently less."""
        try:
            async for chunk in stdin:
                view = memoryview(chunk)
                while view:
                    n = await credit.take(min(len(view), CHUNK))
                    if n == 0:
                        return  # the command closed its stdin (or the channel is gone): stop pulling
                    await self._send(Msg.STDIN, stream, bytes(view[:n]))
                    view = view[n:]
            await self._send(Msg.STDIN_EOF, stream)
        except (asyncio.CancelledError, AgentUnavailable):
            raise
        except Exception:
            # partial stdin must not look complete: stop the command, the exec raises this error
            with contextlib.suppress(AgentUnavailable):
                await self._send(Msg.SIGNAL, stream, encode_fields([(Tag.SIGNAL, 9)]))
            raise

    async def read_log(self, start: int, limit: int, wait_s: float) -> LogChunk:
        """At most ``limit`` bytes of the app's log from offset ``start``; waits in the guest up to
        ``wait_s`` for output past it (ember.applog)."""
        stream = self._open()
        ended = False
        try:
            fields: list[Field] = [(Tag.LOG_FROM, start), (Tag.LIMIT, limit), (Tag.LOG_WAIT_MS, int(wait_s * 1000))]
            await self._send(Msg.LOGS, stream, encode_fields(fields))
            frame = await self._recv(stream, timeout=wait_s + self._timeout)
            ended = True
            _raise_for(frame, Msg.LOGDATA)
            return decode_chunk(frame.payload, asked=start, limit=limit)
        finally:
            if ended:
                self._close(stream)
            else:
                self._cancel(stream)  # the reader went away while the agent waits: free its wait

    async def write_file(
        self, path: str, data: AsyncIterator[bytes], mode: int = 0o644, mkdirs: bool = False, *, owner: str = ""
    ) -> int:
        """``owner`` (a user name or uid[:gid]; "": root) gets the file and the directories ``mkdirs`` makes."""
        check_user(owner)
        stream = self._open()
        try:
            fields: list[Field] = [(Tag.PATH, path), (Tag.MODE, mode), (Tag.MKDIRS, mkdirs)]
            if owner:
                fields.append((Tag.USER, owner))
            await self._send(Msg.WRITE, stream, encode_fields(fields))
            _raise_for(await self._recv(stream), Msg.OK)
            async for chunk in data:
                for i in range(0, len(chunk), CHUNK):
                    await self._send(Msg.WDATA, stream, chunk[i : i + CHUNK])
                # a write error arrives early; stop sending as soon as it does
                if not self._streams[stream].empty():
                    _raise_for(await self._recv(stream))
                    raise GuestProtocolError("a reply before the end of a file write")
            await self._send(Msg.WEOF, stream)
            done = await self._recv(stream, timeout=max(self._timeout, 300))  # fsync of a large file
            _raise_for(done, Msg.OK)
            return field_int(decode_fields(done.payload), Tag.SIZE, 0)
        finally:
            self._close(stream)

    async def read_file(self, path: str) -> tuple[int, AsyncIterator[bytes]]:
        """Open a guest file; returns its size and an iterator over its bytes. An iterator
        that is dropped unfinished (never started, or abandoned) closes its stream."""
        stream = self._open()
        try:
            await self._send(Msg.READ, stream, encode_fields([(Tag.PATH, path)]))
            first = await self._recv(stream)
            _raise_for(first, Msg.OK)
            size = field_int(decode_fields(first.payload), Tag.SIZE)
        except BaseException:
            self._close(stream)
            raise
        return size, FileChunks(self, stream)

    async def list_dir(self, path: str) -> Listing:
        """At most ``ls_max_entries`` entries; ``truncated`` says the directory has more."""
        limit = self._limits.ls_max_entries
        stream = self._open()
        ended = False  # the agent ended the stream (REOF or an error)
        try:
            await self._send(Msg.LIST, stream, encode_fields([(Tag.PATH, path), (Tag.LIMIT, limit)]))
            entries: list[DirEntry] = []
            while True:
                frame = await self._recv(stream)
                ended = frame.type in (Msg.REOF, Msg.ERROR)
                _raise_for(frame)
                if frame.type is Msg.REOF:
                    truncated = bool(field_int(decode_fields(frame.payload), Tag.TRUNCATED, 0))
                    return Listing(entries=entries, truncated=truncated)
                if frame.type is not Msg.RDATA:
                    raise GuestProtocolError(f"{frame.type.name} in a directory listing")
                for entry in decode_entries(frame.payload):  # counted as decoded: entry limit + 1 is refused
                    if len(entries) == limit:
                        raise GuestProtocolError(f"a listing over the limit of {limit} entries")
                    entries.append(entry)
        finally:
            if ended:
                self._close(stream)
            else:
                self._cancel(stream)


class FileChunks:
    """The bytes of a guest file as they arrive; closing (or dropping) it closes the stream."""

    def __init__(self, conn: AgentConnection, stream: int) -> None:
        self._conn = conn
        self._stream = stream
        self._open = True

    def __aiter__(self) -> FileChunks:
        return self

    async def __anext__(self) -> bytes:
        if not self._open:
            raise StopAsyncIteration
        try:
            frame = await self._conn._recv(self._stream)
        except BaseException:
            self.close()
            raise
        if frame.type is Msg.RDATA:
            return frame.payload
        self._open = False  # REOF or an error ended the agent's side too
        self._conn._close(self._stream)
        if frame.type is Msg.REOF:
            raise StopAsyncIteration
        _raise_for(frame)
        raise GuestProtocolError(f"{frame.type.name} while reading a file")

    def close(self) -> None:
        """Stop reading: the agent stops sending and queued frames are given back."""
        if self._open:
            self._open = False
            self._conn._cancel(self._stream)

    async def aclose(self) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()
