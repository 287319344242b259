"""Per-VM cgroups: memory and pids limits for each VMM process.

One small interface, one implementation per cgroup layout (v2 unified, or v1
with separate memory and pids hierarchies). A VM's cgroup is also how Ember
finds every process it ever started for that VM after a restart: anything
still inside a cgroup Ember does not re-adopt is killed.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import time
from pathlib import Path
from typing import Protocol

ROOT = Path("/sys/fs/cgroup")


class Cgroups(Protocol):
    def create(self, name: str, memory_bytes: int, pids_max: int) -> list[Path]:
        """Create the cgroup; returns the cgroup.procs files a process must join."""

    def pids(self, name: str) -> list[int]: ...

    def names(self) -> list[str]: ...

    def destroy(self, name: str) -> None:
        """Kill whatever is left inside, then remove the cgroup."""

    def release(self) -> None:
        """Remove this daemon's parent cgroup if no VM cgroup is left in it."""


def _read_pids(procs: Path) -> list[int]:
    try:
        return [int(x) for x in procs.read_text().split()]
    except FileNotFoundError:
        return []


def _kill_and_rmdir(dirs: list[Path]) -> None:
    for d in dirs:
        for pid in _read_pids(d / "cgroup.procs"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    for d in dirs:
        for _ in range(200):
            try:
                d.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.01)  # busy until the killed processes are gone


def _rmdir_if_empty(dirs: list[Path]) -> None:
    for d in dirs:
        with contextlib.suppress(OSError):  # busy (VMs left for the next daemon) or already gone
            d.rmdir()


class CgroupsV2:
    def __init__(self, group: str, root: Path = ROOT) -> None:
        self.base = root / group
        self.base.mkdir(exist_ok=True)
        controllers = (root / "cgroup.subtree_control").read_text().split()
        for c in ("memory", "pids"):
            if c not in controllers:
                (root / "cgroup.subtree_control").write_text(f"+{c}")
        (self.base / "cgroup.subtree_control").write_text("+memory +pids")

    def create(self, name: str, memory_bytes: int, pids_max: int) -> list[Path]:
        d = self.base / name
        d.mkdir(exist_ok=True)
        (d / "memory.max").write_text(str(memory_bytes))
        if (d / "memory.swap.max").exists():
            (d / "memory.swap.max").write_text("0")
        (d / "pids.max").write_text(str(pids_max))
        return [d / "cgroup.procs"]

    def pids(self, name: str) -> list[int]:
        return _read_pids(self.base / name / "cgroup.procs")

    def names(self) -> list[str]:
        return [p.name for p in self.base.iterdir() if p.is_dir()]

    def destroy(self, name: str) -> None:
        _kill_and_rmdir([self.base / name])

    def release(self) -> None:
        _rmdir_if_empty([self.base])


class CgroupsV1:
    def __init__(self, group: str, root: Path = ROOT) -> None:
        self.memory = root / "memory" / group
        self.pids_root = root / "pids" / group
        self.memory.mkdir(exist_ok=True)
        self.pids_root.mkdir(exist_ok=True)

    def create(self, name: str, memory_bytes: int, pids_max: int) -> list[Path]:
        mem, pids = self.memory / name, self.pids_root / name
        mem.mkdir(exist_ok=True)
        pids.mkdir(exist_ok=True)
        (mem / "memory.limit_in_bytes").write_text(str(memory_bytes))
        (pids / "pids.max").write_text(str(pids_max))
        return [mem / "cgroup.procs", pids / "cgroup.procs"]

    def pids(self, name: str) -> list[int]:
        return sorted(
            set(_read_pids(self.memory / name / "cgroup.procs"))
            | set(_read_pids(self.pids_root / name / "cgroup.procs"))
        )

    def names(self) -> list[str]:
        return sorted({p.name for root in (self.memory, self.pids_root) for p in root.iterdir() if p.is_dir()})

    def destroy(self, name: str) -> None:
        _kill_and_rmdir([self.memory / name, self.pids_root / name])

    def release(self) -> None:
        _rmdir_if_empty([self.memory, self.pids_root])


def group_for(data_dir: Path) -> str:
    """Each daemon (data directory) owns one parent cgroup and reaps only inside it."""
    return "ember-" + hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:10]


def detect(group: str, root: Path = ROOT) -> Cgroups:
    if (root / "cgroup.controllers").exists():
        return CgroupsV2(group, root)
    if (root / "memory").is_dir() and (root / "pids").is_dir():
        return CgroupsV1(group, root)
    from ember.errors import HostSetupError

    raise HostSetupError("no usable cgroup hierarchy (need v2, or v1 memory and pids) under /sys/fs/cgroup")
