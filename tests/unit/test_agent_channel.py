"""The host side of the agent channel against a fake, hostile agent on a Unix socket."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import os
import struct
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from ember import hooks
from ember.agent import FRAME_COST, AgentConnection, ByteBudget, ChannelLimits, ExecRequest, ExecResult
from ember.config import Settings
from ember.errors import AgentUnavailable, GuestError, GuestProtocolError, InvalidRequest
from ember.guest.protocol import (
    ACK_MAGIC,
    HEADER,
    MAX_PAYLOAD,
    NAK_MAGIC,
    Frame,
    Msg,
    Tag,
    decode_fields,
    encode_fields,
    encode_frame,
    field_int,
)

MiB = 1024 * 1024
TOKEN = "0123456789abcdef" * 2  # as the daemon makes them: 32 hex digits
Handler = Callable[["FakeAgent", Frame, asyncio.StreamWriter], Awaitable[None]]


class FakeAgent:
    """Answers the handshake, then hands every host frame to ``handler``; records what it got."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.frames: list[Frame] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.writers: list[asyncio.StreamWriter] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        try:
            while True:
                length, stream, type_ = HEADER.unpack(await reader.readexactly(HEADER.size))
                frame = Frame(Msg(type_), stream, await reader.readexactly(length))
                self.frames.append(frame)
                if frame.type is Msg.HELLO:
                    nonce = decode_fields(frame.payload)[Tag.NONCE][0]
                    writer.write(encode_frame(Msg.HELLO_ACK, 0, ACK_MAGIC + nonce))
                    await writer.drain()
                else:
                    await self.handler(self, frame, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass

    def spawn(self, work: Awaitable[None]) -> None:
        """Send on its own while the agent keeps answering (a flood beside the replies)."""

        async def run() -> None:
            with contextlib.suppress(ConnectionError):
                await work

        task = asyncio.ensure_future(run())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


def limits(vm: int = 2 * MiB, daemon: ByteBudget | None = None, ls_max: int = 1000) -> ChannelLimits:
    daemon = daemon or ByteBudget(64 * MiB, "daemon")
    return ChannelLimits(vm=ByteBudget(vm, "vm"), daemon=daemon, reserved=0, ls_max_entries=ls_max)


Agents = Callable[..., Awaitable[tuple[AgentConnection, FakeAgent]]]


@pytest.fixture
async def agents(tmp_path: Path) -> AsyncIterator[Agents]:
    """Connect an AgentConnection to a new fake agent: ``await agents(handler, limits)``."""
    made: list[tuple[AgentConnection, FakeAgent, asyncio.Server]] = []

    async def connect(handler: Handler, lim: ChannelLimits | None = None) -> tuple[AgentConnection, FakeAgent]:
        fake = FakeAgent(handler)
        server = await asyncio.start_unix_server(fake.serve, str(tmp_path / f"agent-{len(made)}.sock"))
        conn = await AgentConnection.connect(tmp_path / f"agent-{len(made)}.sock", TOKEN, 2.0, limits=lim or limits())
        made.append((conn, fake, server))
        return conn, fake

    yield connect
    for conn, fake, server in made:
        await conn.close()
        server.close()
        for task in list(fake.tasks):
            task.cancel()
        for writer in fake.writers:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        await server.wait_closed()


def ok(stream: int, fields: list[tuple[Tag, int]] | None = None) -> bytes:
    return encode_frame(Msg.OK, stream, encode_fields(fields or []))


async def send(writer: asyncio.StreamWriter, *frames: bytes) -> None:
    for f in frames:
        writer.write(f)
    await writer.drain()


# ---- L1: malformed replies are GuestProtocolError (HTTP 503), never a 500 ---------------------------

BAD_REPLIES: dict[str, Callable[[int], bytes]] = {
    "wrong type": lambda s: encode_frame(Msg.STDOUT, s, b"hi"),
    "error with truncated fields": lambda s: encode_frame(Msg.ERROR, s, b"\x12\xff\xff"),
    "error with unknown tag": lambda s: encode_frame(Msg.ERROR, s, b"\xee" + struct.pack("<I", 0)),
    "ok with a bad integer": lambda s: encode_frame(Msg.OK, s, bytes([Tag.EXIT_CODE]) + struct.pack("<I", 3) + b"abc"),
}


@pytest.mark.parametrize("bad", sorted(BAD_REPLIES))
async def test_malformed_guest_replies_become_503_not_500(agents: Agents, bad: str) -> None:
    async def handler(fake: FakeAgent, frame: Frame, writer: asyncio.StreamWriter) -> None:
        if frame.type in (Msg.PROBE, Msg.HOOK):
            await send(writer, BAD_REPLIES[bad](frame.stream))
        elif frame.type is Msg.PING:
            await send(writer, ok(frame.stream))
        elif frame.type is Msg.EXEC:
            await send(writer, encode_frame(Msg.STARTED, frame.stream, encode_fields([(Tag.PID, 7)])),
                       encode_frame(Msg.EXIT, frame.stream, encode_fields([(Tag.EXIT_SIGNAL, 0)])))  # fmt: skip
        elif frame.type is Msg.READ:
            await send(writer, encode_frame(Msg.RDATA, frame.stream, b"data before the OK"))
        elif frame.type is Msg.LIST:
            entry = struct.pack("<I", 99) + struct.pack("<IQq", 0, 0, 0) + b"ab"  # name runs past the frame
            await send(writer, encode_frame(Msg.RDATA, frame.stream, entry), encode_frame(Msg.REOF, frame.stream))

    conn, _ = await agents(handler)
    try:
        calls: list[Callable[[], Awaitable[object]]] = [
            lambda: hooks.request(conn, hooks.Hook.READY, 80, 5),
            lambda: _drain(conn.exec(ExecRequest(["true"]))),
            lambda: conn.read_file("/etc/hostname"),
            lambda: conn.list_dir("/"),
        ]
        for call in calls:
            with pytest.raises(GuestError) as err:
                await call()
            assert err.value.http_status == 503, err.value
            assert isinstance(err.value, GuestProtocolError), err.value
        await asyncio.wait_for(conn.ping(), 2)  # the channel itself is still in step
    finally:
        await conn.close()


async def _drain(events: AsyncIterator[object]) -> None:
    async for _ in events:
        pass


async def test_garbage_on_the_channel_closes_it_with_503(agents: Agents) -> None:
    async def handler(fake: FakeAgent, frame: Frame, writer: asyncio.StreamWriter) -> None:
        await send(writer, HEADER.pack(0, frame.stream, 200))  # an unknown frame type

    conn, _ = await agents(handler)
    try:
        with pytest.raises(AgentUnavailable) as err:
            await conn.ping()
        assert err.value.http_status == 503 and "malformed" in str(err.value)
    finally:
        await conn.close()


async def test_nul_and_out_of_range_ids_are_refused_before_anything_is_sent(agents: Agents) -> None:
    async def handler(fake: FakeAgent, frame: Frame, writer: asyncio.StreamWriter) -> None:
        raise AssertionError(f"nothing may reach the agent, got {frame.type.name}")

    conn, fake = await agents(handler)
    try:
        for req in (
            ExecRequest(["echo", "a\x00b"]),
            ExecRequest(["env"], env=["K=a\x00b"]),
            ExecRequest(["pwd"], cwd="/tmp\x00x"),
            ExecRequest(["id"], user="4294967296"),
            ExecRequest(["id"], user="4294967295"),
            ExecRequest(["id"], user="-1"),
            ExecRequest(["id"], user="nobody:4294967296"),
        ):
            with pytest.raises(InvalidRequest) as err:
                await _drain(conn.exec(req))
            assert err.value.http_status == 400
        assert [f.type for f in fake.frames] == [Msg.HELLO]
    finally:
        await conn.close()


# ---- L7: a file iterator dropped unfinished does not stall the channel ------------------------------


@pytest.mark.parametrize("how", ["never started", "abandoned"])
async def test_unconsumed_stream_does_not_stall_the_channel(agents: Agents, how: str) -> None:
    async def flood(writer: asyncio.StreamWriter, stream: int) -> None:
        for _ in range(64):  # 16 MiB, 8 times the VM budget
            await send(writer, encode_frame(Msg.RDATA, stream, b"x" * MAX_PAYLOAD))

    async def handler(fake: FakeAgent, frame: Frame, writer: asyncio.StreamWriter) -> None:
        if frame.type is Msg.READ:
            await send(writer, ok(frame.stream, [(Tag.SIZE, 64 * MAX_PAYLOAD)]))
            fake.spawn(flood(writer, frame.stream))
        elif frame.type is Msg.PING:
            await send(writer, ok(frame.stream))

    lim = limits()
    conn, agent = await agents(handler, lim)
    try:
        _, chunks = await conn.read_file("/big")
        if how == "abandoned":
            assert len(await anext(chunks)) == MAX_PAYLOAD
        del chunks  # the HTTP client went away: nobody will read this stream again
        gc.collect()
        await asyncio.wait_for(conn.ping(), 5)
        assert lim.vm.used == 0
        cancels = [f for f in agent.frames if f.type is Msg.SIGNAL]
        assert len(cancels) == 1, "the agent was not told to stop sending the file"
    finally:
        await conn.close()


# ---- M5: budgets ------------------------------------------------------------------------------------


async def test_per_vm_and_daemon_budgets_bound_a_flooding_guest(agents: Agents) -> None:
    sent: dict[int, int] = {}
    data = os.urandom(MAX_PAYLOAD)

    async def handler(fake: FakeAgent, frame: Frame, writer: asyncio.StreamWriter) -> None:
        if frame.type is Msg.EXEC:
            await send(writer, encode_frame(Msg.STARTED, frame.stream, encode_fields([(Tag.PID, 7)])))

            async def flood() -> None:
                for _ in range(40):  # 10 MiB of output, nobody reading
                    await send(writer, encode_frame(Msg.STDOUT, frame.stream, data))
                    sent[id(writer)] = sent.get(id(writer), 0) + len(data)
                await send(writer, encode_frame(Msg.EXIT, frame.stream, encode_fields([(Tag.EXIT_CODE, 0)])))

            fake.spawn(flood())

    daemon = ByteBudget(3 * MiB, "daemon")
    vms = []
    for _ in range(2):
        lim = limits(vm=2 * MiB, daemon=daemon)
        conn, _ = await agents(handler, lim)
        vms.append((conn, lim, conn.exec(ExecRequest(["yes"]))))
        await anext(vms[-1][2])  # started: the first frame is consumed, the rest floods in
    try:
        await asyncio.sleep(1.0)
        for _, lim, _ in vms:
            assert lim.vm.used <= 2 * MiB
        assert daemon.used <= 3 * MiB
        assert daemon.used <= sum(lim.vm.used for _, lim, _ in vms)  # a VM waiting for the daemon holds its own
        assert sum(sent.values()) < 10 * MiB, "the daemon kept reading past its budgets"
        # back-pressure, not loss: every byte still arrives once the consumers read
        for _conn, lim, events in vms:
            got = MAX_PAYLOAD
            async for item in events:
                if isinstance(item, ExecResult):
                    break
                assert item[1] == data
                got += len(item[1])
            assert got == 40 * MAX_PAYLOAD
            assert lim.vm.used == 0
        assert daemon.used == 0
    finally:
        for conn, _, _ in vms:
            await conn.close()


async def test_other_vms_spending_the_daemon_budget_cannot_pause_a_vm(agents: Agents, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, agent_vm_buffer_bytes=2 * MiB, agent_daemon_buffer_bytes=2 * MiB)
    frame = MAX_PAYLOAD + FRAME_COST

    async def handler(fake: FakeAgent, got: Frame, writer: asyncio.StreamWriter) -> None:
        if got.type is Msg.PING:
            await send(writer, ok(got.stream))
        elif got.type is Msg.EXEC:
            await send(writer, encode_frame(Msg.STARTED, got.stream, encode_fields([(Tag.PID, 7)])))

            async def flood() -> None:  # 10 MiB of output into a client that does not read
                for _ in range(40):
                    await send(writer, encode_frame(Msg.STDOUT, got.stream, b"x" * MAX_PAYLOAD))
                await send(writer, encode_frame(Msg.EXIT, got.stream, encode_fields([(Tag.EXIT_CODE, 0)])))

            fake.spawn(flood())

    floods = []
    for _ in range(3):
        conn, _ = await agents(handler, ChannelLimits.of(settings))
        events = conn.exec(ExecRequest(["yes"]))
        floods.append((conn._limits, events, asyncio.ensure_future(anext(events))))  # one output frame is taken
    daemon = floods[0][0].daemon
    try:
        async with asyncio.timeout(5):
            while daemon.used + frame <= daemon.limit:  # the floods spend the daemon budget
                await asyncio.sleep(0.01)
        victim, _ = await agents(handler, ChannelLimits.of(settings))
        await asyncio.wait_for(victim.ping(), 3)  # its small reply is not held up by the daemon budget
        held = sum(lim.vm.used for lim, _, _ in floods)  # with the frame a paused channel has read
        assert daemon.used <= daemon.limit and held <= daemon.limit + 3 * (settings.agent_vm_reserved_bytes + frame)
        for lim, events, first in floods:  # back-pressure, not loss; every byte is given back
            got = [await first, *[item async for item in events]]
            assert len(got) == 41 and isinstance(got[-1], ExecResult) and lim.vm.used == 0
        assert daemon.used == 0
    finally:
        for _, events, first in floods:
            first.cancel()
            with contextlib.suppress(BaseException):
                await first
            await events.aclose()  # type: ignore[attr-defined]


def test_budgets_below_one_frame_are_a_setup_error() -> None:
    with pytest.raises(Exception, match="at least"):
        ByteBudget(MAX_PAYLOAD, "EMBER_AGENT_VM_BUFFER_BYTES")
    assert ByteBudget(MAX_PAYLOAD + FRAME_COST, "x").limit == MAX_PAYLOAD + FRAME_COST


# ---- M4: stdin credit --------------------------------------------------------------------------------


async def test_stdin_never_exceeds_credit_and_arrives_whole(agents: Agents) -> None:
    window = 100_000
    received = bytearray()
    granted = window

    async def handler(fake: FakeAgent, frame: Frame, writer: asyncio.StreamWriter) -> None:
        nonlocal granted
        if frame.type is Msg.EXEC:
            assert field_int(decode_fields(frame.payload), Tag.STDIN) == 1
            await send(
                writer, encode_frame(Msg.STARTED, frame.stream, encode_fields([(Tag.PID, 7), (Tag.SIZE, window)]))
            )
        elif frame.type is Msg.STDIN:
            received.extend(frame.payload)
            assert len(received) <= granted, "the host sent stdin beyond its credit"
            await asyncio.sleep(0.001)  # a slow reader
            granted += len(frame.payload)
            await send(writer, encode_frame(Msg.CREDIT, frame.stream, encode_fields([(Tag.SIZE, len(frame.payload))])))
        elif frame.type is Msg.STDIN_EOF:
            digest = hashlib.sha256(received).hexdigest().encode()
            await send(writer, encode_frame(Msg.STDOUT, frame.stream, digest),
                       encode_frame(Msg.EXIT, frame.stream, encode_fields([(Tag.EXIT_CODE, 0)])))  # fmt: skip

    payload = os.urandom(3 * MiB + 17)

    async def stdin() -> AsyncIterator[bytes]:
        for i in range(0, len(payload), 1 << 20):
            yield payload[i : i + (1 << 20)]

    conn, _ = await agents(handler)
    try:
        out = [item async for item in conn.exec(ExecRequest(["sha256sum"]), stdin())]
        assert out[0] == ("stdout", hashlib.sha256(payload).hexdigest().encode())
        assert bytes(received) == payload
    finally:
        await conn.close()


async def test_stdin_stops_when_the_command_closes_it_and_fails_loudly_when_input_breaks(agents: Agents) -> None:
    async def handler(fake: FakeAgent, frame: Frame, writer: asyncio.StreamWriter) -> None:
        if frame.type is Msg.EXEC:
            await send(writer, encode_frame(Msg.STARTED, frame.stream, encode_fields([(Tag.PID, 7), (Tag.SIZE, 1000)])))
        elif frame.type is Msg.STDIN:
            await send(writer, encode_frame(Msg.CREDIT, frame.stream, encode_fields([(Tag.SIZE, 0), (Tag.CLOSED, 1)])))
            await asyncio.sleep(0.2)
            await send(writer, encode_frame(Msg.EXIT, frame.stream, encode_fields([(Tag.EXIT_CODE, 0)])))
        elif frame.type is Msg.SIGNAL:
            await send(
                writer, encode_frame(Msg.EXIT, frame.stream, encode_fields([(Tag.EXIT_CODE, 0), (Tag.EXIT_SIGNAL, 9)]))
            )

    pulled = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal pulled
        while True:
            pulled += 1
            yield b"y" * 500

    async def broken() -> AsyncIterator[bytes]:
        yield b"partial"
        raise InvalidRequest("the stdin upload broke off")

    conn, fake = await agents(handler)
    try:
        out = [item async for item in conn.exec(ExecRequest(["head", "-c1"]), endless())]
        assert isinstance(out[-1], ExecResult) and out[-1].exit_code == 0
        assert pulled <= 3, "the host kept pulling stdin after the command closed it"
        with pytest.raises(InvalidRequest, match="broke off"):
            await _drain(conn.exec(ExecRequest(["cat"]), broken()))
        assert Msg.SIGNAL in [f.type for f in fake.frames], "partial stdin must kill the command"
        assert Msg.STDIN_EOF not in [f.type for f in fake.frames], "partial stdin must never look complete"
    finally:
        await conn.close()


async def test_exec_without_stdin_credit_is_a_protocol_error(agents: Agents) -> None:
    async def handler(fake: FakeAgent, frame: Frame, writer: asyncio.StreamWriter) -> None:
        if frame.type is Msg.EXEC:
            await send(writer, encode_frame(Msg.STARTED, frame.stream, encode_fields([(Tag.PID, 7)])))

    async def stdin() -> AsyncIterator[bytes]:
        yield b"x"

    conn, _ = await agents(handler)
    try:
        with pytest.raises(GuestProtocolError, match="credit"):
            await _drain(conn.exec(ExecRequest(["cat"]), stdin()))
    finally:
        await conn.close()


# ---- M5: listings are bounded and say when they are truncated --------------------------------------


def entries(n: int) -> bytes:
    return b"".join(struct.pack("<I", 5) + struct.pack("<IQq", 0o100644, 1, 0) + b"f%04d" % i for i in range(n))


@pytest.mark.parametrize(("sent", "truncated"), [(10, False), (10, True)])
async def test_listing_limit_is_sent_and_truncation_reported(agents: Agents, sent: int, truncated: bool) -> None:
    async def handler(fake: FakeAgent, frame: Frame, writer: asyncio.StreamWriter) -> None:
        assert field_int(decode_fields(frame.payload), Tag.LIMIT) == 10
        await send(writer, encode_frame(Msg.RDATA, frame.stream, entries(sent)),
                   encode_frame(Msg.REOF, frame.stream, encode_fields([(Tag.TRUNCATED, truncated)])))  # fmt: skip

    conn, _ = await agents(handler, limits(ls_max=10))
    try:
        listing = await conn.list_dir("/d")
        assert len(listing.entries) == sent and listing.truncated is truncated
    finally:
        await conn.close()


async def test_listing_over_the_limit_is_a_protocol_error(agents: Agents) -> None:
    async def handler(fake: FakeAgent, frame: Frame, writer: asyncio.StreamWriter) -> None:
        await send(writer, encode_frame(Msg.RDATA, frame.stream, entries(11)), encode_frame(Msg.REOF, frame.stream))

    conn, _ = await agents(handler, limits(ls_max=10))
    try:
        with pytest.raises(GuestProtocolError, match="limit"):
            await conn.list_dir("/d")
    finally:
        await conn.close()


@pytest.mark.parametrize("name", [b"", b"a"])
async def test_listing_of_tiny_records_is_refused_at_the_limit_with_bounded_memory(agents: Agents, name: bytes) -> None:
    limit = 50_000  # the default EMBER_LS_MAX_ENTRIES
    record = struct.pack("<I", len(name)) + struct.pack("<IQq", 0o100644, 0, 0) + name
    frame = record * (MAX_PAYLOAD // len(record))

    async def handler(fake: FakeAgent, got: Frame, writer: asyncio.StreamWriter) -> None:
        async def flood() -> None:  # ~14 MB of records: over 500 000 entries of 24 or 25 bytes
            for _ in range(limit * (24 + 255) // len(frame)):
                await send(writer, encode_frame(Msg.RDATA, got.stream, frame))
            await send(writer, encode_frame(Msg.REOF, got.stream))

        fake.spawn(flood())

    conn, _ = await agents(handler, limits(ls_max=limit))
    tracemalloc.start()
    try:
        with pytest.raises(GuestProtocolError):
            await conn.list_dir("/d")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        await conn.close()
    assert peak < 24 * MiB, f"decoding a hostile listing took {peak / MiB:.0f} MiB"


# ---- review test 13: the handshake resynchronizes past stale acks, and a flood of garbage is capped ---------


async def _handshake_against(
    tmp_path: Path, before_ack: Callable[[bytes], bytes], *, ack: bool = True, first_boot: bool = False
) -> list[Frame]:
    """Authenticate against an agent that sends ``before_ack(nonce)`` ahead of the right HELLO_ACK
    (with ``ack``); returns the frames the host sent up to its HELLO."""
    writers: list[asyncio.StreamWriter] = []
    sent: list[Frame] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        while not sent or sent[-1].type is not Msg.HELLO:
            length, stream, type_ = HEADER.unpack(await reader.readexactly(HEADER.size))
            sent.append(Frame(Msg(type_), stream, await reader.readexactly(length)))
        nonce = decode_fields(sent[-1].payload)[Tag.NONCE][0]
        with contextlib.suppress(ConnectionError):
            writer.write(before_ack(nonce) + (encode_frame(Msg.HELLO_ACK, 0, ACK_MAGIC + nonce) if ack else b""))
            await writer.drain()

    sock = tmp_path / "hs.sock"
    server = await asyncio.start_unix_server(serve, str(sock))
    try:
        conn = await AgentConnection.connect(sock, TOKEN, 5.0, limits=limits(), first_boot=first_boot)
        assert not conn.closed
        await conn.close()
        return sent
    finally:
        for writer in writers:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        server.close()
        await server.wait_closed()


async def test_handshake_skips_stale_ack_and_caps_garbage(tmp_path: Path) -> None:
    stale = encode_frame(Msg.HELLO_ACK, 0, ACK_MAGIC + os.urandom(16))  # a previous daemon's session
    await _handshake_against(tmp_path, lambda nonce: stale + b"\x00garbage" * 1000)
    with pytest.raises(AgentUnavailable, match="flooded with garbage"):
        await _handshake_against(tmp_path, lambda nonce: os.urandom(9 * MiB))


# ---- L4: the token reaches a cold-booted agent over the channel, never on a command line -------------


@pytest.mark.parametrize("first_boot", [True, False])
async def test_only_a_first_boot_connection_hands_the_agent_its_token(tmp_path: Path, first_boot: bool) -> None:
    sent = await _handshake_against(tmp_path, lambda nonce: b"", first_boot=first_boot)
    hello = decode_fields(sent[-1].payload)[Tag.TOKEN]
    assert hello == [TOKEN.encode()]
    if first_boot:  # SET_TOKEN with the same token, ahead of the HELLO that proves it
        assert [f.type for f in sent] == [Msg.SET_TOKEN, Msg.HELLO]
        assert decode_fields(sent[0].payload) == {Tag.TOKEN: [TOKEN.encode()]}
    else:  # restores and recovery only prove the token the agent already has
        assert [f.type for f in sent] == [Msg.HELLO]


async def test_a_refused_token_fails_at_once_and_a_stale_refusal_is_skipped(tmp_path: Path) -> None:
    def nak(nonce: bytes) -> bytes:
        return encode_frame(Msg.HELLO_NAK, 0, NAK_MAGIC + nonce)

    started = time.monotonic()
    with pytest.raises(AgentUnavailable, match="refused this VM's token"):
        await _handshake_against(tmp_path, nak, ack=False)
    assert time.monotonic() - started < 2, "a refusal must not wait for the handshake timeout"
    # another session's refusal (another nonce) is not this one's answer
    await _handshake_against(tmp_path, lambda nonce: nak(os.urandom(16)))
