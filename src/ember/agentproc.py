"""Interactive and background processes over the agent channel (host side; the wire is
:mod:`ember.guest.protocol`): a command on a pseudo-terminal (:class:`PtySession`), and
commands started in the background, listed and signalled.

These speak the channel's stream primitives of :class:`~ember.agent.AgentConnection`
(one package: the channel's internals are shared, not public). Every reply is hostile:
a background list is at most ``MAX_PROCS`` entries, each field checked.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from ember.agent import CHUNK, AgentConnection, ExecRequest, ExecResult, _Credit, _raise_for, exec_payload
from ember.errors import AgentUnavailable, GuestProtocolError, InvalidRequest
from ember.guest.protocol import MAX_PROCS, PTY_MAX_DIM, Msg, Tag, decode_fields, encode_fields, field_int, field_str

SIGKILL = 9


@dataclass(frozen=True)
class TermSize:
    rows: int
    cols: int

    def __post_init__(self) -> None:
        if not (1 <= self.rows <= PTY_MAX_DIM and 1 <= self.cols <= PTY_MAX_DIM):
            raise InvalidRequest(f"a terminal has 1-{PTY_MAX_DIM} rows and columns (got {self.rows}x{self.cols})")

    def fields(self) -> list[tuple[Tag, int]]:
        return [(Tag.ROWS, self.rows), (Tag.COLS, self.cols)]


@dataclass(frozen=True)
class GuestProcess:
    """A background process the agent tracks."""

    pid: int
    command: str  # its command line (arguments joined by spaces, at most 255 bytes)
    started_ns: int  # guest wall clock, nanoseconds since the epoch
    running: bool
    exit_code: int | None  # None while it runs; -1 when a signal ended it
    signal: int | None


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


class PtySession:
    """A command on a pseudo-terminal in the guest: its output as it comes, its input within the
    agent's credit (a command that does not read stops :meth:`write`, and so its sender)."""

    def __init__(self, conn: AgentConnection, stream: int, pid: int, credit: _Credit) -> None:
        self._conn = conn
        self._stream = stream
        self._credit = credit
        self.pid = pid
        self.result: ExecResult | None = None  # set once the command exited

    async def read(self) -> bytes | ExecResult:
        """The next output bytes, or the exit status (after which the session is over)."""
        if self.result is not None:
            return self.result
        frame = await self._conn._recv(self._stream, timeout=None)
        if frame.type is Msg.STDOUT:
            return frame.payload
        if frame.type is Msg.EXIT:
            f = decode_fields(frame.payload)
            self.result = ExecResult(
                exit_code=_signed(field_int(f, Tag.EXIT_CODE)),
                signal=field_int(f, Tag.EXIT_SIGNAL, 0),
                timed_out=bool(field_int(f, Tag.TIMED_OUT, 0)),
            )
            self._conn._close(self._stream)
            return self.result
        _raise_for(frame)  # the agent's error (stdin beyond credit...)
        raise GuestProtocolError(f"{frame.type.name} on a terminal")

    async def write(self, data: bytes) -> None:
        """Type ``data`` into the terminal; waits for credit. Once the terminal is gone the rest is dropped
        (as a closed terminal would)."""
        view = memoryview(data)
        while view:
            n = await self._credit.take(min(len(view), CHUNK))
            if n == 0:
                return
            await self._conn._send(Msg.STDIN, self._stream, bytes(view[:n]))
            view = view[n:]

    async def resize(self, size: TermSize) -> None:
        if self.result is None:
            await self._conn._send(Msg.RESIZE, self._stream, encode_fields(size.fields()))

    async def close(self) -> None:
        """Kill the command's process group if it still runs, and give the stream back."""
        if self.result is None and not self._conn.closed:
            with contextlib.suppress(AgentUnavailable):
                await self._conn._send(Msg.SIGNAL, self._stream, encode_fields([(Tag.SIGNAL, SIGKILL)]))
        self._conn._close(self._stream)


async def open_pty(conn: AgentConnection, req: ExecRequest, size: TermSize) -> PtySession:
    """Start ``req`` on a new terminal of ``size`` (no ``argv``: the user's login shell, else /bin/sh)."""
    payload = exec_payload(req, [(Tag.PTY, True), *size.fields()])
    stream = conn._open()
    try:
        await conn._send(Msg.EXEC, stream, payload)
        first = await conn._recv(stream)
        _raise_for(first, Msg.STARTED)
        started = decode_fields(first.payload)
        credit = conn._credits[stream] = _Credit(field_int(started, Tag.SIZE))
        return PtySession(conn, stream, field_int(started, Tag.PID), credit)
    except BaseException:
        conn._close(stream)
        raise


async def start_detached(conn: AgentConnection, req: ExecRequest) -> int:
    """Start ``req`` in the background (stdio on /dev/null); its pid."""
    payload = exec_payload(req, [(Tag.DETACH, True)])
    stream = conn._open()
    try:
        await conn._send(Msg.EXEC, stream, payload)
        reply = await conn._recv(stream)
        _raise_for(reply, Msg.STARTED)
        return field_int(decode_fields(reply.payload), Tag.PID)
    finally:
        conn._close(stream)


def _process(payload: bytes) -> GuestProcess:
    f = decode_fields(payload)
    running = bool(field_int(f, Tag.RUNNING))
    return GuestProcess(
        pid=field_int(f, Tag.PID),
        command=field_str(f, Tag.ARG)[:256],
        started_ns=field_int(f, Tag.TIME_NS),
        running=running,
        exit_code=None if running else _signed(field_int(f, Tag.EXIT_CODE)),
        signal=None if running else field_int(f, Tag.EXIT_SIGNAL, 0),
    )


async def list_processes(conn: AgentConnection) -> list[GuestProcess]:
    """The background processes the agent tracks (at most MAX_PROCS), oldest first."""
    stream = conn._open()
    try:
        await conn._send(Msg.PS, stream)
        found: list[GuestProcess] = []
        while True:
            frame = await conn._recv(stream)
            if frame.type is not Msg.PROC:
                _raise_for(frame, Msg.OK)
                return sorted(found, key=lambda p: (p.started_ns, p.pid))
            if len(found) == MAX_PROCS:
                raise GuestProtocolError(f"over {MAX_PROCS} background processes listed")
            found.append(_process(frame.payload))
    finally:
        conn._close(stream)


async def kill_process(conn: AgentConnection, pid: int, signal: int) -> None:
    """Signal a running background process (the agent refuses any other pid: GuestError)."""
    await conn.request(Msg.KILL, [(Tag.PID, pid), (Tag.SIGNAL, signal)])
