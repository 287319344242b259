"""One owner for every VMM Ember starts: launched and pooled clones, template captures,
build VMs, forks.

A :class:`MicroVm` acquires, in order, the VMM's root-owned control directory
(sockets the daemon binds, logs the daemon opens), its uid, its cgroup, the
jailed VMM process and its agent connection; each acquisition registers its
undo step at once, and :meth:`MicroVm.close` runs them in reverse, once,
whatever failed on the way. :meth:`MicroVm.detach` lets go without stopping
anything (daemon shutdown: the next daemon re-adopts running VMs; a daemon
start sweeps the control directories and cgroups nobody adopted, of every kind).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import os
import shutil
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from ember.agent import AgentConnection, ChannelLimits
from ember.errors import VmmError
from ember.host.cgroup import CgroupLimits
from ember.host.jail import JailSpec
from ember.logs import vlog
from ember.network.policy import NO_EGRESS, EgressPolicy
from ember.runtime import SERIAL_LOG_CAP, Host, cap_log_fd
from ember.vmm.machine import FD_FIRST_DISK, Accel, DiskChain, MachineConfig, RamBacking, RamMode, qemu_argv
from ember.vmm.qemu import ControlDir, QemuVmm, Vmm

log = logging.getLogger(__name__)

Undo = Callable[[], Awaitable[object] | object]


@dataclass(frozen=True)
class VmPlan:
    """What one VMM run needs; the engine, the pool, image captures and builds each describe theirs."""

    vm_id: str
    machine: MachineConfig
    disk: DiskChain
    ram: RamBacking
    uid: int
    groups: tuple[int, ...] = ()
    incoming: bool = False
    network: bool = False  # stay in the host's network namespace (build VMs: user-mode NIC, filtered by uid)
    egress: EgressPolicy = NO_EGRESS  # a NIC on a tap in a namespace of the VM's own (ember.network), unless none
    extra_args: tuple[str, ...] = ()
    ro_paths: tuple[Path, ...] = ()  # more files or directories the VMM reads by path (e.g. read-only disks)
    rw_paths: tuple[Path, ...] = ()  # and writes (e.g. a build VM's directory of new layers)


def _listen(path: Path) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        sock.listen(4)
    except BaseException:
        sock.close()
        raise
    return sock


class MicroVm:
    def __init__(self, host: Host, vm_id: str) -> None:
        self.id = vm_id
        self.host = host
        self.control: ControlDir = host.control_dir(vm_id)
        self._vmm: QemuVmm | None = None
        self.agent: AgentConnection | None = None
        self._undo: list[tuple[str, Undo]] = []
        self._serial_fd = -1
        self._vmm_log_fd = -1  # QEMU's own stderr: capped like the serial log
        self._closed = False

    # ---- acquiring ---------------------------------------------------------

    def _on_close(self, what: str, undo: Undo) -> None:
        self._undo.append((what, undo))

    @property
    def vmm(self) -> Vmm:
        if self._vmm is None:
            raise VmmError(f"{self.id} has no VMM")
        return self._vmm

    @property
    def pid(self) -> int:
        return self._vmm.pid if self._vmm is not None else 0

    def alive(self) -> bool:
        return self._vmm is not None and self._vmm.alive()

    async def wait_exit(self) -> None:
        """Return when the VMM process has exited (no polling: a pidfd)."""
        if self._vmm is not None:
            await self._vmm.wait_exit()

    @classmethod
    async def start(cls, host: Host, plan: VmPlan, *, prepare: Callable[[], object] | None = None) -> MicroVm:
        """Start a jailed VMM for ``plan``; on any failure everything acquired is released.
        ``prepare`` makes files in the new control directory before the VMM starts (a build
        VM's RAM file: removed with the directory)."""
        vm = cls(host, plan.vm_id)
        try:
            await vm._start(plan, prepare)
        except BaseException:
            await vm.close()
            raise
        return vm

    async def _start(self, plan: VmPlan, prepare: Callable[[], object] | None) -> None:
        settings = self.host.settings
        control = self.control
        await asyncio.to_thread(shutil.rmtree, control.path, True)
        control.path.mkdir(mode=0o700, parents=True)
        self._on_close("control directory", lambda: asyncio.to_thread(shutil.rmtree, control.path, True))
        control.jail_root.mkdir(mode=0o755)
        if prepare is not None:
            await asyncio.to_thread(prepare)
        qmp, agent = _listen(control.qmp_socket), _listen(control.agent_socket)
        fds: list[int] = []
        disks: list[int] = []
        try:
            self._serial_fd = os.open(
                control.serial_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
            )
            self._on_close("serial log", self._close_serial)
            fds = [qmp.fileno(), agent.fileno(), self._serial_fd]
            for path in plan.disk.backing:
                disks.append(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC))
            tap: int | None = None
            if plan.egress.needs_network and plan.machine.nic:
                net = await asyncio.to_thread(self.host.net.create, self.id, plan.egress)
                self._on_close("network namespace", lambda: asyncio.to_thread(self.host.net.destroy, net.namespace))
                disks.append(net.tap_fd)  # closed with the disks' fds once QEMU has its copy
                tap = FD_FIRST_DISK + len(disks) - 1
            limits = CgroupLimits.for_vm(settings, plan.machine.memory_mib, plan.machine.vcpus)
            procs = await asyncio.to_thread(self.host.cgroups.create, self.id, limits)
            self._on_close("cgroup", lambda: asyncio.to_thread(self.host.cgroups.destroy, self.id))
            binary = shutil.which(settings.qemu_binary)
            if binary is None:
                raise VmmError(
                    f"QEMU binary {settings.qemu_binary!r} not found: run scripts/install.sh or set EMBER_QEMU"
                )
            argv = qemu_argv(
                binary, plan.machine, plan.disk, plan.ram, incoming=plan.incoming, extra=plan.extra_args, tap_fd=tap
            )
            jail = JailSpec(
                uid=plan.uid, gid=plan.uid, groups=plan.groups, cgroup_procs=tuple(procs),
                new_netns=not plan.network, root=control.jail_root,
                ro=(*(() if plan.incoming else (Path(plan.machine.kernel), Path(plan.machine.initramfs))),
                    *((plan.ram.path,) if plan.ram.mode is RamMode.CLONE else ()), *plan.ro_paths),
                rw=(plan.disk.top, *((plan.ram.path,) if plan.ram.mode is RamMode.OWN else ()), *plan.rw_paths),
                devices=(Path("/dev/kvm"),) if plan.machine.accel is Accel.KVM else (),
                fsize=(settings.disk_gib << 30) + (plan.machine.memory_mib << 20) + (64 << 20),
                keep_fds=len(fds) + len(disks),
            )  # fmt: skip
            self._vmm = await QemuVmm.start(jail.argv(self.host.jailer, argv), [*fds, *disks], control)
            self._on_close("VMM", self._vmm.shutdown)
        finally:
            qmp.close()  # QEMU has its own copies: with ours closed, a dead QEMU refuses connections
            agent.close()
            for fd in disks:
                os.close(fd)
        self._on_close("serial cap", self._watch_serial().cancel)

    @classmethod
    async def adopt(cls, host: Host, vm_id: str, pid: int) -> MicroVm:
        """Re-attach to a VMM a previous daemon started (its control directory is root's)."""
        vm = cls(host, vm_id)
        try:
            vm._vmm = await QemuVmm.adopt(pid, vm.control)
            vm._on_close("VMM", vm._vmm.shutdown)
            for namespace in host.net.of_vm(vm_id):  # its egress, if any: gone with the VMM
                vm._on_close("network namespace", functools.partial(asyncio.to_thread, host.net.destroy, namespace))
            vm._on_close("cgroup", lambda: asyncio.to_thread(host.cgroups.destroy, vm_id))
            vm._on_close("control directory", lambda: asyncio.to_thread(shutil.rmtree, vm.control.path, True))
            with contextlib.suppress(OSError):
                vm._serial_fd = os.open(vm.control.serial_log, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC)
                vm._on_close("serial log", vm._close_serial)
                vm._on_close("serial cap", vm._watch_serial().cancel)
        except BaseException:
            await vm.detach()
            raise
        return vm

    async def open_agent(self, timeout_s: float) -> AgentConnection:
        """Connect to the agent's socket (before the guest runs, so the guest never sees the port closed)."""
        self.agent = await AgentConnection.open(
            self.control.agent_socket, timeout_s, limits=ChannelLimits.of(self.host.settings)
        )
        self._on_close("agent connection", self.agent.close)
        return self.agent

    async def connect_agent(self, token: str, timeout_s: float, *, first_boot: bool = False) -> AgentConnection:
        """Connect and authenticate with ``token``: a cold-booted guest (``first_boot``: its agent
        learns the token now) or a re-adopted one."""
        self.agent = await AgentConnection.connect(
            self.control.agent_socket, token, timeout_s, limits=ChannelLimits.of(self.host.settings),
            first_boot=first_boot,
        )  # fmt: skip
        self._on_close("agent connection", self.agent.close)
        return self.agent

    # ---- while it runs -------------------------------------------------------

    def _watch_serial(self) -> asyncio.Task[None]:
        with contextlib.suppress(OSError):
            self._vmm_log_fd = os.open(self.control.vmm_log, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC)

        async def watch() -> None:
            while True:
                if self._serial_fd >= 0 and cap_log_fd(self._serial_fd, SERIAL_LOG_CAP):
                    vlog(self.id).warning("guest serial output passed 1 MiB; log truncated")
                if self._vmm_log_fd >= 0 and cap_log_fd(self._vmm_log_fd, SERIAL_LOG_CAP):
                    vlog(self.id).warning("the VMM's own output passed 1 MiB; log truncated")
                await asyncio.sleep(0.5)

        return asyncio.create_task(watch(), name=f"serial-{self.id}")

    def _close_serial(self) -> None:
        for fd in (self._serial_fd, self._vmm_log_fd):
            if fd >= 0:
                os.close(fd)
        self._serial_fd = self._vmm_log_fd = -1

    def serial_tail(self, limit: int = 3000) -> str:
        if self._serial_fd < 0:
            return ""
        size = os.fstat(self._serial_fd).st_size
        with contextlib.suppress(OSError):
            fd = os.open(self.control.serial_log, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                return os.pread(fd, limit, max(0, size - limit)).decode(errors="replace")
            finally:
                os.close(fd)
        return ""

    # ---- letting go --------------------------------------------------------

    async def close(self) -> None:
        """Stop the VMM and free everything it held, in reverse order of acquisition. Idempotent;
        one failing step does not keep the others from running."""
        if self._closed:
            return
        self._closed = True
        while self._undo:
            what, undo = self._undo.pop()
            try:
                result = undo()
                if inspect.isawaitable(result):
                    await result
            except Exception as exc:  # keep going: the rest must still be released
                log.warning("%s: releasing its %s failed: %s", self.id, what, exc)

    async def detach(self) -> None:
        """Let go of a VMM that keeps running (daemon shutdown, or a VM recovery could not reach):
        connections close; the process, cgroup and control directory stay for the next daemon."""
        if self._closed:
            return
        self._closed = True
        if self.agent is not None:
            await self.agent.close()
        if self._vmm is not None:
            await self._vmm.disconnect()
        for what, undo in self._undo:
            if what == "serial cap":
                undo()
        self._close_serial()
        self._undo.clear()
