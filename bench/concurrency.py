"""Concurrency benchmark: many tenants at once, and whether the API stays responsive meanwhile.

    sudo .venv/bin/python bench/concurrency.py [--vms 10] [--rounds 3] [--load] [--watch-loop]

Starts its own daemon, builds the base image, then prints JSON (last line):

- ``rounds``: N threads, each with its own SDK client, launch a VM and run its
  first exec (``true``) at the same moment: total wall time, and per VM the
  launch, the first exec and both (p50/p95/max). The VMs are removed and the
  warm pool refills between rounds.
- with ``--load``: the same N launches while an image build runs, with
  ``GET /v1/vms`` sampled back to back from one more client the whole time: its
  latency (p50/p95/max) while the launches run and over the whole build.
- with ``--watch-loop``: the daemon runs under bench.loopwatch (asyncio debug
  mode, slow-callback threshold 20 ms, and a stack sampler) and ``loop_blockers``
  lists what blocked its event loop, by stack. Debug mode slows the daemon:
  compare timings with a run without it.
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ember.config import Settings
from ember.sdk import Client, Request

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import log, machine, own_daemon, pct, pcts, prepare_base, remove_all
from bench.loopwatch import blockers
from tests.conftest import build

# A small app build: unpack the base, two steps, start the app and snapshot it (the nonce
# keeps any layer cache from answering for it).
DOCKERFILE = """\
FROM ember:debian-python3
WORKDIR /app
COPY app.py ./
RUN python3 -m compileall -q /app && echo built > /app/built
CMD ["python3", "/app/app.py"]
"""
APP = "import time  # {nonce}\nwhile True:\n    time.sleep(3600)\n"


def build_context(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "Dockerfile").write_text(DOCKERFILE)
    (root / "app.py").write_text(APP.format(nonce=secrets.token_hex(8)))
    return root


def launch_and_first_exec(settings: Settings, image: str, start: threading.Barrier) -> dict[str, Any]:
    """One tenant: its own client; waits for the others, then launches and runs ``true``."""
    with Client(settings=settings) as c:
        start.wait()
        t0 = time.perf_counter()
        vm = c.vms.run(image).id
        t1 = time.perf_counter()
        exit_code = c.vms.exec(vm, ["true"]).exit_code
        t2 = time.perf_counter()
    if exit_code != 0:
        raise RuntimeError(f"`true` exited {exit_code} in VM {vm}")
    return {"vm": vm, "launch_ms": (t1 - t0) * 1000, "exec_ms": (t2 - t1) * 1000, "total_ms": (t2 - t0) * 1000,
            "done": t2}  # fmt: skip


@dataclass
class Concurrent:
    """Runs ``n`` tenants' launch + first exec at once; ``results`` and ``errors`` once joined."""

    settings: Settings
    n: int
    image: str = "debian"
    results: list[dict[str, Any]] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)

    def run(self) -> float:
        """Seconds from the common start to the last tenant's exec answer."""
        start = threading.Barrier(self.n + 1)

        def tenant() -> None:
            try:
                self.results.append(launch_and_first_exec(self.settings, self.image, start))
            except BaseException as exc:
                self.errors.append(exc)

        threads = [threading.Thread(target=tenant) for _ in range(self.n)]
        for t in threads:
            t.start()
        start.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join()
        if self.errors:
            raise self.errors[0]
        return float(max(r["done"] for r in self.results)) - t0

    def summary(self, wall_s: float) -> dict[str, Any]:
        return {"wall_s": round(wall_s, 2),
                **{k: pcts([r[k] for r in self.results]) for k in ("launch_ms", "exec_ms", "total_ms")}}  # fmt: skip


class ListSampler(threading.Thread):
    """``GET /v1/vms`` back to back from its own client until stopped: (time, ms) of each."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(name="list-sampler", daemon=True)
        self.settings = settings
        self.samples: list[tuple[float, float]] = []
        self.stop = threading.Event()
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            with Client(settings=self.settings) as c:
                while not self.stop.is_set():
                    t0 = time.perf_counter()
                    c.send(Request("GET", "/v1/vms"))
                    self.samples.append((t0, (time.perf_counter() - t0) * 1000))
                    time.sleep(0.01)
        except Exception as exc:  # raised again by the caller, in its thread
            self.error = exc

    def between(self, start: float, end: float) -> list[float]:
        return [ms for t, ms in self.samples if start <= t <= end]


def schedstat_ms(pid: int) -> tuple[float, float]:
    """(ms on a CPU, ms runnable but waiting for one) of a process's main thread: the daemon's event loop."""
    on_cpu, waiting, _ = Path(f"/proc/{pid}/schedstat").read_text().split()
    return int(on_cpu) / 1e6, int(waiting) / 1e6


def under_load(settings: Settings, n: int, ctx: Path, on_log: Callable[[str], None], daemon_pid: int) -> dict[str, Any]:
    """n concurrent launch + first exec while an image build runs, with the list latency sampled,
    and how much of the launches' time the daemon's loop thread ran or waited for a CPU."""
    sampler = ListSampler(settings)
    build_result: dict[str, Any] = {}

    def build_app() -> None:
        name = f"load-{secrets.token_hex(3)}"
        build_result["repo"] = name
        try:
            with Client(settings=settings) as c:
                t0 = time.perf_counter()
                record, _ = build(c, ctx, name, on_log=on_log)
                build_result.update(state=record.get("state"), error=record.get("error"),
                                    seconds=round(time.perf_counter() - t0, 1))  # fmt: skip
        except Exception as exc:  # reported in the result; the caller checks the state
            build_result["error"] = repr(exc)

    sampler.start()
    builder = threading.Thread(target=build_app, name="build")
    t_start = time.perf_counter()
    builder.start()
    time.sleep(2.0)  # the build has unpacked its base and is booting its VM
    tenants = Concurrent(settings, n)
    try:
        cpu_before, wait_before = schedstat_ms(daemon_pid)
        wall = tenants.run()
        t_launched = time.perf_counter()
        cpu_after, wait_after = schedstat_ms(daemon_pid)
        builder.join()
    finally:
        sampler.stop.set()
        sampler.join()
    if sampler.error is not None:
        raise sampler.error
    t_end = time.perf_counter()
    during_launches = sampler.between(t_start + 2.0, t_launched)
    whole = sampler.between(t_start, t_end)
    return {
        "launches": tenants.summary(wall),
        "build": build_result,
        "list_ms_during_launches": pcts(during_launches),
        "list_ms_whole_build": pcts(whole),
        "daemon_loop_thread_during_launches_ms": {
            "window": round(wall * 1000),
            "on_cpu": round(cpu_after - cpu_before),
            "waiting_for_a_cpu": round(wait_after - wait_before),
        },
        "vms": [r["vm"] for r in tenants.results],
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vms", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--load", action="store_true", help="also: the launches during a build, list latency")
    parser.add_argument("--watch-loop", action="store_true", help="report what blocks the daemon's event loop")
    args = parser.parse_args()

    loop_report = Path(tempfile.mkdtemp(prefix="ember-loopwatch-")) / "report.jsonl" if args.watch_loop else None
    settings, daemon = own_daemon("ember-bench-concurrency-", 790000, loop_report=loop_report)
    result: dict[str, Any] = {"watched_loop": args.watch_loop}
    try:
        daemon.start()
        assert daemon.proc is not None
        with Client(settings=settings) as c:
            result["accel"] = prepare_base(c)["accel"]
            rounds = []
            for i in range(args.rounds):
                time.sleep(5)  # the warm pool refills, as between bursts of users
                log(f"round {i + 1}: {args.vms} concurrent launch + first exec")
                tenants = Concurrent(settings, args.vms)
                rounds.append(tenants.summary(tenants.run()))
                remove_all(c)
            result["rounds"] = rounds
            walls = [r["wall_s"] for r in rounds]
            result["wall_s"] = {"p50": pct(walls, 0.5), "max": max(walls)}
            if args.load:
                time.sleep(5)
                log(f"{args.vms} concurrent launch + first exec during an image build")
                ctx = build_context(settings.data_dir / "ctx")
                load = under_load(settings, args.vms, ctx, lambda s: log(f"  {s}"), daemon.proc.pid)
                load.pop("vms")
                result["under_load"] = load
    finally:
        try:
            if daemon.proc is not None and daemon.proc.poll() is None:
                with Client(settings=settings) as c:
                    remove_all(c)
        finally:
            daemon.stop()
            shutil.rmtree(settings.data_dir, ignore_errors=True)
    if loop_report is not None and loop_report.exists():
        result["loop_blockers"] = blockers(loop_report)
        log(f"event-loop report: {loop_report}")
    result["machine"] = machine()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
