"""Per-VM cgroups: memory, pids, cpu and io limits for each VMM process.

One small interface, one implementation per cgroup layout (v2 unified, or v1
with separate memory, pids, cpu and blkio hierarchies). A VM's cgroup is also
how Ember finds every process it ever started for that VM after a restart:
anything still inside a cgroup Ember does not re-adopt is killed.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import signal
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Protocol

from ember.config import Settings
from ember.errors import HostSetupError

log = logging.getLogger(__name__)

ROOT = Path("/sys/fs/cgroup")
CPU_PERIOD_US = 100_000


@dataclass(frozen=True, kw_only=True)
class CgroupLimits:
    """What one VMM may use; 0 means unlimited (except memory and pids, always set)."""

    memory_bytes: int
    pids_max: int
    cpu_quota: float = 0.0  # in cores: 1.5 = one and a half cores' time per period
    io_device: str = ""  # "MAJ:MIN" of the disk the io limits apply to; "" = no io limits
    io_read_bps: int = 0
    io_write_bps: int = 0
    io_read_iops: int = 0
    io_write_iops: int = 0

    @classmethod
    def for_vm(cls, settings: Settings, memory_mib: int, vcpus: int) -> CgroupLimits:
        """A VMM running a guest of ``memory_mib`` and ``vcpus``: the guest plus QEMU's own
        overhead, on the disk holding the data directory (its disks, RAM files, snapshots)."""
        return cls(
            memory_bytes=(memory_mib + settings.vmm_overhead_mib) << 20,
            pids_max=settings.vmm_pids_max,
            cpu_quota=vcpus + settings.vmm_cpu_overhead,
            io_device=block_device(settings.data_dir),
            io_read_bps=settings.vmm_io_read_bps,
            io_write_bps=settings.vmm_io_write_bps,
            io_read_iops=settings.vmm_io_read_iops,
            io_write_iops=settings.vmm_io_write_iops,
        )

    @property
    def cpu_quota_us(self) -> int:
        """The quota per CPU_PERIOD_US period, or -1 (unlimited)."""
        return max(1000, round(self.cpu_quota * CPU_PERIOD_US)) if self.cpu_quota > 0 else -1

    @property
    def io_limits(self) -> dict[str, int]:
        """The io limits that are set, by their cgroup v2 ``io.max`` key."""
        keys = {"rbps": self.io_read_bps, "wbps": self.io_write_bps,
                "riops": self.io_read_iops, "wiops": self.io_write_iops}  # fmt: skip
        return {k: v for k, v in keys.items() if v > 0} if self.io_device else {}


@functools.cache
def block_device(path: Path) -> str:
    """The whole disk holding ``path`` as "MAJ:MIN" (throttling applies to disks, not
    partitions), or "" when there is none (tmpfs, network file systems)."""
    st_dev = os.stat(path).st_dev
    # major 0 (btrfs, overlayfs, tmpfs): an anonymous device; the mount's source may be a disk
    dev = st_dev if os.major(st_dev) else _mount_source_device(f"0:{os.minor(st_dev)}")
    if dev is None:
        return ""
    sysfs = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    if not sysfs.exists():
        return ""
    if (sysfs / "partition").exists():
        return (sysfs.resolve().parent / "dev").read_text().strip()
    return f"{os.major(dev)}:{os.minor(dev)}"


def _mount_source_device(dev: str) -> int | None:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[2] == dev and " - " in line:
                source = line.split(" - ", 1)[1].split()[1]
                try:
                    st = os.stat(source)
                except OSError:
                    return None
                return st.st_rdev if stat.S_ISBLK(st.st_mode) else None
    return None


class Cgroups(Protocol):
    def create(self, name: str, limits: CgroupLimits) -> list[Path]:
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


# How long a killed VMM may take to leave its cgroup: tearing down gigabytes of guest memory
# mappings takes seconds on a loaded host (a cgroup left behind is swept by release()).
KILL_WAIT_S = 15.0


def _kill_and_rmdir(dirs: list[Path]) -> None:
    for d in dirs:
        for pid in _read_pids(d / "cgroup.procs"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + KILL_WAIT_S
    for d in dirs:
        pause = 0.005
        while True:
            try:
                d.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError as exc:  # busy until the killed processes are gone
                if time.monotonic() > deadline:
                    log.warning("cgroup %s still busy %.0f s after its processes were killed: %s", d, KILL_WAIT_S, exc)
                    break
                time.sleep(pause)
                pause = min(pause * 2, 0.2)


def _rmdir_if_empty(dirs: list[Path]) -> None:
    """Remove each of ``dirs`` and every child cgroup in it that no process uses (one whose VMM
    died late, after its destroy gave up); busy ones (VMs left for the next daemon) stay."""
    for d in dirs:
        with contextlib.suppress(OSError):
            for child in d.iterdir():
                if child.is_dir() and not _read_pids(child / "cgroup.procs"):
                    with contextlib.suppress(OSError):
                        child.rmdir()
        with contextlib.suppress(OSError):  # busy or already gone
            d.rmdir()


DEFAULT_WEIGHT = 100  # cgroup v2's default cpu.weight


class CgroupsV2:
    CONTROLLERS = ("memory", "pids", "cpu", "io")

    def __init__(self, group: str, root: Path = ROOT, *, cpu_weight: int = DEFAULT_WEIGHT) -> None:
        self.base = root / group
        self.base.mkdir(exist_ok=True)
        available = (root / "cgroup.controllers").read_text().split()
        missing = [c for c in self.CONTROLLERS if c not in available]
        if missing:
            raise HostSetupError(f"cgroup v2 controllers missing under {root}: {' '.join(missing)}")
        enabled = (root / "cgroup.subtree_control").read_text().split()
        for c in self.CONTROLLERS:
            if c not in enabled:
                (root / "cgroup.subtree_control").write_text(f"+{c}")
        (self.base / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in self.CONTROLLERS))
        if (self.base / "cpu.weight").exists():
            (self.base / "cpu.weight").write_text(str(cpu_weight))

    def create(self, name: str, limits: CgroupLimits) -> list[Path]:
        d = self.base / name
        d.mkdir(exist_ok=True)
        (d / "memory.max").write_text(str(limits.memory_bytes))
        if (d / "memory.swap.max").exists():
            (d / "memory.swap.max").write_text("0")
        (d / "pids.max").write_text(str(limits.pids_max))
        quota = limits.cpu_quota_us
        (d / "cpu.max").write_text(f"{quota if quota > 0 else 'max'} {CPU_PERIOD_US}")
        if limits.io_limits:
            keys = " ".join(f"{k}={v}" for k, v in limits.io_limits.items())
            (d / "io.max").write_text(f"{limits.io_device} {keys}")
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
    HIERARCHIES = ("memory", "pids", "cpu", "blkio")
    # blkio.throttle files by their v2 io.max key
    THROTTLE: ClassVar[dict[str, str]] = {"rbps": "read_bps_device", "wbps": "write_bps_device",
                                          "riops": "read_iops_device", "wiops": "write_iops_device"}  # fmt: skip

    def __init__(self, group: str, root: Path = ROOT, *, cpu_weight: int = DEFAULT_WEIGHT) -> None:
        self.roots = {h: root / h / group for h in self.HIERARCHIES}
        for d in self.roots.values():
            d.mkdir(exist_ok=True)
        if (self.roots["cpu"] / "cpu.shares").exists():  # v1's scale: 1024 is the default weight
            (self.roots["cpu"] / "cpu.shares").write_text(str(max(2, cpu_weight * 1024 // DEFAULT_WEIGHT)))

    def _dirs(self, name: str) -> list[Path]:
        return [d / name for d in self.roots.values()]

    def create(self, name: str, limits: CgroupLimits) -> list[Path]:
        dirs = self._dirs(name)
        for d in dirs:
            d.mkdir(exist_ok=True)
        mem, pids, cpu, blkio = dirs
        (mem / "memory.limit_in_bytes").write_text(str(limits.memory_bytes))
        (pids / "pids.max").write_text(str(limits.pids_max))
        (cpu / "cpu.cfs_period_us").write_text(str(CPU_PERIOD_US))
        (cpu / "cpu.cfs_quota_us").write_text(str(limits.cpu_quota_us))
        for key, value in limits.io_limits.items():
            (blkio / f"blkio.throttle.{self.THROTTLE[key]}").write_text(f"{limits.io_device} {value}")
        return [d / "cgroup.procs" for d in dirs]

    def pids(self, name: str) -> list[int]:
        return sorted({pid for d in self._dirs(name) for pid in _read_pids(d / "cgroup.procs")})

    def names(self) -> list[str]:
        return sorted({p.name for root in self.roots.values() for p in root.iterdir() if p.is_dir()})

    def destroy(self, name: str) -> None:
        _kill_and_rmdir(self._dirs(name))

    def release(self) -> None:
        _rmdir_if_empty(list(self.roots.values()))


def group_for(data_dir: Path) -> str:
    """Each daemon (data directory) owns one parent cgroup and reaps only inside it."""
    return "ember-" + hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:10]


def detect(group: str, root: Path = ROOT, *, cpu_weight: int = DEFAULT_WEIGHT) -> Cgroups:
    """The host's cgroup layout; ``cpu_weight`` is what all of this daemon's VMMs together weigh
    against a sibling of default weight (the daemon) when the CPU is contended."""
    if (root / "cgroup.controllers").exists():
        return CgroupsV2(group, root, cpu_weight=cpu_weight)
    if all((root / h).is_dir() for h in CgroupsV1.HIERARCHIES):
        return CgroupsV1(group, root, cpu_weight=cpu_weight)
    raise HostSetupError(
        "no usable cgroup hierarchy under /sys/fs/cgroup (need v2 with memory, pids, cpu and io,"
        " or v1 memory, pids, cpu and blkio)"
    )
