"""Exec stdin streamed from the client in a request of its own.

``POST /v1/vms/{id}/exec`` with ``"stdin": true`` answers, once the command
runs, with a first NDJSON event ``{"stdin": ID}``; the client then streams the
input as the raw body of ``PUT /v1/vms/{id}/exec/stdin/{ID}`` while it reads the
exec's output (two requests, so a client that sends a whole body before it
reads the answer cannot deadlock against a command that writes while it reads).

The pipe between the two holds a few body chunks at most; the agent channel
pulls from it only as the guest grants stdin credit, so a slow command slows
the upload instead of growing memory. Nothing is dropped silently: if the
upload does not start within the agent timeout or breaks off, the command is
killed and the exec stream ends with an error; if the command closes its stdin
early, the rest of the upload is read and discarded (as a pipe would).
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from starlette.requests import ClientDisconnect

from ember.errors import Conflict, InvalidRequest, NotFound

PIPE_CHUNKS = 4  # body chunks (each at most the server's read size, ~64 KiB) buffered per exec


class StdinPipe:
    """An async iterator of the stdin chunks one PUT request delivers."""

    def __init__(self, vm_id: str, attach_timeout_s: float) -> None:
        self.vm_id = vm_id
        self.id = secrets.token_urlsafe(16)
        self.wanted = asyncio.Event()  # the command runs and the agent asked for stdin
        self._attach_timeout = attach_timeout_s
        self._attached = asyncio.Event()
        self._queue: asyncio.Queue[bytes | InvalidRequest | None] = asyncio.Queue(PIPE_CHUNKS)
        self._finished = False

    def __aiter__(self) -> StdinPipe:
        return self

    async def __anext__(self) -> bytes:
        self.wanted.set()
        try:
            await asyncio.wait_for(self._attached.wait(), self._attach_timeout)
        except TimeoutError:
            raise InvalidRequest(
                f"no stdin arrived within {self._attach_timeout:g} s (PUT /v1/vms/{self.vm_id}/exec/stdin/ID "
                "with the id of the exec's first event); the command was killed"
            ) from None
        item = await self._queue.get()
        if item is None:
            raise StopAsyncIteration
        if isinstance(item, InvalidRequest):
            raise item
        return item

    async def attach(self, body: AsyncIterator[bytes]) -> int:
        """Feed a request body into the pipe; returns the bytes the command was offered."""
        if self._attached.is_set():
            raise Conflict("this exec's stdin is already being sent")
        self._attached.set()
        offered = 0
        try:
            async for chunk in body:
                if self._finished:
                    continue  # the command is gone or closed its stdin: read the rest, discard it
                offered += len(chunk)
                await self._queue.put(chunk)
        except ClientDisconnect:
            await self._put_end(InvalidRequest("the stdin upload broke off; the command was killed"))
            return offered
        await self._put_end(None)
        return offered

    async def _put_end(self, item: InvalidRequest | None) -> None:
        if not self._finished:
            await self._queue.put(item)

    def finish(self) -> None:
        """The exec is over: unblock an upload still pushing into the pipe."""
        self._finished = True
        while not self._queue.empty():
            self._queue.get_nowait()


@dataclass
class StdinPipes:
    """The pipes of running execs, by id (a pipe leaves when its upload attaches or its exec ends)."""

    pipes: dict[str, StdinPipe] = field(default_factory=dict)

    def open(self, vm_id: str, attach_timeout_s: float) -> StdinPipe:
        pipe = StdinPipe(vm_id, attach_timeout_s)
        self.pipes[pipe.id] = pipe
        return pipe

    def claim(self, vm_id: str, pipe_id: str) -> StdinPipe:
        pipe = self.pipes.pop(pipe_id, None)
        if pipe is None or pipe.vm_id != vm_id:
            raise NotFound(f"no exec in {vm_id} waits for stdin under this id (it ended, or its stdin was sent)")
        return pipe

    def close(self, pipe: StdinPipe) -> None:
        self.pipes.pop(pipe.id, None)
        pipe.finish()
