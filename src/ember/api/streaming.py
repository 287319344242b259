"""Long jobs answered as NDJSON streams: progress events, then one result or error event.

The job runs on its own: a client that reads slowly or goes away neither slows
it down nor stops it. What waits for the client is bounded in bytes: when the
backlog is full, its oldest lines give way to one "... N lines dropped ..."
line. The final result (or error) event is never dropped.

A stream that holds something while it runs (the VM busy, a guest exec or file
stream) is a :class:`ReleasingResponse`: Starlette starts a body iterator only
once the response head is sent, so a client that goes away before that would
leave a release in the iterator's ``finally`` undone forever.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import anyio
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from ember.errors import EmberError, log_with_id

Emit = Callable[[dict[str, Any]], None]

# jobs whose client may be gone: referenced here until they end (the loop keeps only weak references)
_running: set[asyncio.Task[None]] = set()


def ndjson(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj) + "\n").encode()


class Backlog:
    """Encoded events waiting for one client: at most ``max_bytes`` of progress, plus the final event."""

    def __init__(self, max_bytes: int, marker_key: str) -> None:
        self.max_bytes = max_bytes
        self.marker_key = marker_key
        self._lines: deque[bytes] = deque()
        self._bytes = 0
        self._dropped = 0
        self._final: bytes | None = None
        self._closed = False
        self._wake = asyncio.Event()

    @property
    def pending_bytes(self) -> int:
        return self._bytes

    def put(self, event: dict[str, Any]) -> None:
        if self._closed:
            return
        line = ndjson(event)
        self._lines.append(line)
        self._bytes += len(line)
        while self._bytes > self.max_bytes:
            self._bytes -= len(self._lines.popleft())
            self._dropped += 1
        self._wake.set()

    def finish(self, event: dict[str, Any]) -> None:
        """The job's last event: kept whatever the backlog holds; nothing is accepted after it."""
        if not self._closed:
            self._final = ndjson(event)
            self._closed = True
            self._wake.set()

    async def get(self) -> bytes | None:
        """The next chunk for the client (a dropped-lines marker comes first); None once all is sent."""
        while True:
            if self._dropped:
                marker = ndjson(
                    {self.marker_key: f"... {self._dropped} lines dropped (the client read too slowly) ..."}
                )
                self._dropped = 0
                return marker
            if self._lines:
                line = self._lines.popleft()
                self._bytes -= len(line)
                return line
            if self._closed:
                final, self._final = self._final, None
                return final
            self._wake.clear()
            await self._wake.wait()


class ReleasingResponse(StreamingResponse):
    """A streamed response that runs ``release`` once it ends, however it ends: streamed to the end, the client
    gone mid-stream or before the first byte (the body iterator then never starts), or the daemon stopping.
    ``release`` runs shielded from cancellation, for at most ``release_timeout_s``."""

    def __init__(
        self, content: AsyncIterable[bytes], *, release: Callable[[], Awaitable[None]], release_timeout_s: float,
        media_type: str, headers: Mapping[str, str] | None = None,
    ) -> None:  # fmt: skip
        super().__init__(content, media_type=media_type, headers=headers)
        self._release = release
        self._release_timeout_s = release_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.move_on_after(self._release_timeout_s, shield=True):
                await self._release()


def internal_error(what: str, exc: Exception) -> dict[str, Any]:
    """Log ``exc`` under a fresh id; the event tells the client only the id."""
    error_id = log_with_id(f"{what} failed", exc=exc)
    return {"error": "InternalError", "message": f"{what} failed: internal error (id {error_id}, in the daemon log)"}


def stream_job(
    job: Callable[[Emit], Awaitable[dict[str, Any]]], what: str, *, backlog_bytes: int, marker_key: str = "log"
) -> StreamingResponse:
    """Run ``job`` in the background; stream what it emits, then its result (or its error)."""
    backlog = Backlog(backlog_bytes, marker_key)

    async def run() -> None:
        try:
            backlog.finish(await job(backlog.put))
        except EmberError as exc:
            backlog.finish({"error": type(exc).__name__, "message": str(exc)})
        except Exception as exc:
            backlog.finish(internal_error(what, exc))
        finally:  # cancelled (the daemon stops): the client still gets a last event
            backlog.finish({"error": "Interrupted", "message": f"{what} was interrupted: the daemon is stopping"})

    task = asyncio.create_task(run(), name=what)
    _running.add(task)
    task.add_done_callback(_running.discard)

    async def stream() -> AsyncIterator[bytes]:
        while (chunk := await backlog.get()) is not None:
            yield chunk

    return StreamingResponse(stream(), media_type="application/x-ndjson")
