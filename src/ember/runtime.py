"""The one owner of everything a VM uses on the host.

:class:`Host` knows where each VM's files live, which cgroup and uid it has,
and how to start a jailed QEMU for it; :class:`VmRuntime` holds a running
VM's QEMU process and agent connection. ``Host.teardown`` removes all of it
(process, cgroup, sockets, run directory) and is safe to call repeatedly,
including after a daemon restart, when only the files and cgroup remain.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ember.agent import AgentConnection
from ember.config import Settings
from ember.errors import VmmError, logged
from ember.host.cgroup import Cgroups
from ember.snapshot import raise_storage
from ember.vmm.machine import MachineConfig, RamMode, RunPaths
from ember.vmm.qemu import Jail, QemuVmm

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VmLayout:
    root: Path

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def disk(self) -> Path:
        return self.root / "disk.qcow2"

    @property
    def ram(self) -> Path:
        return self.root / "ram"

    @property
    def suspend_dir(self) -> Path:
        return self.root / "suspend"

    def run_paths(self, ram_file: Path) -> RunPaths:
        return RunPaths(run_dir=self.run_dir, disk=self.disk, ram_file=ram_file)


@dataclass
class VmRuntime:
    """A running VM: its VMM process and its authenticated agent channel."""

    vm_id: str
    vmm: QemuVmm
    agent: AgentConnection


SERIAL_LOG_CAP = 1024 * 1024

# A VM's own files: they move into its suspend snapshot and back out on resume.
VM_FILES = ("disk.qcow2", "ram")


def move_files(src: Path, dst: Path, names: tuple[str, ...] | list[str]) -> list[str]:
    """Rename the named files that exist in ``src`` into ``dst`` (same filesystem); returns them."""
    moved = []
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            os.rename(src / name, dst / name)
            moved.append(name)
    return moved


def new_ram_file(path: Path, memory_mib: int, uid: int) -> None:
    """A guest RAM file only the VM's VMM can open, its blocks reserved up front.

    Preallocated (unwritten extents read as holes), a first write to a guest
    page costs what anonymous memory costs (54 ms vs 163 ms for 90 MB here),
    and a full disk is found now rather than as a SIGBUS in the VMM.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.posix_fallocate(fd, 0, memory_mib * 1024 * 1024)
        os.fchown(fd, uid, uid)
    except OSError as exc:
        path.unlink()
        raise_storage(exc, "reserving the VM's RAM file")
    finally:
        os.close(fd)


def create_overlay(backing: Path, out: Path, owner_uid: int) -> None:
    proc = subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(backing), "-F", "qcow2", str(out)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise VmmError(logged("creating the VM disk failed", proc.stderr.strip()))
    os.chown(out, owner_uid, 0)
    os.chmod(out, 0o600)


def cap_log_file(path: Path, cap: int = SERIAL_LOG_CAP) -> bool:
    """Truncate a serial log that outgrew ``cap`` (a guest can write its console as fast as it
    likes; QEMU appends, so it goes on at the start); returns True when it did. Only a regular
    file with one link is truncated, never what a symlink points to."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_size <= cap:
            return False
        os.ftruncate(fd, 0)
        return True
    finally:
        os.close(fd)


async def keep_serial_capped(path: Path, vm_id: str, cap: int = SERIAL_LOG_CAP) -> None:
    """Until cancelled: keep the serial log of a VM the engine does not watch (build and
    image-capture VMs) at most ``cap`` bytes, as the engine does for launched VMs."""
    while True:
        if await asyncio.to_thread(cap_log_file, path, cap):
            log.warning("%s: guest serial output passed %d bytes; log truncated", vm_id, cap)
        await asyncio.sleep(0.25)


class Host:
    def __init__(self, settings: Settings, cgroups: Cgroups, jailer: Path) -> None:
        self.settings = settings
        self.cgroups = cgroups
        self.jailer = jailer

    def layout(self, vm_id: str) -> VmLayout:
        return VmLayout(self.settings.vms_dir / vm_id)

    def cgroup_name(self, vm_id: str) -> str:
        return vm_id

    def prepare_run_dir(self, layout: VmLayout, uid: int) -> None:
        layout.root.mkdir(exist_ok=True)
        os.chmod(layout.root, 0o711)  # the VMM reaches its run dir, disk and RAM file (the daemon's umask is 077)
        if layout.run_dir.exists():
            shutil.rmtree(layout.run_dir)
        layout.run_dir.mkdir(mode=0o700)
        os.chown(layout.run_dir, uid, uid)

    async def start_vmm(
        self,
        vm_id: str,
        machine: MachineConfig,
        paths: RunPaths,
        ram: RamMode,
        incoming: bool,
        uid: int,
        extra_gid: int,
        extra: tuple[str, ...] = (),
        network: bool = False,
    ) -> QemuVmm:
        """Start a jailed VMM; ``network`` keeps it in the host's network namespace
        (image builds: egress is then filtered by uid, see ember.build.egress)."""
        memory = (machine.memory_mib + self.settings.vmm_overhead_mib) * 1024 * 1024
        procs = self.cgroups.create(self.cgroup_name(vm_id), memory, self.settings.vmm_pids_max)
        jail = Jail(self.jailer, uid, uid, extra_gid, tuple(procs), new_netns=not network)
        return await QemuVmm.start(self.settings.qemu_binary, machine, paths, ram, incoming, jail, extra)

    async def stop(self, vm_id: str, runtime: VmRuntime | None) -> None:
        """Stop the VM's processes and free its cgroup and run directory (disk stays)."""
        if runtime is not None:
            await runtime.agent.close()
            await runtime.vmm.shutdown()
        await asyncio.get_running_loop().run_in_executor(None, self.cgroups.destroy, self.cgroup_name(vm_id))
        shutil.rmtree(self.layout(vm_id).run_dir, ignore_errors=True)

    async def teardown(self, vm_id: str, runtime: VmRuntime | None) -> None:
        """Remove every trace of the VM on the host."""
        await self.stop(vm_id, runtime)
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(self.layout(vm_id).root)

    def cap_serial_log(self, vm_id: str, cap: int = SERIAL_LOG_CAP) -> bool:
        """Truncate a guest's serial log that outgrew ``cap``; returns True when it did."""
        return cap_log_file(self.layout(vm_id).run_dir / "serial.log", cap)

    def cgroup_pids(self, vm_id: str) -> list[int]:
        return self.cgroups.pids(self.cgroup_name(vm_id))
