"""The app log: the guest's ring (agent.c, compiled here) and the host's checks of its replies (ember.applog)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import random
import shutil
import subprocess
from importlib import resources
from pathlib import Path

import pytest

from ember import applog
from ember.applog import LogChunk, decode_chunk
from ember.errors import Conflict, GuestProtocolError
from ember.guest.protocol import Tag, encode_fields

HARNESS = r"""
#define main agent_main
#include AGENT
#undef main
/* stdin: "P <hex>" puts bytes; "G <from> <max>" prints "<from'> <hex>" */
int main(void) {
    static unsigned char data[1 << 20], out[1 << 20];
    struct ring r = {0};
    char op;
    unsigned long long cap;
    if (scanf(" C %llu", &cap) != 1) return 2;
    r.cap = cap; r.buf = malloc(cap);
    while (scanf(" %c", &op) == 1) {
        if (op == 'P') {
            size_t n = 0; unsigned int b;
            while (scanf("%2x", &b) == 1) data[n++] = (unsigned char)b;
            ring_put(&r, data, n);
        } else if (op == 'G') {
            unsigned long long from, max;
            if (scanf(" %llu %llu", &from, &max) != 2) return 2;
            uint64_t f = from;
            size_t n = ring_get(&r, &f, out, (size_t)max);
            printf("%llu %llu ", (unsigned long long)f, (unsigned long long)r.end);
            for (size_t i = 0; i < n; i++) printf("%02x", out[i]);
            printf("\n");
            fflush(stdout);
        }
    }
    return 0;
}
"""


@pytest.fixture(scope="module")
def ring_harness(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.fail("a C compiler is needed (scripts/install.sh installs gcc)")
    tmp = tmp_path_factory.mktemp("ring")
    agent = tmp / "agent.c"
    agent.write_bytes(resources.files("ember.guest").joinpath("agent.c").read_bytes())
    src = tmp / "harness.c"
    src.write_text(HARNESS.replace("AGENT", f'"{agent}"'))
    subprocess.run([cc, "-O1", "-w", "-o", str(tmp / "harness"), str(src)], check=True)
    return tmp / "harness"


def test_the_ring_keeps_the_newest_bytes(ring_harness: Path) -> None:
    rng = random.Random(7)
    cap = 1000
    written = bytearray()
    script, expected = [f"C {cap}"], []
    for _ in range(400):
        if rng.random() < 0.5:
            chunk = rng.randbytes(rng.choice([0, 1, 7, 999, 1000, 1001, 2500]))
            written += chunk
            script.append("P " + chunk.hex() + " ")
        else:
            end = len(written)
            start = rng.randint(0, end + 50)
            most = rng.choice([0, 1, 300, 2000])
            oldest = max(0, end - cap)
            begin = min(max(start, oldest), end)
            script.append(f"G {start} {most}")
            expected.append(f"{begin} {end} {bytes(written[begin : begin + most]).hex()}")
    out = subprocess.run([ring_harness], input="\n".join(script) + "\n", capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:-1] == expected
    assert len(written) > 20 * cap  # the ring wrapped many times


def reply(start: int, end: int, capacity: int, data: bytes) -> bytes:
    return encode_fields([(Tag.LOG_FROM, start), (Tag.LOG_END, end), (Tag.SIZE, capacity), (Tag.LOG_DATA, data)])


def test_a_log_reply_is_checked_against_the_request() -> None:
    assert decode_chunk(reply(10, 14, 100, b"abcd"), asked=10, limit=64) == LogChunk(10, 14, 100, b"abcd")
    assert decode_chunk(reply(50, 60, 10, b"x" * 10), asked=3, limit=64).start == 50  # 3-49 overwritten
    assert decode_chunk(reply(0, 0, 0, b""), asked=0, limit=64).capacity == 0


@pytest.mark.parametrize(
    ("payload", "asked"),
    [
        (reply(0, 100, 100, b"x" * 65), 0),  # more than asked for
        (reply(0, 3, 100, b"abcd"), 0),  # past its end
        (reply(5, 20, 100, b"x" * 15), 10),  # before the offset asked
        (reply(0, 500, 100, b"x" * 64), 0),  # more than the ring holds
        (reply(0, 100, 100, b"x" * 10), 0),  # shorter than it says
        (reply(0, 4, 0, b"abcd"), 0),  # bytes without a log
        (encode_fields([(Tag.LOG_FROM, 0), (Tag.LOG_END, 0), (Tag.SIZE, 8)]), 0),  # no data field
    ],
)
def test_a_hostile_log_reply_is_refused(payload: bytes, asked: int) -> None:
    with pytest.raises(GuestProtocolError):
        decode_chunk(payload, asked=asked, limit=64)


class FakeGuest:
    """A guest ring as ember.applog reads it (the model the C harness is checked against)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.written = bytearray()
        self.reads = 0

    async def read(self, start: int, limit: int, wait_s: float) -> LogChunk:
        self.reads += 1
        end = len(self.written)
        begin = min(max(start, end - self.capacity, 0), end)
        return LogChunk(begin, end, self.capacity, bytes(self.written[begin : begin + limit]))


async def collect(guest: FakeGuest, *, tail: int | None) -> list[dict[str, object]]:
    head = await applog.first_chunk(guest.read)
    return [event async for event in applog.events(guest.read, head, tail=tail, follow=False)]


async def test_a_log_streams_in_chunks_with_tail_and_ends() -> None:
    guest = FakeGuest(300 * 1024)
    guest.written += bytes(range(256)) * 1000  # 256000 bytes: four chunks
    events = await collect(guest, tail=None)
    assert b"".join(base64.b64decode(str(e["data"])) for e in events) == guest.written
    assert [e["offset"] for e in events] == [0, 65536, 131072, 196608]
    tail = await collect(guest, tail=10)
    assert tail == [{"offset": 255990, "data": base64.b64encode(guest.written[-10:]).decode()}]
    assert await collect(guest, tail=0) == []


async def test_overwritten_bytes_are_reported_as_skipped() -> None:
    guest = FakeGuest(100)
    guest.written += b"a" * 250
    head = await applog.first_chunk(guest.read)
    guest.written += b"b" * 120  # the app writes on while this reader is slow
    events = [e async for e in applog.events(guest.read, LogChunk(0, head.end, 100, b""), tail=None, follow=False)]
    assert events[0] == {"offset": 0, "skipped": 270}
    assert base64.b64decode(str(events[1]["data"])) == b"b" * 100


async def test_a_vm_without_an_app_is_a_conflict() -> None:
    with pytest.raises(Conflict, match="no app log"):
        await applog.first_chunk(FakeGuest(0).read)


async def test_a_guest_answering_a_followed_read_at_once_with_nothing_does_not_make_the_host_spin() -> None:
    """A hostile agent answers every waiting read at once, empty: the follower waits out the rest of each
    wait on the host (it made thousands of guest round trips a second, starving other VMs)."""
    reads = 0

    async def instant_empty(offset: int, limit: int, wait_s: float) -> LogChunk:
        nonlocal reads
        reads += 1
        return LogChunk(offset, offset, 100, b"")

    async def follow() -> None:
        async for _ in applog.events(instant_empty, LogChunk(0, 0, 100, b""), tail=None, follow=True, wait_s=0.1):
            pass

    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(follow(), 0.5)
    assert 3 <= reads <= 7, f"{reads} reads in 0.5 s with a 0.1 s wait"
