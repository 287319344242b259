"""``ember serve`` with its event loop watched, to find what blocks it.

    python -m bench.loopwatch REPORT.jsonl [STALL_MS]   (environment as for ``ember serve``)

Two watchers append JSON lines to REPORT (lines, not one document: uvicorn ends
the daemon by re-raising SIGTERM, so nothing runs at exit):

- asyncio's debug mode with ``slow_callback_duration`` = STALL_MS (default 20):
  its "Executing <Handle ...> took X seconds" warnings (``{"asyncio": text}``);
- a sampler thread: a heartbeat on the loop every 5 ms; while a beat is over
  STALL_MS late, the main thread's stack is sampled every 2 ms. At the stall's
  end one line ``{"stall_ms": ..., "stacks": {stack: samples}}`` (innermost
  frame first; a stack inside ``selectors`` is a loop waiting to be scheduled
  on a busy host, not a blocking call).

:func:`blockers` sums a report up by the blocking call.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
import threading
import time
import traceback
from collections import Counter
from pathlib import Path
from types import FrameType
from typing import Any

BEAT_S, SAMPLE_S = 0.005, 0.002
OWN_CODE = ("/ember/", "/bench/")  # frames worth naming in a stack


class Report:
    def __init__(self, path: Path) -> None:
        self.file = open(path, "a", buffering=1)  # noqa: SIM115 - open for the process's lifetime
        self.lock = threading.Lock()

    def write(self, entry: dict[str, Any]) -> None:
        with self.lock:
            self.file.write(json.dumps(entry) + "\n")


class AsyncioWarnings(logging.Handler):
    def __init__(self, report: Report) -> None:
        super().__init__(logging.WARNING)
        self.report = report

    def emit(self, record: logging.LogRecord) -> None:
        self.report.write({"asyncio": record.getMessage()[:2000]})


def describe(frame: FrameType | None) -> str:
    """The stack as 'file:function:line' entries, innermost first: the innermost frame (the
    library call that blocks) and every frame of Ember's own code."""
    entries = traceback.extract_stack(frame)[::-1]
    kept = [e for i, e in enumerate(entries) if i == 0 or any(part in e.filename for part in OWN_CODE)]
    return " < ".join(f"{short(e.filename)}:{e.name}:{e.lineno}" for e in kept[:8])


def short(filename: str) -> str:
    for marker in ("/src/ember/", "/site-packages/", f"/lib/python{sys.version_info.major}.{sys.version_info.minor}/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


def verdict(stack: str) -> str:
    """A sampled stack, or what it shows when it is no blocking call of the daemon's."""
    frames = stack.split(" < ")
    if frames[0].startswith("selectors.py:select") and frames[1].startswith("cli.py:serve"):
        return "(not blocking: the loop waited in select, to be scheduled on a busy host)"
    if frames[0].startswith(("traceback.py", "linecache.py")):
        return "(asyncio debug mode's own cost: a stack captured for a new task or future)"
    return stack


class Sampler(threading.Thread):
    def __init__(self, report: Report, stall_s: float, main_thread: int) -> None:
        super().__init__(name="loopwatch", daemon=True)
        self.report, self.stall_s, self.main_thread = report, stall_s, main_thread
        self.last_beat = time.monotonic()

    def beat(self, loop: asyncio.AbstractEventLoop) -> None:
        self.last_beat = time.monotonic()
        loop.call_later(BEAT_S, self.beat, loop)

    def run(self) -> None:
        stacks: Counter[str] = Counter()
        stalled_since = 0.0
        while True:
            time.sleep(SAMPLE_S)
            late = time.monotonic() - self.last_beat - BEAT_S
            if late > self.stall_s:
                stalled_since = stalled_since or self.last_beat
                stacks[describe(sys._current_frames().get(self.main_thread))] += 1
            elif stacks:
                stall_ms = (self.last_beat - stalled_since - BEAT_S) * 1000
                self.report.write({"stall_ms": round(stall_ms, 1), "stacks": dict(stacks)})
                stacks, stalled_since = Counter(), 0.0


def blockers(report: Path) -> dict[str, Any]:
    """A report summed up: per blocking stack (the most sampled one of each stall), how often
    it stalled the loop, for how long in all and at most; and asyncio's own warnings, per
    handle (task numbers and creation sites left out)."""
    stalls: dict[str, dict[str, float]] = {}
    slow: dict[str, dict[str, float]] = {}
    for line in report.read_text().splitlines():
        entry = json.loads(line)
        if "asyncio" in entry:
            handle, _, took = entry["asyncio"].rpartition(" took ")
            handle = re.sub(r"Task-\d+|watch-vm-\w+| created at \S+| wait_for=.*", "", handle)[:200]
            add(slow, handle, float(took.split()[0]) * 1000)
        else:
            add(stalls, verdict(Counter(entry["stacks"]).most_common(1)[0][0]), entry["stall_ms"])
    return {"stalls": ranked(stalls), "asyncio_slow_callbacks": ranked(slow)}


def add(table: dict[str, dict[str, float]], key: str, ms: float) -> None:
    row = table.setdefault(key, {"count": 0, "total_ms": 0.0, "max_ms": 0.0})
    row["count"] += 1
    row["total_ms"] = round(row["total_ms"] + ms, 1)
    row["max_ms"] = round(max(row["max_ms"], ms), 1)


def ranked(table: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    return [{"where": key, **row} for key, row in sorted(table.items(), key=lambda kv: -kv[1]["total_ms"])]


def main() -> None:
    report = Report(Path(sys.argv[1]))
    stall_s = (float(sys.argv[2]) if len(sys.argv) > 2 else 20) / 1000
    logging.getLogger("asyncio").addHandler(AsyncioWarnings(report))
    sampler = Sampler(report, stall_s, threading.get_ident())

    class WatchedPolicy(asyncio.DefaultEventLoopPolicy):
        def new_event_loop(self) -> asyncio.AbstractEventLoop:
            loop = super().new_event_loop()
            loop.set_debug(True)
            loop.slow_callback_duration = stall_s
            loop.call_soon(sampler.beat, loop)
            return loop

    asyncio.set_event_loop_policy(WatchedPolicy())
    sampler.start()
    from ember.cli import main as ember

    ember(["serve", "-v"])


if __name__ == "__main__":
    main()
