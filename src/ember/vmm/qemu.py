"""QEMU ``microvm`` behind the :class:`Vmm` interface, driven over QMP.

The VMM is the source of truth for a running VM: :meth:`QemuVmm.status` asks
QEMU, nothing here caches a guess. Migration streams (snapshots, suspend)
travel through file descriptors the daemon opens and passes over the QMP
socket (``getfd``), so the jailed QEMU needs no access to snapshot paths and
its seccomp filter can forbid spawning processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from qemu.qmp import QMPClient
from qemu.qmp.error import QMPError

from ember.errors import VmmError, logged
from ember.vmm.machine import MachineConfig, RamMode, RunPaths, qemu_argv

log = logging.getLogger(__name__)

MAX_BANDWIDTH = 100 * 1024**3  # the default throttle made snapshots 4x slower


@dataclass(frozen=True)
class Jail:
    """How the VMM process is confined (see host/jailer.c)."""

    jailer: Path
    uid: int
    gid: int
    extra_gid: int
    cgroup_procs: tuple[Path, ...]
    new_netns: bool = True


class Vmm(Protocol):
    pid: int

    async def status(self) -> str: ...
    async def pause(self) -> None: ...
    async def resume(self) -> None: ...
    async def save_state(self, fd: int, ignore_shared: bool) -> None: ...
    async def load_state(self, fd: int, ignore_shared: bool) -> None: ...
    async def shutdown(self) -> None: ...
    def alive(self) -> bool: ...


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


class QemuVmm:
    def __init__(self, pid: int, paths: RunPaths, qmp: QMPClient, proc: subprocess.Popen[bytes] | None) -> None:
        self.pid = pid
        self.paths = paths
        self._qmp = qmp
        self._proc = proc  # set only when this daemon is the parent (it must reap)
        self._lock = asyncio.Lock()

    # ---- lifecycle -------------------------------------------------------

    @classmethod
    async def start(
        cls,
        binary: str,
        machine: MachineConfig,
        paths: RunPaths,
        ram: RamMode,
        incoming: bool,
        jail: Jail,
        extra: tuple[str, ...] = (),
    ) -> QemuVmm:
        resolved = shutil.which(binary)
        if resolved is None:
            raise VmmError(f"QEMU binary {binary!r} not found: apt-get install qemu-system-x86 or set EMBER_QEMU")
        argv = qemu_argv(resolved, machine, paths, ram, incoming, extra)
        full = [
            str(jail.jailer), str(jail.uid), str(jail.gid), str(jail.extra_gid), str(paths.run_dir),
            "1" if jail.new_netns else "0", *map(str, jail.cgroup_procs), "--", *argv,
        ]  # fmt: skip
        with open(paths.run_dir / "vmm.log", "ab") as vmm_log:
            proc = subprocess.Popen(
                full, stdin=subprocess.DEVNULL, stdout=vmm_log, stderr=vmm_log, start_new_session=True, close_fds=True
            )
        try:
            qmp = await cls._connect(paths.qmp_socket, proc.pid, deadline=time.monotonic() + 10)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        return cls(proc.pid, paths, qmp, proc)

    @classmethod
    async def adopt(cls, pid: int, paths: RunPaths) -> QemuVmm:
        """Re-attach to a QEMU a previous daemon started."""
        if not _pid_alive(pid):
            raise VmmError(f"QEMU process {pid} is gone")
        qmp = await cls._connect(paths.qmp_socket, pid, deadline=time.monotonic() + 5)
        return cls(pid, paths, qmp, None)

    @staticmethod
    async def _connect(sock: Path, pid: int, deadline: float) -> QMPClient:
        while True:
            if not _pid_alive(pid):
                log_tail = ""
                with contextlib.suppress(OSError):
                    log_tail = (sock.parent / "vmm.log").read_text(errors="replace")[-2000:]
                raise VmmError(logged("QEMU exited during start-up", f"its log: {log_tail.strip() or 'no output'}"))
            if sock.exists():
                qmp = QMPClient(f"ember-{pid}")
                try:
                    await qmp.connect(str(sock))
                    return qmp
                except (QMPError, OSError):
                    with contextlib.suppress(Exception):
                        await qmp.disconnect()
            if time.monotonic() > deadline:
                raise VmmError(f"QEMU {pid} did not open its QMP socket in time")
            await asyncio.sleep(0.002)

    def alive(self) -> bool:
        if self._proc is not None:
            return self._proc.poll() is None
        return _pid_alive(self.pid)

    async def _cmd(self, name: str, args: dict[str, Any] | None = None) -> Any:
        try:
            return await self._qmp.execute(name, args)
        except (QMPError, OSError, EOFError) as exc:
            raise VmmError(logged(f"QMP {name} failed", repr(exc))) from exc

    async def status(self) -> str:
        result = await self._cmd("query-status")
        return str(result["status"])

    async def pause(self) -> None:
        await self._cmd("stop")

    async def resume(self) -> None:
        await self._cmd("cont")

    async def _set_caps(self, ignore_shared: bool) -> None:
        await self._cmd(
            "migrate-set-capabilities",
            {"capabilities": [{"capability": "x-ignore-shared", "state": ignore_shared}]},
        )

    async def _pass_fd(self, fd: int, name: str) -> None:
        with contextlib.suppress(QMPError, OSError, EOFError):  # usually gone: a migration closes its fd
            await self._qmp.execute("closefd", {"fdname": name})
        self._qmp.send_fd_scm(fd)
        await self._cmd("getfd", {"fdname": name})

    async def save_state(self, fd: int, ignore_shared: bool) -> None:
        """Pause the guest and write its device state (and RAM unless shared) into ``fd``.

        The VM stays paused; QEMU flushes and deactivates its disks when the
        migration completes (``cont`` re-activates them).
        """
        async with self._lock:
            await self._cmd("stop")
            await self._set_caps(ignore_shared)
            await self._cmd("migrate-set-parameters", {"max-bandwidth": MAX_BANDWIDTH})
            await self._pass_fd(fd, "ember-save")
            await self._cmd("migrate", {"uri": "fd:ember-save"})
            while True:
                info = await self._cmd("query-migrate")
                state = info.get("status")
                if state == "completed":
                    break
                if state in ("failed", "cancelled"):
                    raise VmmError(f"saving VM state failed: {info.get('error-desc', state)}")
                await asyncio.sleep(0.002)

    async def load_state(self, fd: int, ignore_shared: bool) -> None:
        """Feed a saved state into a QEMU started with ``-incoming defer``; leaves it paused."""
        async with self._lock:
            await self._set_caps(ignore_shared)
            await self._pass_fd(fd, "ember-load")
            await self._cmd("migrate-incoming", {"uri": "fd:ember-load"})
            deadline = time.monotonic() + 60
            while True:
                state = await self.status()
                if state in ("paused", "running"):
                    return
                if state not in ("inmigrate", "prelaunch"):
                    raise VmmError(f"restoring VM state failed: QEMU is '{state}'")
                if not self.alive() or time.monotonic() > deadline:
                    raise VmmError("restoring VM state failed: QEMU exited or timed out (see vmm.log)")
                await asyncio.sleep(0.001)

    async def switch_disk(self, overlay: Path) -> None:
        """Make ``overlay`` (an existing qcow2 whose backing file is the current
        top) the root disk's new top: the old top is frozen from now on."""
        await self._cmd(
            "blockdev-snapshot-sync",
            {"device": "root", "snapshot-file": str(overlay), "format": "qcow2", "mode": "existing"},
        )

    async def shutdown(self) -> None:
        """Stop QEMU for good: QMP quit, then SIGKILL if it lingers; always reaps."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._qmp.execute("quit"), 2)
        with contextlib.suppress(Exception):
            await self._qmp.disconnect()
        deadline = time.monotonic() + 3
        while self.alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        if self._proc is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._proc.wait)
        else:
            while _pid_alive(self.pid):
                await asyncio.sleep(0.005)

    async def disconnect(self) -> None:
        with contextlib.suppress(Exception):
            await self._qmp.disconnect()
