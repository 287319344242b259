"""A deliberately loaded machine, and what a test daemon has running on the host.

``busy_cores`` keeps every core busy (the issue's restarts lost VMs only when the
machine was loaded). ``vmm_processes`` finds every QEMU a daemon started, by its
cgroup (each VMM runs in ``<group>/<vm id>``) or by its command line (its RAM
file lies under the daemon's data directory), so a VMM that somehow left its
cgroup is still counted.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ember.config import Settings
from ember.host.cgroup import group_for
from ember.snapshot import Snapshot

CGROUP_ROOT = Path("/sys/fs/cgroup")


@contextlib.contextmanager
def busy_cores(count: int | None = None) -> Iterator[list[int]]:
    """``count`` (default: every core) busy loops at the daemon's own priority, killed on exit."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(count or os.cpu_count() or 1):
            procs.append(subprocess.Popen(["nice", "-n", "0", "sha256sum", "/dev/zero"], stdout=subprocess.DEVNULL))
        yield [p.pid for p in procs]
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGKILL)
            p.wait()


@dataclass(frozen=True)
class VmmProcess:
    pid: int
    cgroup: str  # the VMM's cgroup under the daemon's group ("" if it is in none of them)
    ram: str  # the file its guest RAM maps (mem-path=...)

    def image(self, settings: Settings) -> str | None:
        """The image whose template RAM this VMM maps (a clone never resumed: launched or pooled)."""
        ram = Path(self.ram)
        if ram.name == Snapshot.RAM and ram.parent.parent == settings.images_dir:
            return ram.parent.name
        return None


def vmm_processes(settings: Settings) -> list[VmmProcess]:
    """Every live QEMU process of the daemon running with ``settings``."""
    group = f"/{group_for(settings.data_dir)}/"
    data_dir = str(settings.data_dir).encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            cgroups = Path(f"/proc/{entry}/cgroup").read_text()
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if b"qemu-system" not in cmdline.split(b"\0", 1)[0]:
            continue
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            continue
        cgroup = next((line.split(group, 1)[1].split("/")[0] for line in cgroups.splitlines() if group in line), "")
        ram = next((opt[len("mem-path=") :] for arg in cmdline.split(b"\0") for opt in arg.decode(errors="replace")
                    .split(",") if opt.startswith("mem-path=")), "")  # fmt: skip
        if cgroup or data_dir in cmdline:
            found.append(VmmProcess(int(entry), cgroup, ram))
    return found


def cgroup_names(settings: Settings) -> set[str]:
    """The VMM cgroups under the daemon's group, in every hierarchy (v2, or each v1 one)."""
    group = group_for(settings.data_dir)
    parents = [CGROUP_ROOT / group, *(h / group for h in CGROUP_ROOT.iterdir() if h.is_dir())]
    names: set[str] = set()
    for parent in parents:
        with contextlib.suppress(OSError):
            names.update(p.name for p in parent.iterdir() if p.is_dir())
    return names


def cgroup_group_exists(settings: Settings) -> bool:
    group = group_for(settings.data_dir)
    return (CGROUP_ROOT / group).exists() or any((h / group).exists() for h in CGROUP_ROOT.iterdir() if h.is_dir())


class Starver:
    """From ``start`` on, every VMM cgroup of the daemon that gets a process and that ``which``
    picks (by name) is starved to 1 ms of CPU per second: a machine loaded far beyond what it can
    serve, for those VMMs alone, and deterministic (unlike real load). ``release`` gives the
    cgroups still there their own limits back."""

    def __init__(self, settings: Settings, which: Callable[[str], bool]) -> None:
        group = group_for(settings.data_dir)
        self._v2 = (CGROUP_ROOT / "cgroup.controllers").exists()
        self._parent = CGROUP_ROOT / group if self._v2 else CGROUP_ROOT / "cpu" / group
        self._limits = (
            {"cpu.max": "1000 1000000"} if self._v2 else {"cpu.cfs_period_us": "1000000", "cpu.cfs_quota_us": "1000"}
        )
        self._which = which
        self.starved: dict[str, dict[str, str]] = {}  # cgroup -> its own limits
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Starver:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.release()

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError):
                for d in self._parent.iterdir():
                    if d.is_dir() and d.name not in self.starved and self._which(d.name):
                        with contextlib.suppress(OSError):
                            self._starve(d)
            time.sleep(0.002)

    def _starve(self, d: Path) -> None:
        if not (d / "cgroup.procs").read_text().strip():
            return  # not started yet: the daemon may still be writing its limits
        own = {name: (d / name).read_text().strip() for name in self._limits}
        for name, value in self._limits.items():
            (d / name).write_text(value)
        self.starved[d.name] = own

    def release(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        for name, own in self.starved.items():
            for file, value in own.items():
                with contextlib.suppress(OSError):  # gone with its VMM
                    (self._parent / name / file).write_text(value)
