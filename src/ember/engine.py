"""The VM engine: launch from snapshots, exec and files, suspend, resume, fork.

Every lifecycle call takes the VM's lock, checks the transition against
:data:`ember.models.TRANSITIONS`, persists the intermediate state first (so a
daemon killed mid-way knows what was in flight) and cleans up fully when it
fails: nothing half-created survives an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ember.agent import AgentConnection, ExecRequest, ExecResult
from ember.config import Settings
from ember.errors import (
    AgentUnavailable,
    EmberError,
    ImageNotFound,
    InvalidRequest,
    NameTaken,
    SnapshotError,
    VmmError,
    VmNotFound,
)
from ember.guest.protocol import DirEntry
from ember.images import ImageStore
from ember.models import ImageRecord, StopReason, VmRecord, VmState, check_transition, require_running
from ember.runtime import Host, VmRuntime, create_overlay
from ember.snapshot import (
    StreamTap,
    check_digest,
    hash_file,
    load_manifest,
    new_manifest,
    raise_storage,
    staging,
    verify,
    write_manifest,
)
from ember.store import Store
from ember.vmm.accel import AccelChoice
from ember.vmm.machine import RamMode
from ember.vmm.qemu import QemuVmm

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


def new_vm_id() -> str:
    return "vm-" + secrets.token_hex(6)


class Phases:
    """Wall time of each step of one lifecycle operation, in milliseconds."""

    def __init__(self) -> None:
        self._start = self._last = time.perf_counter()
        self.ms: dict[str, float] = {}

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.ms[name] = round((now - self._last) * 1000, 1)
        self._last = now

    @property
    def total_ms(self) -> float:
        return (time.perf_counter() - self._start) * 1000


@dataclass(frozen=True)
class Timings:
    total_ms: float
    phases_ms: dict[str, float]
    bytes_written: int = 0


class VmLog(logging.LoggerAdapter[logging.Logger]):
    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return f"[{self.extra['vm'] if self.extra else '-'}] {msg}", kwargs


def vlog(vm_id: str) -> VmLog:
    return VmLog(log, {"vm": vm_id})


class Engine:
    def __init__(self, settings: Settings, store: Store, host: Host, images: ImageStore, accel: AccelChoice) -> None:
        self.settings = settings
        self.store = store
        self.host = host
        self.images = images
        self.accel = accel
        self._runtimes: dict[str, VmRuntime] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._watchers: dict[str, asyncio.Task[None]] = {}

    # ---- helpers ---------------------------------------------------------

    def _lock(self, vm_id: str) -> asyncio.Lock:
        return self._locks.setdefault(vm_id, asyncio.Lock())

    def get(self, vm_id: str) -> VmRecord:
        record = self.store.get_vm(vm_id)
        if record is None:
            raise VmNotFound(vm_id)
        return record

    def list_vms(self) -> list[VmRecord]:
        return self.store.list_vms()

    def _save(self, record: VmRecord) -> VmRecord:
        self.store.update_vm(record)
        return record

    def _runtime(self, record: VmRecord, action: str) -> VmRuntime:
        require_running(record.id, record.state, action)
        runtime = self._runtimes.get(record.id)
        if runtime is None or runtime.agent.closed:
            raise AgentUnavailable(f"VM {record.id} is not answering; inspect it with 'ember inspect {record.id}'")
        return runtime

    def _watch(self, vm_id: str, vmm: QemuVmm) -> None:
        """Notice a VMM that dies on its own (crash, OOM kill) and mark the VM failed."""

        async def watch() -> None:
            while vmm.alive():
                await asyncio.sleep(0.25)
            async with self._lock(vm_id):
                record = self.store.get_vm(vm_id)
                if record is None or self._runtimes.get(vm_id) is None or self._runtimes[vm_id].vmm is not vmm:
                    return
                vlog(vm_id).error("VMM exited unexpectedly; marking the VM FAILED")
                runtime = self._runtimes.pop(vm_id)
                await self.host.stop(vm_id, runtime)
                self._save(record.moved(VmState.FAILED, StopReason.VMM_EXITED.value, pid=0))

        self._watchers[vm_id] = asyncio.create_task(watch(), name=f"watch-{vm_id}")

    def _unwatch(self, vm_id: str) -> None:
        task = self._watchers.pop(vm_id, None)
        if task is not None:
            task.cancel()

    async def _restore_vmm(
        self, record: VmRecord, state_file: Path, expected: Any, ram: RamMode, ram_file: Path | None,
        ignore_shared: bool, extra_gid: int, phases: Phases,
    ) -> tuple[VmRuntime, str]:  # fmt: skip
        """Start QEMU paused, load a snapshot into it, run it, and give the guest a fresh identity.

        ``record.token`` is the token the snapshot's agent knows; a new one is
        minted, recorded as ``next_token`` before it is sent (so a daemon
        killed mid-way can still authenticate) and returned.
        """
        layout = self.host.layout(record.id)
        self.host.prepare_run_dir(layout, record.uid)
        paths = layout.run_paths(ram_file)
        vmm = await self.host.start_vmm(record.id, record.machine, paths, ram, True, record.uid, extra_gid)
        phases.mark("start_vmm")
        agent: AgentConnection | None = None
        try:
            # connect before the guest runs: the port is then never seen closed
            agent = await AgentConnection.open(paths.agent_socket, self.settings.agent_timeout_s)
            tap = StreamTap.source(state_file)
            try:
                await vmm.load_state(tap.fd, ignore_shared)
            finally:
                digest = tap.finish()
            check_digest(state_file, expected, digest)  # refuse before the guest runs
            phases.mark("load_state")
            await vmm.resume()
            await agent.authenticate(record.token, self.settings.agent_timeout_s)
            phases.mark("agent_ready")
            new_token = secrets.token_hex(16)
            self._save(replace(record, next_token=new_token))
            await agent.restore_identity(
                hostname=record.id, new_token=new_token, entropy=os.urandom(64), time_ns=time.time_ns()
            )
            phases.mark("new_identity")
            return VmRuntime(record.id, vmm, agent), new_token
        except BaseException:
            await self.host.stop(record.id, VmRuntime(record.id, vmm, agent) if agent else None)
            if agent is None:
                await vmm.shutdown()
            raise

    # ---- launch ------------------------------------------------------------

    async def run(self, image_name: str) -> VmRecord:
        image = self.images.get(image_name)
        snap = self.images.verified_snapshot(image)
        vm_id = new_vm_id()
        uid = self.store.free_uid(self.settings.uid_base, self.settings.uid_count)
        record = VmRecord(
            id=vm_id, image=image.name, state=VmState.PENDING, machine=image.machine, uid=uid,
            token=image.token, ram=RamMode.CLONE,
        )  # fmt: skip
        self.store.insert_vm(record)
        layout = self.host.layout(vm_id)
        phases = Phases()
        async with self._lock(vm_id):
            try:
                self.host.prepare_run_dir(layout, uid)
                create_overlay(self.images.disk(image), layout.disk, uid)
                phases.mark("disk_overlay")
                runtime, token = await self._restore_vmm(
                    record, snap.state_file, snap.manifest.files["state"], RamMode.CLONE,
                    self.images.ram(image), True, image.gid, phases,
                )  # fmt: skip
            except BaseException:
                await self.host.teardown(vm_id, None)
                self.store.delete_vm(vm_id)
                raise
            self._runtimes[vm_id] = runtime
            self._watch(vm_id, runtime.vmm)
            record = self._save(record.moved(VmState.RUNNING, pid=runtime.vmm.pid, token=token, next_token=""))
        vlog(vm_id).info("launched from %s in %.0f ms %s", image.name, phases.total_ms, phases.ms)
        return record

    # ---- guest operations --------------------------------------------------

    async def exec(
        self, vm_id: str, req: ExecRequest, stdin: AsyncIterator[bytes] | None
    ) -> AsyncIterator[tuple[str, bytes] | ExecResult]:
        runtime = self._runtime(self.get(vm_id), "exec in")
        return runtime.agent.exec(req, stdin)

    async def write_file(self, vm_id: str, path: str, data: AsyncIterator[bytes], mode: int, mkdirs: bool) -> int:
        _check_guest_path(path)
        runtime = self._runtime(self.get(vm_id), "copy files into")
        return await runtime.agent.write_file(path, data, mode, mkdirs)

    async def read_file(self, vm_id: str, path: str) -> tuple[int, AsyncIterator[bytes]]:
        _check_guest_path(path)
        runtime = self._runtime(self.get(vm_id), "copy files from")
        return await runtime.agent.read_file(path)

    async def list_dir(self, vm_id: str, path: str) -> list[DirEntry]:
        _check_guest_path(path)
        runtime = self._runtime(self.get(vm_id), "list files in")
        return await runtime.agent.list_dir(path)

    async def inspect(self, vm_id: str) -> dict[str, Any]:
        record = self.get(vm_id)
        info: dict[str, Any] = {"vmm_status": None}
        runtime = self._runtimes.get(vm_id)
        if record.state is VmState.RUNNING and runtime is not None:
            with contextlib.suppress(VmmError):
                info["vmm_status"] = await runtime.vmm.status()
        return info

    # ---- suspend / resume ------------------------------------------------

    async def suspend(self, vm_id: str) -> Timings:
        async with self._lock(vm_id):
            record = self.get(vm_id)
            check_transition(vm_id, record.state, VmState.SUSPENDING, "suspend")
            runtime = self._runtime(record, "suspend")
            phases = Phases()
            record = self._save(record.moved(VmState.SUSPENDING))
            layout = self.host.layout(vm_id)
            try:
                await runtime.agent.sync()
                phases.mark("guest_sync")
                with staging(layout.suspend_dir) as tmp:
                    tap = StreamTap.sink(tmp / "state")
                    try:
                        await runtime.vmm.save_state(tap.fd, ignore_shared=False)
                    finally:
                        state = tap.finish()
                    phases.mark("save_state")
                    self._unwatch(vm_id)
                    self._runtimes.pop(vm_id, None)
                    await self.host.stop(vm_id, runtime)
                    phases.mark("stop_vmm")
                    os.rename(layout.disk, tmp / "disk.qcow2")
                    disk = await asyncio.to_thread(hash_file, tmp / "disk.qcow2")
                    phases.mark("hash_disk")
                    manifest = new_manifest("suspend", record.machine, {"state": state, "disk.qcow2": disk}, False)
                    write_manifest(tmp, manifest)
                phases.mark("commit")
            except BaseException as exc:
                await self._suspend_failed(record, runtime, exc)
                raise
            self._save(record.moved(VmState.SUSPENDED, StopReason.USER.value, pid=0))
            vlog(vm_id).info("suspended in %.0f ms (%d bytes of state) %s", phases.total_ms, state.size, phases.ms)
            return Timings(phases.total_ms, phases.ms, state.size)

    async def _suspend_failed(self, record: VmRecord, runtime: VmRuntime, exc: BaseException) -> None:
        layout = self.host.layout(record.id)
        if self._runtimes.get(record.id) is runtime and runtime.vmm.alive():
            vlog(record.id).warning("suspend failed (%s); the VM keeps running", exc)
            with contextlib.suppress(EmberError):
                await runtime.vmm.resume()
            self._save(record.moved(VmState.RUNNING, f"suspend failed: {exc}"))
            return
        # The VMM already stopped: put the disk back and give up on this VM.
        for stray in layout.root.glob(".suspend.tmp-*/disk.qcow2"):
            os.rename(stray, layout.disk)
        self._save(record.moved(VmState.FAILED, f"suspend failed after the VMM stopped: {exc}", pid=0))

    async def resume(self, vm_id: str) -> Timings:
        async with self._lock(vm_id):
            record = self.get(vm_id)
            check_transition(vm_id, record.state, VmState.RESUMING, "resume")
            phases = Phases()
            layout = self.host.layout(vm_id)
            manifest = load_manifest(layout.suspend_dir)
            await asyncio.to_thread(verify, layout.suspend_dir, manifest, ["disk.qcow2"])
            phases.mark("verify_disk")
            record = self._save(record.moved(VmState.RESUMING))
            os.rename(layout.suspend_dir / "disk.qcow2", layout.disk)
            try:
                # the disk overlay still reads its image's disk: keep the image's group
                image = self.images.get(record.image)
                runtime, token = await self._restore_vmm(
                    record, layout.suspend_dir / "state", manifest.files["state"], RamMode.PRIVATE, None, False,
                    image.gid, phases,
                )  # fmt: skip
            except BaseException as exc:
                os.rename(layout.disk, layout.suspend_dir / "disk.qcow2")
                reason = f"resume failed: {exc}"
                vlog(vm_id).error(reason)
                self._save(record.moved(VmState.SUSPENDED, reason))
                raise
            shutil.rmtree(layout.suspend_dir)
            self._runtimes[vm_id] = runtime
            self._watch(vm_id, runtime.vmm)
            self._save(
                record.moved(VmState.RUNNING, pid=runtime.vmm.pid, ram=RamMode.PRIVATE, token=token, next_token="")
            )
            phases.mark("commit")
            vlog(vm_id).info("resumed in %.0f ms %s", phases.total_ms, phases.ms)
            return Timings(phases.total_ms, phases.ms)

    # ---- snapshot (fork) -------------------------------------------------

    async def snapshot(self, vm_id: str, name: str) -> ImageRecord:
        if not NAME_RE.match(name):
            raise InvalidRequest(f"bad image name {name!r}: use lowercase letters, digits, '.', '_' or '-'")
        if self.store.get_image(name) is not None:
            raise NameTaken(f"an image named '{name}' exists: pick another name or remove it first")
        async with self._lock(vm_id):
            record = self.get(vm_id)
            runtime = self._runtime(record, "snapshot")
            await runtime.agent.sync()
            stream = self.images.staging_stream(name)
            try:
                tap = StreamTap.sink(stream)
                try:
                    await runtime.vmm.save_state(tap.fd, ignore_shared=False)
                finally:
                    digest = tap.finish()
                disk_copy = stream.with_name(stream.name + ".disk")
                shutil.copyfile(self.host.layout(vm_id).disk, disk_copy)
            except OSError as exc:
                raise_storage(exc, "snapshotting the VM")
            finally:
                with contextlib.suppress(EmberError):
                    await runtime.vmm.resume()
        try:
            image = await self.images.from_stream(name, record, stream, digest, disk_copy)
        finally:
            stream.unlink(missing_ok=True)
            disk_copy.unlink(missing_ok=True)
        vlog(vm_id).info("snapshotted into image %s", name)
        return image

    # ---- remove ------------------------------------------------------------

    async def remove(self, vm_id: str) -> None:
        async with self._lock(vm_id):
            record = self.get(vm_id)
            self._save(record.moved(VmState.TERMINATING, StopReason.USER.value))
            self._unwatch(vm_id)
            await self.host.teardown(vm_id, self._runtimes.pop(vm_id, None))
            self.store.delete_vm(vm_id)
        self._locks.pop(vm_id, None)
        vlog(vm_id).info("removed")

    # ---- daemon start / stop -------------------------------------------

    async def recover(self) -> None:
        """Re-adopt what a previous daemon left running; reap or fail the rest."""
        keep: set[str] = set()
        for record in self.store.list_vms():
            try:
                if await self._recover_one(record):
                    keep.add(record.id)
            except Exception as exc:  # one broken VM must not stop the daemon
                vlog(record.id).exception("recovery failed: %s", exc)
                await self.host.stop(record.id, None)
                self._save(record.moved(VmState.FAILED, f"recovery failed: {exc}", pid=0))
        for name in self.host.cgroups.names():
            if name not in keep:
                log.warning("reaping leftover VMM cgroup %s", name)
                await asyncio.get_running_loop().run_in_executor(None, self.host.cgroups.destroy, name)
        known = {vm.id for vm in self.store.list_vms()}
        if self.settings.vms_dir.exists():
            for stray in self.settings.vms_dir.iterdir():
                if stray.name not in known:
                    log.warning("removing files of unknown VM %s", stray.name)
                    shutil.rmtree(stray, ignore_errors=True)
        self.images.clean_staging()

    async def _recover_one(self, record: VmRecord) -> bool:
        layout = self.host.layout(record.id)
        for stray in layout.root.glob(".suspend.tmp-*"):
            with contextlib.suppress(FileNotFoundError):
                os.rename(stray / "disk.qcow2", layout.disk)
            shutil.rmtree(stray, ignore_errors=True)
        alive = record.pid > 0 and record.pid in self.host.cgroup_pids(record.id)
        if record.state is VmState.SUSPENDED:
            await self.host.stop(record.id, None)
            return False
        if record.state in (VmState.TERMINATING, VmState.PENDING):
            await self.host.teardown(record.id, None)
            self.store.delete_vm(record.id)
            return False
        if record.state is VmState.FAILED or not alive:
            await self.host.stop(record.id, None)
            if (
                record.state in (VmState.SUSPENDING, VmState.RESUMING)
                and (layout.suspend_dir / "manifest.json").exists()
            ):
                if layout.disk.exists() and not (layout.suspend_dir / "disk.qcow2").exists():
                    os.rename(layout.disk, layout.suspend_dir / "disk.qcow2")  # checked against its hash on resume
                self._save(record.moved(VmState.SUSPENDED, StopReason.DAEMON_RESTART.value, pid=0))
            elif record.state is not VmState.FAILED:
                vlog(record.id).error("VMM gone after a daemon restart; marking FAILED")
                self._save(record.moved(VmState.FAILED, StopReason.VMM_EXITED.value, pid=0))
            return False
        # The VMM is alive: ask it, then re-attach to the agent.
        paths = layout.run_paths(None)
        vmm = await QemuVmm.adopt(record.pid, paths)
        status = await vmm.status()
        if status != "running":
            await vmm.resume()  # an interrupted suspend or resume left it paused
        agent, token = None, ""
        for token in filter(None, (record.next_token, record.token)):
            with contextlib.suppress(AgentUnavailable):
                agent = await AgentConnection.connect(paths.agent_socket, token, 5)
                break
        if agent is None:
            await vmm.shutdown()
            raise SnapshotError("the guest agent did not accept this VM's token")
        if record.state is VmState.RESUMING:
            # the interrupted restore may not have reached the identity step
            await agent.restore_identity(record.id, token, os.urandom(64), time.time_ns())
            shutil.rmtree(layout.suspend_dir, ignore_errors=True)
        self._runtimes[record.id] = VmRuntime(record.id, vmm, agent)
        self._watch(record.id, vmm)
        reason = StopReason.DAEMON_RESTART.value if status != "running" else ""
        self._save(record.moved(VmState.RUNNING, reason, token=token, next_token=""))
        vlog(record.id).info("re-adopted running VM (pid %d)", record.pid)
        return True

    async def close(self) -> None:
        """Daemon shutdown: detach from VMs but leave them running for the next daemon."""
        for vm_id in list(self._watchers):
            self._unwatch(vm_id)
        for runtime in self._runtimes.values():
            await runtime.agent.close()
            await runtime.vmm.disconnect()
        self._runtimes.clear()


def _check_guest_path(path: str) -> None:
    if not path.startswith("/"):
        raise InvalidRequest(f"guest path {path!r} must be absolute (start with '/')")
    if "\0" in path or len(path) > 4096:
        raise InvalidRequest("guest path is malformed")


__all__ = ["Engine", "ImageNotFound", "Timings"]
