"""Density benchmark: how many idle VMs a host holds, what they cost, how the API answers meanwhile.

    sudo .venv/bin/python bench/density.py [--vms 200] [--window 30]

Starts its own daemon, builds the base image, launches N VMs one after another
and lets them idle, then prints JSON (last line):

- the memory of each VMM (``Pss`` from ``/proc/PID/smaps_rollup``: pages shared
  with the image's template and with other clones are split among them): mean,
  p50, max; and the daemon's own ``Rss``;
- host CPU of the idle VMMs over a window with no API calls (user + system time
  from ``/proc/PID/stat``), per VM as % of one core, and the daemon's;
- API latency through the SDK while they idle: ``GET /v1/vms`` (list) and
  ``GET /v1/vms/{id}`` (inspect: QMP status, Pss, an agent ping);
- launch time of each VM (the pool refills between launches only as fast as it can);
- the projection: idle VMs that fit in memory = (MemTotal - daemon Rss - reserve) / mean Pss.

Every VM is removed at the end, also on Ctrl-C or a failure. Launching stops
early (and says so) if the host's available memory falls under the reserve.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from ember.sdk import Client, Request

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import (
    cpu_seconds,
    log,
    machine,
    mem_total_kib,
    memory_kib,
    own_daemon,
    pct,
    pcts,
    prepare_base,
    remove_all,
)

TARGET_VMS, TARGET_CPU_PCT = 400, 0.3  # issue 9: >= 400 idle VMs in 24 GiB, <= 0.3% of a core each


def mem_available_kib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1])
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000


def launch(c: Client, n: int, reserve_kib: int) -> tuple[dict[str, int], list[float]]:
    """Launches up to n VMs: ({vm id: VMM pid}, launch ms of each)."""
    pids: dict[str, int] = {}
    launches: list[float] = []
    for i in range(n):
        if mem_available_kib() < reserve_kib:
            log(f"stopping at {i} VMs: the host's available memory is under the reserve")
            break
        start = time.perf_counter()
        vm = c.vms.run("debian")
        launches.append((time.perf_counter() - start) * 1000)
        pids[vm.id] = vm.pid or 0
        if (i + 1) % 20 == 0:
            log(f"  {i + 1} VMs, last launch {launches[-1]:.0f} ms, {mem_available_kib() >> 20} GiB available")
    return pids, launches


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vms", type=int, default=200)
    parser.add_argument("--settle", type=float, default=10, help="seconds of idle before measuring")
    parser.add_argument("--window", type=float, default=30, help="seconds of idle CPU measurement")
    parser.add_argument("--calls", type=int, default=100, help="API calls of each kind")
    parser.add_argument("--reserve-gib", type=float, default=1.0, help="memory kept for the host")
    args = parser.parse_args()

    settings, daemon = own_daemon("ember-bench-density-", 780000)
    reserve_kib = int(args.reserve_gib * 2**20)
    result: dict[str, Any] = {}
    try:
        daemon.start()
        assert daemon.proc is not None
        with Client(settings=settings) as c:
            result["accel"] = prepare_base(c)["accel"]
            log(f"launching {args.vms} VMs one after another")
            pids, launches = launch(c, args.vms, reserve_kib)
            n = len(pids)
            result["vms"] = n
            result["launch_ms"] = {**pcts(launches), "first_10_p50": pct(launches[:10], 0.5),
                                   "last_10_p50": pct(launches[-10:], 0.5)}  # fmt: skip

            log(f"{args.settle:.0f} s of idle, then {args.window:.0f} s of CPU measurement (no API calls)")
            time.sleep(args.settle)
            vmm_cpu = {pid: cpu_seconds(pid) for pid in pids.values()}
            daemon_cpu = cpu_seconds(daemon.proc.pid)
            start = time.monotonic()
            time.sleep(args.window)
            elapsed = time.monotonic() - start
            used = sum(cpu_seconds(pid) - before for pid, before in vmm_cpu.items())
            result["idle_cpu_pct_of_core"] = {
                "per_vm": round(used / elapsed / n * 100, 3),
                "all_vms": round(used / elapsed * 100, 1),
                "daemon": round((cpu_seconds(daemon.proc.pid) - daemon_cpu) / elapsed * 100, 2),
                "window_s": round(elapsed, 1),
            }

            pss = [kib / 1024 for kib in (memory_kib(pid, "Pss") for pid in pids.values()) if kib is not None]
            daemon_rss_kib = memory_kib(daemon.proc.pid, "Rss") or 0
            result["vmm_pss_mib"] = {"mean": round(statistics.mean(pss), 1), "p50": pct(pss, 0.5),
                                     "max": round(max(pss), 1), "n": len(pss)}  # fmt: skip
            result["daemon_rss_mib"] = round(daemon_rss_kib / 1024, 1)

            log(f"API latency while idle: {args.calls} lists, {args.calls} inspects")
            ids = list(pids)
            lists = [timed(lambda: c.send(Request("GET", "/v1/vms"))) for _ in range(args.calls)]
            gets = [timed(lambda: c.send(Request("GET", f"/v1/vms/{random.choice(ids)}"))) for _ in range(args.calls)]
            result["api_ms"] = {"list": pcts(lists), "get": pcts(gets)}

            total_kib = mem_total_kib()
            fit = int((total_kib - daemon_rss_kib - reserve_kib) / 1024 / statistics.mean(pss))
            result["projection"] = {
                "idle_vms_that_fit": fit,
                "mem_total_gib": round(total_kib / 2**20, 1),
                "reserve_gib": args.reserve_gib,
                "formula": "(MemTotal - daemon Rss - reserve) / mean Pss",
            }
            result["targets"] = {
                f"fit>={TARGET_VMS}": fit >= TARGET_VMS,
                f"cpu_per_vm<={TARGET_CPU_PCT}%": result["idle_cpu_pct_of_core"]["per_vm"] <= TARGET_CPU_PCT,
            }
    finally:
        try:
            if daemon.proc is not None and daemon.proc.poll() is None:
                log("removing every VM")
                with Client(settings=settings) as c:
                    log(f"  removed {remove_all(c)}")
        finally:
            daemon.stop()
            shutil.rmtree(settings.data_dir, ignore_errors=True)
    result["machine"] = machine()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
