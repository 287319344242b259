"""What the benchmarks share: a daemon of their own (optionally with its event loop watched), progress
on stderr, percentiles, what a process costs the host, the machine."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from ember.config import Settings
from ember.sdk import ApiError, Client, Request

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.conftest import DaemonProcess  # the same real-daemon harness as the tests


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))], 1)


def pcts(values: list[float]) -> dict[str, float]:
    return {"p50": pct(values, 0.5), "p95": pct(values, 0.95), "max": round(max(values), 1), "n": len(values)}


def own_daemon(prefix: str, uid_base: int, *, loop_report: Path | None = None) -> tuple[Settings, DaemonProcess]:
    """A daemon on a fresh data directory (the Debian tarball cache is shared with the tests),
    on host ids of its own: a developer's daemon may be running. With ``loop_report``, the
    daemon runs under bench.loopwatch, which writes what blocked its event loop there."""
    data = Path(tempfile.mkdtemp(prefix=prefix))
    settings = Settings.from_env({
        "EMBER_DATA_DIR": str(data), "EMBER_SOCKET": str(data / "ember.sock"),
        "EMBER_CACHE_DIR": os.environ.get("EMBER_TEST_CACHE", "/var/cache/ember-test"),
        "EMBER_UID_BASE": str(uid_base), "EMBER_UID_COUNT": "4096",
    })  # fmt: skip
    log_path = data.parent / f"{data.name}-daemon.log"
    command = ("-m", "ember", "serve", "-v") if loop_report is None else ("-m", "bench.loopwatch", str(loop_report))
    daemon = DaemonProcess(settings, log_path, command=command)
    return daemon.settings, daemon  # its settings: with an ingress port of its own (never a real daemon's)


def prepare_base(c: Client) -> dict[str, Any]:
    """The accelerator, and the built-in image made ready (its progress logged); returns what the
    daemon said: ``accel`` and, when the image was made now, its ``cold_boot_ms``."""
    accel = c.send(Request("GET", "/v1/info"))["accelerator"]
    log(f"accelerator: {accel['name']} ({accel['reason']})")
    said: dict[str, Any] = {"accel": accel["name"]}
    for event in c.stream(Request("POST", "/v1/images/debian/prepare")):
        if "cold_boot_ms" in event:
            said["cold_boot_ms"] = round(event["cold_boot_ms"], 1)
        if "progress" in event:
            log(f"  {event['progress']}")
    return said


def remove_all(c: Client) -> int:
    """Removes every VM of the daemon (a benchmark's own): how many there were."""
    vms = c.send(Request("GET", "/v1/vms"))
    for vm in vms:
        with contextlib.suppress(ApiError):
            c.send(Request("DELETE", f"/v1/vms/{vm['id']}"))
    return len(vms)


def cpu_seconds(pid: int) -> float:
    """The CPU time (user + system) a process has used so far; 0 for a process that is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def memory_kib(pid: int, field: str) -> int | None:
    """A ``smaps_rollup`` field of a process (``Pss``, ``Rss``) in KiB; None for a process that is gone."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    return None


def mem_total_kib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1])
    raise RuntimeError("no MemTotal in /proc/meminfo")


def machine() -> dict[str, Any]:
    qemu = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True)
    return {
        "cpus": os.cpu_count(),
        "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30),
        "kernel": platform.release(),
        "qemu": qemu.stdout.split("\n")[0],
    }
