"""A streamed job's backlog stays bounded whatever the client does; its final event always arrives."""

from __future__ import annotations

import asyncio
import json
import tracemalloc
from typing import Any

from ember.api.streaming import Backlog, Emit, stream_job

MAX = 64 * 1024


async def drain(backlog: Backlog) -> list[dict[str, Any]]:
    events = []
    while (chunk := await backlog.get()) is not None:
        events.append(json.loads(chunk))
    return events


async def test_slow_consumer_keeps_memory_bounded_and_gets_the_final_event() -> None:
    backlog = Backlog(MAX, "log")
    tracemalloc.start()
    try:
        for i in range(300_000):  # the review's flood: 300 000 short lines took 55 MiB in an unbounded queue
            backlog.put({"log": str(i % 10)})
            assert backlog.pending_bytes <= MAX
        backlog.finish({"build": {"state": "CREATED"}})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * MAX, f"backlog peaked at {peak} bytes"

    events = await drain(backlog)
    assert events[0]["log"].startswith("... ") and "lines dropped" in events[0]["log"]
    dropped = int(events[0]["log"].split()[1])
    lines = events[1:-1]
    assert dropped + len(lines) == 300_000
    assert [e["log"] for e in lines[-3:]] == ["7", "8", "9"], "the newest lines are the ones kept"
    assert events[-1] == {"build": {"state": "CREATED"}}


async def test_final_event_is_kept_even_if_larger_than_the_backlog() -> None:
    backlog = Backlog(100, "progress")
    backlog.put({"progress": "x" * 500})
    backlog.finish({"error": "BuildFailed", "message": "y" * 1000})
    backlog.put({"progress": "after the end"})  # ignored
    events = await drain(backlog)
    assert events == [
        {"progress": "... 1 lines dropped (the client read too slowly) ..."},
        {"error": "BuildFailed", "message": "y" * 1000},
    ]


async def test_marker_comes_between_what_was_read_and_what_is_left() -> None:
    backlog = Backlog(3 * len(b'{"log": "n"}\n'), "log")
    for name in "abc":
        backlog.put({"log": name})
    assert json.loads(await backlog.get() or b"") == {"log": "a"}
    for name in "defg":
        backlog.put({"log": name})
    backlog.finish({"done": True})
    events = await drain(backlog)
    assert [e.get("log") for e in events] == [
        "... 3 lines dropped (the client read too slowly) ...",
        "e",
        "f",
        "g",
        None,
    ]


async def test_job_runs_on_when_the_client_goes_away() -> None:
    finished = asyncio.Event()
    release = asyncio.Event()

    async def job(emit: Emit) -> dict[str, Any]:
        for i in range(50_000):
            emit({"log": f"line {i}"})
            if i == 10:
                await release.wait()
        finished.set()
        return {"result": 1}

    response = stream_job(job, "test job", backlog_bytes=MAX)
    body = response.body_iterator
    first = await anext(body)  # type: ignore[call-overload]
    assert json.loads(first) == {"log": "line 0"}
    await body.aclose()  # type: ignore[attr-defined]
    release.set()
    await asyncio.wait_for(finished.wait(), 10)


async def test_unexpected_exception_becomes_an_opaque_error_event() -> None:
    async def job(emit: Emit) -> dict[str, Any]:
        raise ValueError("/var/lib/ember/secret/path is broken")

    response = stream_job(job, "test job", backlog_bytes=MAX)
    chunks = [json.loads(c) async for c in response.body_iterator]
    assert len(chunks) == 1 and chunks[0]["error"] == "InternalError"
    assert "/var/lib" not in chunks[0]["message"] and "id " in chunks[0]["message"]
