"""The app's log: the stdout and stderr of a Dockerfile image's ENTRYPOINT/CMD (``ember logs ID [-f]``).

Where it lives: in the guest. The agent starts the app when the image is built (an EXEC with
``APPLOG``) and keeps everything it writes in a ring of ``EMBER_APP_LOG_BYTES`` (the newest bytes;
offsets count every byte since the app started). The ring is guest memory, so it is in every
snapshot: each clone starts with the app's startup output and has its own log from its launch
on; a suspended VM keeps its log and a resumed one goes on writing into it. The host keeps
nothing: it reads with LOGS requests (at most :data:`CHUNK` bytes each, from an offset, waiting
in the guest up to a few seconds for new output when following), so no VM, however fast its app
writes, makes the daemon hold more than one chunk per reader, and a VM's log costs the host no
memory or disk at all while nobody reads it. The price: the log is read only from a RUNNING VM.

A follower that falls behind cannot pin memory: the stream reads the next chunk only once the
previous one was sent to the client, so a slow client reads at its own pace, and bytes the
guest overwrote meanwhile are skipped and reported (a ``skipped`` event). Each VM's agent lets
at most 16 reads wait at once (more are refused); a follow stream ends with an error event when
the VM stops (suspend, removal): follow it again after a resume.

Guest replies are hostile: :func:`decode_chunk` checks every offset and length against the
request before anything is used.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from ember.errors import Conflict, GuestProtocolError
from ember.guest.protocol import Tag, decode_fields, field_int

CHUNK = 64 * 1024  # the most one LOGS read returns (the agent's output chunk)
FOLLOW_WAIT_S = 10.0  # how long one read of a followed log waits in the guest for new output
NO_APP = (
    "this VM has no app log: its image has no ENTRYPOINT/CMD, was not built from a Dockerfile, "
    "or was built before Ember kept app logs (build it again)"
)


@dataclass(frozen=True)
class LogChunk:
    start: int  # the offset of data[0]; past the offset asked for when older bytes were overwritten
    end: int  # every byte the app wrote: the offset after the newest one
    capacity: int  # the ring's size; 0: this VM has no app
    data: bytes


def decode_chunk(payload: bytes, *, asked: int, limit: int) -> LogChunk:
    """A LOGDATA reply to a read of at most ``limit`` bytes from ``asked``, checked."""
    fields = decode_fields(payload)
    raw = fields.get(Tag.LOG_DATA)
    if not raw or len(raw) != 1:
        raise GuestProtocolError("a log reply without exactly one LOG_DATA")
    data = raw[0]
    start, end = field_int(fields, Tag.LOG_FROM), field_int(fields, Tag.LOG_END)
    capacity = field_int(fields, Tag.SIZE)
    if capacity == 0 and (start or end or data):
        raise GuestProtocolError("a log reply with bytes but no log")
    if len(data) > limit or start + len(data) > end or start < min(asked, end) or end - start > capacity:
        raise GuestProtocolError("a log reply whose offsets do not match the request")
    if len(data) < min(limit, end - start):
        raise GuestProtocolError("a log reply shorter than the bytes it says it holds")
    return LogChunk(start=start, end=end, capacity=capacity, data=data)


LogReader = Callable[[int, int, float], Awaitable[LogChunk]]  # (offset, limit, wait_s) -> chunk


async def first_chunk(read: LogReader) -> LogChunk:
    """Where the log stands (no bytes); raises Conflict for a VM without an app."""
    head = await read(0, 0, 0)
    if head.capacity == 0:
        raise Conflict(NO_APP)
    return head


async def events(
    read: LogReader, head: LogChunk, *, tail: int | None, follow: bool, wait_s: float = FOLLOW_WAIT_S
) -> AsyncIterator[dict[str, Any]]:
    """The log from ``head`` on as stream events: ``{"offset", "data"}`` (base64), and
    ``{"offset", "skipped"}`` when bytes were overwritten before they were read. ``tail``: only
    the last this many bytes; without ``follow`` it ends at the end ``head`` saw."""
    offset = head.start if tail is None else max(head.start, head.end - tail)
    loop = asyncio.get_running_loop()
    while follow or offset < head.end:
        asked = loop.time()
        chunk = await read(offset, CHUNK, wait_s if follow else 0)
        if follow and not chunk.data and chunk.start <= offset:
            # nothing new: the agent waited for output; one that answers at once (a hostile guest) must
            # not make this loop spin, so the rest of the wait is the host's
            await asyncio.sleep(max(0.0, wait_s - (loop.time() - asked)))
        if chunk.start > offset:
            yield {"offset": offset, "skipped": chunk.start - offset}
        if chunk.data:
            yield {"offset": chunk.start, "data": base64.b64encode(chunk.data).decode()}
        offset = chunk.start + len(chunk.data)
        if not follow and not chunk.data:
            return
