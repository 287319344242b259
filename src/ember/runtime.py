"""The host side every VMM shares: where files live, uids, cgroups, the jailer.

:class:`Host` knows where each VM's files and control directory live, hands
out VMM uids, and sweeps what no live VMM owns (after a daemon restart:
cgroups, control directories, RAM files of build and capture VMs). Each
running VMM is owned by one :class:`ember.microvm.MicroVm`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import stat
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from ember.config import Settings
from ember.host.cgroup import Cgroups
from ember.host.qemuimg import QemuImg
from ember.network.vmnet import VmNetworks
from ember.snapshot import XXH3, Snapshot, SnapshotManifest, durable, hash_file, raise_storage
from ember.vmm.machine import RamMode
from ember.vmm.qemu import ControlDir

log = logging.getLogger(__name__)

SERIAL_LOG_CAP = 1024 * 1024


@dataclass(frozen=True)
class VmLayout:
    """A launched VM's own files (root-owned 0711 directory; the files are its VMM's)."""

    root: Path

    @property
    def disk(self) -> Path:
        return self.root / Snapshot.DISK

    @property
    def ram(self) -> Path:
        return self.root / Snapshot.RAM

    @property
    def suspended(self) -> Snapshot:
        return Snapshot(self.root / "suspend")

    @staticmethod
    def own_files(ram: RamMode) -> tuple[str, ...]:
        """The files that are the VM's own: a clone's RAM is its image's template, so only its disk
        (a RAM file beside a clone's suspend is the new snapshot's, never the VM's)."""
        return Snapshot.VM_FILES if ram is RamMode.OWN else (Snapshot.DISK,)

    def ram_offset(self) -> int:
        """Where guest RAM starts in the VM's RAM file (a mapped-ram file keeps a header before
        it), as its last resume recorded; 0 for a plain RAM file."""
        try:
            return int((self.root / "ram-offset").read_text())
        except FileNotFoundError:
            return 0

    def set_ram_offset(self, offset: int) -> None:
        (self.root / "ram-offset").write_text(str(offset))


def move_files(src: Path, dst: Path, names: tuple[str, ...] | list[str]) -> list[str]:
    """Rename the named files that exist in ``src`` into ``dst`` (same filesystem); returns them."""
    moved = []
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            os.rename(src / name, dst / name)
            moved.append(name)
    return moved


def hand_over(paths: list[Path], uid: int) -> None:
    """Give a VM's files (RAM, disk) to ``uid``: 0 while it is suspended (no VMM, nor a later one
    reusing its uid, can touch them), the VM's own uid before its VMM starts again."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            os.fchown(fd, uid, uid)
            os.fchmod(fd, 0o600)
        finally:
            os.close(fd)


def finish_suspend(layout: VmLayout, snap: Snapshot, ram: RamMode, partial: SnapshotManifest) -> SnapshotManifest:
    """Complete a suspend whose state is saved in ``snap`` (``partial`` lists it) once the VM's VMM
    has exited: move the VM's own files in, make them root's (checked against damage from now on;
    no VMM can write them: see snapshot.XXH3), flush and checksum them at once, write the manifest.
    Blocking, and safe to run again (recovery does, for a daemon killed half-way)."""
    move_files(layout.root, snap.path, layout.own_files(ram))
    finals = [n for n in Snapshot.VM_FILES if (snap.path / n).exists() and n not in partial.files]
    hand_over([snap.path / n for n in finals], 0)
    with ThreadPoolExecutor(max_workers=1) as flusher:
        flushing = flusher.submit(durable, [snap.path / n for n in finals])
        digests = {n: hash_file(snap.path / n, True, algo=XXH3) for n in finals}
        flushing.result()
    manifest = replace(partial, files={**partial.files, **digests})
    snap.write(manifest)
    snap.saved_file.unlink()
    return manifest


def new_ram_file(path: Path, memory_mib: int, uid: int) -> None:
    """A guest RAM file only the VM's VMM can open, its blocks reserved up front.

    Preallocated (unwritten extents read as holes), a first write to a guest
    page costs what anonymous memory costs (54 ms vs 163 ms for 90 MB here),
    and a full disk is found now rather than as a SIGBUS in the VMM.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.posix_fallocate(fd, 0, memory_mib * 1024 * 1024)
        os.fchown(fd, uid, uid)
    except OSError as exc:
        path.unlink()
        raise_storage(exc, "reserving the VM's RAM file")
    finally:
        os.close(fd)


def cap_log_fd(fd: int, cap: int = SERIAL_LOG_CAP) -> bool:
    """Truncate a serial log (the daemon's own fd) that outgrew ``cap``: a guest can write its
    console as fast as it likes; QEMU appends, so it goes on at the start. Returns True when it
    did. Only a regular file with one link is cut."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_size <= cap:
        return False
    os.ftruncate(fd, 0)
    return True


class UidPool:
    """VMM uids: every VMM Ember starts (launched, pooled, build, capture) gets one of its own.

    A uid is one no stored VM holds and none handed out and not yet released has."""

    def __init__(self, free: Callable[[set[int]], int]) -> None:
        self._free = free  # the first uid no stored VM holds, outside the given set
        self._taken: set[int] = set()

    def allocate(self) -> int:
        uid = self._free(self._taken)
        self._taken.add(uid)
        return uid

    def settle(self, uid: int) -> None:
        """``uid`` is now recorded in the store (a VM's), or was never used: forget the hand-out."""
        self._taken.discard(uid)

    release = settle


class Host:
    def __init__(self, settings: Settings, cgroups: Cgroups, jailer: Path, uids: UidPool) -> None:
        self.settings = settings
        self.cgroups = cgroups
        self.jailer = jailer
        self.uids = uids
        self.qemu_img = QemuImg.of(settings)
        self.net = VmNetworks(settings)

    @property
    def run_root(self) -> Path:
        return self.settings.data_dir / "run"

    def layout(self, vm_id: str) -> VmLayout:
        return VmLayout(self.settings.vms_dir / vm_id)

    def control_dir(self, vm_id: str) -> ControlDir:
        return ControlDir(self.run_root / vm_id)

    def discard(self, vm_id: str) -> None:
        """Free what a VMM that is gone (or must go) held: kill its cgroup, remove its control
        directory. Blocking: call it off the event loop."""
        self.cgroups.destroy(vm_id)
        shutil.rmtree(self.control_dir(vm_id).path, ignore_errors=True)
        for namespace in self.net.of_vm(vm_id):
            self.net.destroy(namespace)

    def sweep(self, keep: set[str]) -> None:
        """After a daemon start: every cgroup and control directory that belongs to no VMM in
        ``keep`` is a leftover of a killed daemon (launched, pooled, build or capture VMs):
        kill and remove it. Blocking."""
        for name in self.cgroups.names():
            if name not in keep:
                log.warning("reaping leftover VMM cgroup %s", name)
                self.cgroups.destroy(name)
        if self.run_root.exists():
            for stray in self.run_root.iterdir():
                if stray.name not in keep:
                    log.warning("removing the control directory of a VMM no daemon owns: %s", stray.name)
                    shutil.rmtree(stray, ignore_errors=True)
        self.net.sweep(keep)

    def cgroup_pids(self, vm_id: str) -> list[int]:
        return self.cgroups.pids(vm_id)
