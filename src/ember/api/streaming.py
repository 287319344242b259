"""Long jobs answered as NDJSON streams: progress events, then one result or error event."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi.responses import StreamingResponse

from ember.errors import EmberError

log = logging.getLogger(__name__)

Emit = Callable[[dict[str, Any]], None]


def ndjson(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj) + "\n").encode()


def stream_job(job: Callable[[Emit], Awaitable[dict[str, Any]]], what: str) -> StreamingResponse:
    """Run ``job`` in the background; stream what it emits, then its result (or its error)."""
    queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

    async def run() -> None:
        try:
            queue.put_nowait(await job(queue.put_nowait))
        except EmberError as exc:
            queue.put_nowait({"error": type(exc).__name__, "message": str(exc)})
        except Exception as exc:
            log.exception("%s failed", what)
            queue.put_nowait({"error": "InternalError", "message": str(exc)})
        finally:
            queue.put_nowait(None)

    task = asyncio.create_task(run())

    async def stream() -> AsyncIterator[bytes]:
        while (item := await queue.get()) is not None:
            yield ndjson(item)
        await task

    return StreamingResponse(stream(), media_type="application/x-ndjson")
