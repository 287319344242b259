"""What the benchmarks share: a daemon of their own, progress on stderr, percentiles, the machine."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from ember.config import Settings

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.conftest import DaemonProcess  # the same real-daemon harness as the tests


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))], 1)


def own_daemon(prefix: str, uid_base: int) -> tuple[Settings, DaemonProcess]:
    """A daemon on a fresh data directory (the Debian tarball cache is shared with the tests),
    on host ids of its own: a developer's daemon may be running."""
    data = Path(tempfile.mkdtemp(prefix=prefix))
    settings = Settings.from_env({
        "EMBER_DATA_DIR": str(data), "EMBER_SOCKET": str(data / "ember.sock"),
        "EMBER_CACHE_DIR": os.environ.get("EMBER_TEST_CACHE", "/var/cache/ember-test"),
        "EMBER_UID_BASE": str(uid_base), "EMBER_UID_COUNT": "4096",
    })  # fmt: skip
    return settings, DaemonProcess(settings, data.parent / f"{data.name}-daemon.log")


def machine() -> dict[str, Any]:
    qemu = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True)
    return {
        "cpus": os.cpu_count(),
        "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30),
        "kernel": platform.release(),
        "qemu": qemu.stdout.split("\n")[0],
    }
