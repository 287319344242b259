"""QEMU ``microvm`` behind the :class:`Vmm` interface, driven over QMP.

The VMM is the source of truth for a running VM: :meth:`QemuVmm.status` asks
QEMU, nothing here caches a guess. Migration streams (snapshots, suspend)
travel through file descriptors the daemon opens and passes over the QMP
socket (``getfd``), and so do its sockets, serial log and read-only disks at
start (see ``machine.FD_*``): the jailed QEMU needs no access to those paths
and its seccomp filter can forbid spawning processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import secrets
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from qemu.qmp import QMPClient
from qemu.qmp.error import QMPError

from ember.errors import VmmError, logged

log = logging.getLogger(__name__)

# A QMP command's answer: QEMU answers in milliseconds, but a VMM that is stuck (or a guest escaped into it)
# may never; every caller, recovery at the daemon's start-up first, must get an error rather than wait forever.
QMP_TIMEOUT_S = 30.0
MIGRATION_STALL_S = 60.0  # a save that moves nothing for this long is given up (QemuVmm._migrated)
CANCEL_WAIT_S = 5.0  # a given-up save's migrate_cancel, until QEMU says it is over
MAX_BANDWIDTH = 100 * 1024**3  # the default throttle made snapshots 4x slower


@dataclass(frozen=True)
class ControlDir:
    """A VMM's root-owned control directory (``<data>/run/<id>``): the QMP and agent
    sockets the daemon binds, the serial and VMM logs the daemon opens, and the empty
    mount point of the jail's root. No VMM uid can write it, so the daemon may use these
    paths (a restarted daemon reconnects through them)."""

    path: Path

    @property
    def qmp_socket(self) -> Path:
        return self.path / "qmp.sock"

    @property
    def agent_socket(self) -> Path:
        return self.path / "agent.sock"

    @property
    def serial_log(self) -> Path:
        return self.path / "serial.log"

    @property
    def vmm_log(self) -> Path:
        return self.path / "vmm.log"

    @property
    def jail_root(self) -> Path:
        return self.path / "root"

    def log_tail(self, limit: int = 2000) -> str:
        return _tail(self.vmm_log, limit)


def _tail(path: Path, limit: int) -> str:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return ""
    try:
        size = os.fstat(fd).st_size
        return os.pread(fd, limit, max(0, size - limit)).decode(errors="replace")
    finally:
        os.close(fd)


class Vmm(Protocol):
    """What the engine needs from a running VMM, whatever the backend (QEMU here)."""

    pid: int

    async def status(self) -> str: ...
    async def pause(self) -> None: ...
    async def resume(self) -> None: ...
    async def save_state(self, fd: int, ignore_shared: bool) -> None: ...
    async def load_state(self, fd: int, ignore_shared: bool) -> None: ...
    async def save_mapped(self, fd: int) -> None: ...
    async def load_mapped(self, fd: int) -> None: ...
    async def switch_disk(self, overlay: Path) -> None: ...
    async def shutdown(self) -> None: ...
    async def disconnect(self) -> None: ...
    async def wait_exit(self) -> None: ...
    def alive(self) -> bool: ...


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def spawn(argv: list[str], fds: list[int], log_fd: int) -> int:
    """Start ``argv`` in a new session with ``fds`` at 3, 4, ... and stdout/stderr into
    ``log_fd``; stdin is /dev/null. Returns the pid (the caller reaps it)."""
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 64) for fd in fds]  # no clash with targets 3..
    try:
        actions = [(os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                   (os.POSIX_SPAWN_DUP2, log_fd, 1), (os.POSIX_SPAWN_DUP2, log_fd, 2)]  # fmt: skip
        actions += [(os.POSIX_SPAWN_DUP2, fd, 3 + i) for i, fd in enumerate(high)]
        return os.posix_spawn(argv[0], argv, {}, file_actions=actions, setsid=True)
    finally:
        for fd in high:
            os.close(fd)


class QemuVmm:
    def __init__(self, pid: int, control: ControlDir, qmp: QMPClient, *, child: bool) -> None:
        self.pid = pid
        self.control = control
        self._qmp = qmp
        self._child = child  # this daemon started it, so it must reap it
        self._exited = False
        self._node = "root"  # the root disk's current top node
        self._lock = asyncio.Lock()

    # ---- lifecycle -------------------------------------------------------

    @classmethod
    async def start(cls, argv: list[str], fds: list[int], control: ControlDir) -> QemuVmm:
        """Run ``argv`` (the jailer, then QEMU) with the daemon's ``fds``; connect to QMP."""
        log_fd = os.open(control.vmm_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            pid = spawn(argv, fds, log_fd)
        finally:
            os.close(log_fd)
        vmm = cls(pid, control, QMPClient(f"ember-{pid}"), child=True)
        try:
            await vmm._connect(deadline=time.monotonic() + 10)
        except BaseException:
            await vmm.shutdown()
            raise
        return vmm

    @classmethod
    async def adopt(cls, pid: int, control: ControlDir) -> QemuVmm:
        """Re-attach to a QEMU a previous daemon started."""
        if not _pid_alive(pid):
            raise VmmError(f"QEMU process {pid} is gone")
        vmm = cls(pid, control, QMPClient(f"ember-{pid}"), child=False)
        await vmm._connect(deadline=time.monotonic() + 10)
        return vmm

    async def _connect(self, deadline: float) -> None:
        while True:
            if not self.alive():
                tail = self.control.log_tail().strip() or "no output"
                raise VmmError(logged("QEMU exited during start-up", f"its log: {tail}"))
            try:  # the socket exists from the start: a slow QEMU answers its greeting late, a dead one never
                attempt_s = min(2.0, max(0.1, deadline - time.monotonic()))
                async with asyncio.timeout(attempt_s):  # not wait_for: a cancellation is never swallowed
                    await self._qmp.connect(str(self.control.qmp_socket))
                return
            except (QMPError, OSError, TimeoutError):
                with contextlib.suppress(Exception):
                    await self._qmp.disconnect()
                self._qmp = QMPClient(f"ember-{self.pid}")
            if time.monotonic() > deadline:
                tail = self.control.log_tail().strip() or "no output"
                raise VmmError(logged(f"QEMU {self.pid} did not answer on its QMP socket in time", f"its log: {tail}"))
            await asyncio.sleep(0.005)

    def alive(self) -> bool:
        if self._exited:
            return False
        if self._child:
            try:
                self._exited = os.waitpid(self.pid, os.WNOHANG)[0] == self.pid
            except ChildProcessError:
                self._exited = True
            return not self._exited
        return _pid_alive(self.pid)

    async def wait_exit(self) -> None:
        """Return once the process has exited (and is reaped, if it is ours)."""
        try:
            pidfd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            self.alive()
            return
        loop = asyncio.get_running_loop()
        exited: asyncio.Future[None] = loop.create_future()

        def readable() -> None:
            if not exited.done():
                exited.set_result(None)

        loop.add_reader(pidfd, readable)
        try:
            if self.alive():  # it may have exited before the pidfd was open
                await exited
        finally:
            loop.remove_reader(pidfd)
            os.close(pidfd)
        self.alive()  # reaps our child

    async def _execute(self, name: str, args: dict[str, Any] | None = None) -> Any:
        """One QMP command, answered within QMP_TIMEOUT_S (VmmError otherwise); QEMU's own errors as they come."""
        try:  # asyncio.timeout, not wait_for: a cancellation (a shutdown) is never swallowed by a late answer
            async with asyncio.timeout(QMP_TIMEOUT_S):
                return await self._qmp.execute(name, args)
        except TimeoutError:
            raise VmmError(f"QEMU {self.pid} did not answer QMP {name} within {QMP_TIMEOUT_S:.0f} s") from None

    async def _cmd(self, name: str, args: dict[str, Any] | None = None) -> Any:
        try:
            return await self._execute(name, args)
        except (QMPError, OSError, EOFError) as exc:
            raise VmmError(logged(f"QMP {name} failed", repr(exc))) from exc

    async def status(self) -> str:
        result = await self._cmd("query-status")
        return str(result["status"])

    async def pause(self) -> None:
        await self._cmd("stop")

    async def resume(self) -> None:
        await self._cmd("cont")

    async def _set_caps(self, ignore_shared: bool, *, mapped_ram: bool = False) -> None:
        caps = {"x-ignore-shared": ignore_shared, "mapped-ram": mapped_ram}
        await self._cmd(
            "migrate-set-capabilities", {"capabilities": [{"capability": k, "state": v} for k, v in caps.items()]}
        )

    async def _add_fd(self, fd: int) -> int:
        """Put ``fd`` into a new fdset of QEMU's (for ``file:/dev/fdset/N`` URIs); returns N."""
        self._qmp.send_fd_scm(fd)
        return int((await self._cmd("add-fd", {}))["fdset-id"])

    async def _remove_fdset(self, fdset: int) -> None:
        with contextlib.suppress(VmmError):  # a migration may have closed it already
            await self._cmd("remove-fd", {"fdset-id": fdset})

    async def _migrated(self) -> None:
        """Wait for the migration to complete; VmmError if it fails or makes no progress (its state and the RAM
        it moved) for MIGRATION_STALL_S: a stuck QEMU never holds the VMM's lock for good."""
        seen, since = None, time.monotonic()
        while True:
            info = await self._cmd("query-migrate")
            state = info.get("status")
            if state == "completed":
                return
            if state in ("failed", "cancelled"):
                raise VmmError(f"saving VM state failed: {info.get('error-desc', state)}")
            ram = info.get("ram") or {}
            progress = (state, ram.get("transferred"), ram.get("remaining"), ram.get("dirty-sync-count"))
            if progress != seen:
                seen, since = progress, time.monotonic()
            elif time.monotonic() - since > MIGRATION_STALL_S:
                raise VmmError(f"saving VM state made no progress for {MIGRATION_STALL_S:.0f} s (QEMU is stuck)")
            await asyncio.sleep(0.002)

    async def _saved(self) -> None:
        """:meth:`_migrated`; a save given up (stalled, failed, or its caller's deadline) is cancelled in QEMU too,
        else it would go on and, if it ever completed, stop a guest the engine has resumed."""
        try:
            await self._migrated()
        except BaseException:
            await asyncio.shield(self._cancel_migration())
            raise

    async def _cancel_migration(self) -> None:
        with contextlib.suppress(VmmError, TimeoutError):
            async with asyncio.timeout(CANCEL_WAIT_S):
                await self._cmd("migrate_cancel")
                over = ("cancelled", "failed", "completed", None)
                while (await self._cmd("query-migrate")).get("status") not in over:
                    await asyncio.sleep(0.01)
                return
        log.warning("QEMU %d: a given-up save could not be cancelled within %.0f s", self.pid, CANCEL_WAIT_S)

    async def _loaded(self) -> None:
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

    async def _pass_fd(self, fd: int, name: str) -> None:
        with contextlib.suppress(QMPError, OSError, EOFError):  # usually gone: a migration closes its fd
            await self._execute("closefd", {"fdname": name})
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
            await self._saved()

    async def load_state(self, fd: int, ignore_shared: bool) -> None:
        """Feed a saved state into a QEMU started with ``-incoming defer``; leaves it paused."""
        async with self._lock:
            await self._set_caps(ignore_shared)
            await self._pass_fd(fd, "ember-load")
            await self._cmd("migrate-incoming", {"uri": "fd:ember-load"})
            await self._loaded()

    async def save_mapped(self, fd: int) -> None:
        """Pause the guest and write all of it into the file ``fd`` (opened write-only) with
        QEMU's ``mapped-ram``: each non-zero guest page at its own offset (see
        ``snapshot.mapped_ram_offset``), zero pages skipped, the device state after them."""
        async with self._lock:
            await self._cmd("stop")
            await self._set_caps(False, mapped_ram=True)
            await self._cmd("migrate-set-parameters", {"max-bandwidth": MAX_BANDWIDTH})
            fdset = await self._add_fd(fd)
            try:
                await self._cmd("migrate", {"uri": f"file:/dev/fdset/{fdset}"})
                await self._saved()
            finally:
                await self._remove_fdset(fdset)

    async def load_mapped(self, fd: int) -> None:
        """Load a ``mapped-ram`` file (``fd`` opened read-only) into a QEMU started with
        ``-incoming defer`` whose RAM is that same file (at its pages' offset): every page is
        already in place, so the load reads the device state and copies pages onto themselves."""
        async with self._lock:
            await self._set_caps(False, mapped_ram=True)
            fdset = await self._add_fd(fd)
            try:
                await self._cmd("migrate-incoming", {"uri": f"file:/dev/fdset/{fdset}"})
                await self._loaded()
            finally:
                await self._remove_fdset(fdset)

    async def switch_disk(self, overlay: Path) -> None:
        """Make ``overlay`` (an existing qcow2 whose backing file is the current
        top, at a path inside the VMM's jail) the root disk's new top: the old top
        is frozen from now on."""
        node = f"top{secrets.token_hex(4)}"
        await self._cmd(
            "blockdev-snapshot-sync",
            {"node-name": self._node, "snapshot-file": str(overlay), "snapshot-node-name": node,
             "format": "qcow2", "mode": "existing"},
        )  # fmt: skip
        self._node = node

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
        while self.alive():
            await asyncio.sleep(0.005)

    async def disconnect(self) -> None:
        with contextlib.suppress(Exception):
            await self._qmp.disconnect()
