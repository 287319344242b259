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
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ember.agent import AgentConnection, ChannelLimits, ExecRequest, ExecResult, Listing, identity_request
from ember.config import Settings
from ember.errors import (
    AgentUnavailable,
    Conflict,
    EmberError,
    GuestError,
    ImageNotFound,
    InvalidRequest,
    VmmError,
    VmNotFound,
)
from ember.images import ImageStore
from ember.logs import vlog
from ember.models import FileDigest, ImageRecord, StopReason, VmRecord, VmState, check_transition, require_running
from ember.pool import WarmPool, new_vm_id
from ember.runtime import VM_FILES, Host, VmRuntime, create_overlay, move_files, new_ram_file
from ember.snapshot import (
    StreamTap,
    durable,
    hash_file,
    load_manifest,
    load_verified,
    new_manifest,
    raise_storage,
    staging,
    unwritten_bytes,
    verify_files,
    write_manifest,
)
from ember.store import Store
from ember.vmm.machine import MachineConfig, RamMode
from ember.vmm.qemu import QemuVmm

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


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


class Engine:
    def __init__(self, settings: Settings, store: Store, host: Host, images: ImageStore) -> None:
        self.settings = settings
        self.store = store
        self.host = host
        self.images = images
        self._runtimes: dict[str, VmRuntime] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._watchers: dict[str, asyncio.Task[None]] = {}
        self._chores: set[asyncio.Task[Any]] = set()
        self._reserved_uids: set[int] = set()  # handed to pooled VMMs, not yet in the store
        self.pool = WarmPool(host, settings.pool_size, self._allocate_uid, self._reserved_uids.discard)

    # ---- helpers ---------------------------------------------------------

    def _lock(self, vm_id: str) -> asyncio.Lock:
        """The VM's lock, made only for a VM that exists: unknown ids never grow the table."""
        lock = self._locks.get(vm_id)
        if lock is None:
            self.get(vm_id)
            lock = self._locks[vm_id] = asyncio.Lock()
        return lock

    def get(self, vm_id: str) -> VmRecord:
        record = self.store.get_vm(vm_id)
        if record is None:
            raise VmNotFound(vm_id)
        return record

    def list_vms(self) -> list[VmRecord]:
        return self.store.list_vms()

    def save(self, record: VmRecord) -> VmRecord:
        self.store.update_vm(record)
        return record

    def _runtime(self, record: VmRecord, action: str) -> VmRuntime:
        require_running(record.id, record.state, action)
        runtime = self._runtimes.get(record.id)
        if runtime is None or runtime.agent.closed:
            raise AgentUnavailable(f"VM {record.id} is not answering; inspect it with 'ember inspect {record.id}'")
        return runtime

    def _watch(self, vm_id: str, vmm: QemuVmm) -> None:
        """Notice a VMM that dies on its own (crash, OOM kill) and mark the VM failed;
        keep its serial log bounded."""

        async def watch() -> None:
            while vmm.alive():
                if self.host.cap_serial_log(vm_id):
                    vlog(vm_id).warning("guest serial output passed 1 MiB; log truncated")
                await asyncio.sleep(0.25)
            async with self._lock(vm_id):
                record = self.store.get_vm(vm_id)
                if record is None or self._runtimes.get(vm_id) is None or self._runtimes[vm_id].vmm is not vmm:
                    return
                vlog(vm_id).error("VMM exited unexpectedly; marking the VM FAILED")
                runtime = self._runtimes.pop(vm_id)
                await self.host.stop(vm_id, runtime)
                self.save(record.moved(VmState.FAILED, StopReason.VMM_EXITED.value, pid=0))

        self._watchers[vm_id] = asyncio.create_task(watch(), name=f"watch-{vm_id}")

    def take_charge(
        self, record: VmRecord, runtime: VmRuntime, token: str, reason: str = "", ram: RamMode | None = None
    ) -> VmRecord:
        """A VM now runs in ``runtime`` (launched, resumed, or re-adopted after a daemon
        restart): watch its VMM and record it RUNNING with the agent's current token."""
        self._runtimes[record.id] = runtime
        self._watch(record.id, runtime.vmm)
        return self.save(
            record.moved(
                VmState.RUNNING, reason, pid=runtime.vmm.pid, token=token, next_token="", ram=ram or record.ram
            )
        )

    def _background(self, work: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(work)
        self._chores.add(task)
        task.add_done_callback(self._chores.discard)

    def _unwatch(self, vm_id: str) -> None:
        task = self._watchers.pop(vm_id, None)
        if task is not None:
            task.cancel()

    async def _start_paused(
        self, vm_id: str, uid: int, machine: MachineConfig, ram: RamMode, ram_file: Path, extra_gid: int
    ) -> tuple[QemuVmm, AgentConnection]:
        """Start a jailed QEMU waiting for a snapshot, and open (not yet use) its agent socket."""
        layout = self.host.layout(vm_id)
        self.host.prepare_run_dir(layout, uid)
        paths = layout.run_paths(ram_file)
        vmm = await self.host.start_vmm(vm_id, machine, paths, ram, True, uid, extra_gid)
        try:
            # connected before the guest runs, the port is never seen closed by the guest
            agent = await AgentConnection.open(
                paths.agent_socket, self.settings.agent_timeout_s, limits=ChannelLimits.of(self.settings)
            )
            return vmm, agent
        except BaseException:
            await vmm.shutdown()
            raise

    async def _start_clone(self, vm_id: str, uid: int, image: ImageRecord) -> tuple[QemuVmm, AgentConnection]:
        layout = self.host.layout(vm_id)
        layout.root.mkdir(mode=0o711)
        create_overlay(self.images.disk(image), layout.disk, uid)
        return await self._start_paused(vm_id, uid, image.machine, RamMode.CLONE, self.images.ram(image), image.gid)

    async def _activate(
        self, record: VmRecord, vmm: QemuVmm, agent: AgentConnection, state_file: Path, expected: FileDigest,
        ignore_shared: bool, phases: Phases,
    ) -> tuple[VmRuntime, str]:  # fmt: skip
        """Load a snapshot into a paused VMM, then run it with a fresh identity (see _give_identity)."""
        try:
            await load_verified(vmm, state_file, expected, ignore_shared)
        except BaseException:
            await self.host.stop(record.id, VmRuntime(record.id, vmm, agent))
            raise
        phases.mark("load_state")
        return await self._give_identity(record, vmm, agent, phases, first_contact=True)

    async def _give_identity(
        self, record: VmRecord, vmm: QemuVmm, agent: AgentConnection, phases: Phases, first_contact: bool
    ) -> tuple[VmRuntime, str]:
        """Let a restored, paused guest run and give it this VM's identity: a fresh RNG seed,
        the host's clock, the VM id as hostname, and a new agent token.

        ``record.token`` is the token the guest's agent knows; the new one is
        recorded as ``next_token`` before it is sent (so a daemon killed
        mid-way can still authenticate) and returned. ``first_contact``
        pipelines the agent handshake with the identity request (one round
        trip). On failure the VMM is stopped and its cgroup and run directory
        are freed.
        """
        try:
            new_token = secrets.token_hex(16)
            self.save(replace(record, next_token=new_token))
            await vmm.resume()
            identity = identity_request(record.id, new_token, os.urandom(64), time.time_ns())
            if first_contact:
                await agent.authenticate(record.token, self.settings.agent_timeout_s, then=identity)
            else:
                await agent.request(*identity)
            phases.mark("identity")
            return VmRuntime(record.id, vmm, agent), new_token
        except BaseException:
            await self.host.stop(record.id, VmRuntime(record.id, vmm, agent))
            raise

    # ---- launch ------------------------------------------------------------

    def _allocate_uid(self) -> int:
        uid = self.store.free_uid(self.settings.vmm_uids, exclude=self._reserved_uids)
        self._reserved_uids.add(uid)
        return uid

    async def _prewarm(self, vm_id: str, uid: int, image: ImageRecord) -> tuple[QemuVmm, AgentConnection]:
        """A pool entry: a clone already restored and run once (TCG has translated the
        agent's paths, and fork/exec's through one ``true``), then paused before it gets
        an identity of its own. The app is not touched: its state stays as captured."""
        vmm, agent = await self._start_clone(vm_id, uid, image)
        try:
            snap = await self.images.verified_snapshot(image)
            await load_verified(vmm, snap.state_file, snap.manifest.files["state"], True)
            await vmm.resume()
            await agent.authenticate(image.token, self.settings.agent_timeout_s)
            await agent.restore_identity("ember", image.token, os.urandom(64), time.time_ns())
            with contextlib.suppress(GuestError):  # no `true` (FROM scratch): the failed exec warmed most of it
                async for _ in agent.exec(ExecRequest(("true",), timeout_s=10)):
                    pass
            await vmm.pause()
            return vmm, agent
        except BaseException:
            await agent.close()
            await vmm.shutdown()
            raise

    async def run(self, image_name: str) -> VmRecord:
        image = self.images.get(image_name)
        snap = await self.images.verified_snapshot(image)
        phases = Phases()
        warm = await self.pool.take(image)
        if warm is None:
            vm_id, uid = new_vm_id(), self._allocate_uid()
        else:
            vm_id, uid = warm.vm_id, warm.uid
        record = VmRecord(
            id=vm_id, image=image.name, state=VmState.PENDING, machine=image.machine, uid=uid,
            token=image.token, ram=RamMode.CLONE,
        )  # fmt: skip
        self.store.insert_vm(record)
        self._reserved_uids.discard(uid)
        async with self._lock(vm_id):
            try:
                if warm is None:
                    vmm, agent = await self._start_clone(vm_id, uid, image)
                    phases.mark("start_vmm")
                    runtime, token = await self._activate(
                        record, vmm, agent, snap.state_file, snap.manifest.files["state"], True, phases
                    )
                else:
                    phases.mark("warm_vmm")
                    runtime, token = await self._give_identity(record, warm.vmm, warm.agent, phases, False)
            except BaseException:
                await self.host.teardown(vm_id, None)
                self.store.delete_vm(vm_id)
                raise
            finally:
                self.pool.refill(image, self._prewarm)
            record = self.take_charge(record, runtime, token)
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

    async def list_dir(self, vm_id: str, path: str) -> Listing:
        _check_guest_path(path)
        runtime = self._runtime(self.get(vm_id), "list files in")
        return await runtime.agent.list_dir(path)

    async def inspect(self, vm_id: str) -> dict[str, Any]:
        record = self.get(vm_id)
        info: dict[str, Any] = {"vmm_status": None, "host_pss_mib": None, "agent_ping_ms": None}
        runtime = self._runtimes.get(vm_id)
        if record.state is VmState.RUNNING and runtime is not None:
            with contextlib.suppress(VmmError):
                info["vmm_status"] = await runtime.vmm.status()
            info["host_pss_mib"] = host_pss_mib(runtime.vmm.pid)
            with contextlib.suppress(GuestError):
                start = time.perf_counter()
                await runtime.agent.ping()
                info["agent_ping_ms"] = round((time.perf_counter() - start) * 1000, 2)
        return info

    # ---- suspend / resume ------------------------------------------------

    async def suspend(self, vm_id: str) -> Timings:
        """Save memory, devices and disk durably; the VMM exits and the VM holds no memory or CPU.

        Its snapshot files may stay in the host page cache, which the kernel
        reclaims like any file cache; a resume soon after a suspend reads them
        from there, a later one from disk (the benchmark measures both).

        A VM with its own RAM file (any VM resumed before) saves only device
        state (``x-ignore-shared``, ~60 KB) and makes the RAM file durable; a
        clone still mapping its image's template saves a full migration stream.
        """
        async with self._lock(vm_id):
            record = self.get(vm_id)
            check_transition(vm_id, record.state, VmState.SUSPENDING, "suspend")
            runtime = self._runtime(record, "suspend")
            phases = Phases()
            own_ram = record.ram is RamMode.OWN
            record = self.save(record.moved(VmState.SUSPENDING))
            layout = self.host.layout(vm_id)
            try:
                await runtime.agent.sync()
                phases.mark("guest_sync")
                with staging(layout.suspend_dir) as tmp:
                    tap = StreamTap.sink(tmp / "state")
                    try:
                        await runtime.vmm.save_state(tap.fd, ignore_shared=own_ram)
                    finally:
                        state = tap.finish()
                    phases.mark("save_state")
                    self._unwatch(vm_id)
                    self._runtimes.pop(vm_id, None)
                    await self.host.stop(vm_id, runtime)
                    phases.mark("stop_vmm")
                    moved = move_files(layout.root, tmp, VM_FILES)
                    # what this suspend writes: the state stream, plus the RAM pages fsync must flush
                    written = state.size + ((unwritten_bytes(tmp / "ram") or 0) if "ram" in moved else 0)
                    # the files are final once the VMM exited: hash them while fsync flushes them
                    flushing = asyncio.create_task(asyncio.to_thread(durable, [tmp / name for name in moved]))
                    digests = await asyncio.gather(
                        *(asyncio.to_thread(hash_file, tmp / name, name == "ram") for name in moved)
                    )
                    await flushing
                    phases.mark("fsync+hash")
                    files = {"state": state, **dict(zip(moved, digests, strict=True))}
                    write_manifest(tmp, new_manifest("suspend", record.machine, files, own_ram))
                phases.mark("commit")
            except BaseException as exc:
                await self._suspend_failed(record, runtime, exc)
                raise
            self.save(record.moved(VmState.SUSPENDED, StopReason.USER.value, pid=0))
            vlog(vm_id).info("suspended in %.0f ms (%d bytes written) %s", phases.total_ms, written, phases.ms)
            return Timings(phases.total_ms, phases.ms, written)

    async def _suspend_failed(self, record: VmRecord, runtime: VmRuntime, exc: BaseException) -> None:
        layout = self.host.layout(record.id)
        if self._runtimes.get(record.id) is runtime and runtime.vmm.alive():
            vlog(record.id).warning("suspend failed (%s); the VM keeps running", exc)
            with contextlib.suppress(EmberError):
                await runtime.vmm.resume()
            self.save(record.moved(VmState.RUNNING, f"suspend failed: {exc}"))
            return
        # The VMM already stopped: put its files back and give up on this VM.
        for stray in layout.root.glob(".suspend.tmp-*"):
            move_files(stray, layout.root, VM_FILES)
        self.save(record.moved(VmState.FAILED, f"suspend failed after the VMM stopped: {exc}", pid=0))

    async def resume(self, vm_id: str) -> Timings:
        """Restore a suspended VM under the same id, into its own RAM file."""
        async with self._lock(vm_id):
            record = self.get(vm_id)
            check_transition(vm_id, record.state, VmState.RESUMING, "resume")
            phases = Phases()
            layout = self.host.layout(vm_id)
            manifest = load_manifest(layout.suspend_dir)
            own_ram = "ram" in manifest.files
            # the disk overlay still reads its image's disk: keep the image's group
            image = self.images.get(record.image)
            record = self.save(record.moved(VmState.RESUMING))
            moved = move_files(layout.suspend_dir, layout.root, VM_FILES)
            started: VmRuntime | None = None
            try:
                if not own_ram:  # a full stream: it is loaded into a fresh RAM file
                    new_ram_file(layout.ram, record.machine.memory_mib, record.uid)
                # hash the disk and RAM files on the other core while QEMU starts
                checking = asyncio.create_task(
                    asyncio.to_thread(verify_files, manifest, {name: layout.root / name for name in moved})
                )
                try:
                    vmm, agent = await self._start_paused(
                        vm_id, record.uid, record.machine, RamMode.OWN, layout.ram, image.gid
                    )
                    started = VmRuntime(vm_id, vmm, agent)
                finally:
                    await asyncio.gather(checking, return_exceptions=True)
                checking.result()  # a damaged file stops us here, before the guest runs
                phases.mark("start_vmm+verify")
                runtime, token = await self._activate(
                    record, vmm, agent, layout.suspend_dir / "state", manifest.files["state"], own_ram, phases
                )
            except BaseException as exc:
                await self.host.stop(vm_id, started)
                if not own_ram:
                    layout.ram.unlink(missing_ok=True)
                move_files(layout.root, layout.suspend_dir, moved)
                reason = f"resume failed: {exc}"
                vlog(vm_id).error(reason)
                self.save(record.moved(VmState.SUSPENDED, reason))
                raise
            # the consumed snapshot is deleted off the critical path (a 90 MB unlink takes ~60 ms)
            consumed = layout.suspend_dir.rename(layout.root / f".consumed-{secrets.token_hex(4)}")
            self._background(asyncio.to_thread(shutil.rmtree, consumed, True))
            self.take_charge(record, runtime, token, ram=RamMode.OWN)
            phases.mark("commit")
            vlog(vm_id).info("resumed in %.0f ms %s", phases.total_ms, phases.ms)
            return Timings(phases.total_ms, phases.ms)

    # ---- snapshot (fork) -------------------------------------------------

    async def snapshot(self, vm_id: str, name: str) -> ImageRecord:
        if not NAME_RE.match(name):
            raise InvalidRequest(f"bad image name {name!r}: use lowercase letters, digits, '.', '_' or '-'")
        self.images.check_new_name(name)
        stream = self.images.staging_stream(name)
        disk_copy = stream.with_name(stream.name + ".disk")
        try:
            async with self._lock(vm_id):
                record = self.get(vm_id)
                runtime = self._runtime(record, "snapshot")
                await runtime.agent.sync()
                try:
                    tap = StreamTap.sink(stream)
                    try:
                        await runtime.vmm.save_state(tap.fd, ignore_shared=False)
                    finally:
                        digest = tap.finish()
                    shutil.copyfile(self.host.layout(vm_id).disk, disk_copy)
                except OSError as exc:
                    raise_storage(exc, "snapshotting the VM")
                finally:
                    with contextlib.suppress(EmberError):
                        await runtime.vmm.resume()
            image = await self.images.from_stream(name, record, stream, digest, disk_copy)
        finally:  # the staged stream and disk copy never outlive the request, failed or not
            stream.unlink(missing_ok=True)
            disk_copy.unlink(missing_ok=True)
        vlog(vm_id).info("snapshotted into image %s", name)
        return image

    # ---- remove ------------------------------------------------------------

    async def remove(self, vm_id: str) -> None:
        async with self._lock(vm_id):
            record = self.get(vm_id)
            self.save(record.moved(VmState.TERMINATING, StopReason.USER.value))
            self._unwatch(vm_id)
            await self.host.teardown(vm_id, self._runtimes.pop(vm_id, None))
            self.store.delete_vm(vm_id)
        self._locks.pop(vm_id, None)
        vlog(vm_id).info("removed")

    # ---- daemon start / stop -------------------------------------------

    def _image_names(self, name: str, every_version: bool) -> list[str]:
        """The image or build names ``name`` means: itself, else the versions of the repo it names."""
        if self.store.get_build(name) is not None or self.store.get_image(name) is not None:
            return [name]
        versions = [b.name for b in self.store.list_builds() if b.repo == name] if ":" not in name else []
        if not versions:
            raise ImageNotFound(name)
        if len(versions) > 1 and not every_version:
            raise Conflict(
                f"'{name}' has {len(versions)} versions ({', '.join(versions[:10])}): remove one with "
                f"'ember image rm {versions[-1]}', or every one with 'ember image rm --all {name}'"
            )
        return versions

    async def remove_image(self, name: str, *, every_version: bool = False) -> list[str]:
        """Remove an image version (or every version of a repo) and its files; refused while VMs use
        one. Returns the names removed."""
        names = self._image_names(name, every_version)
        users = [vm.id for vm in self.store.list_vms() if vm.image in names]
        if users:
            raise Conflict(f"image {name} is used by {len(users)} VM(s): {', '.join(users[:10])}; remove them first")
        for each in names:
            image = self.store.get_image(each)
            if image is not None:
                await self.pool.drop(image)
                self.store.delete_image(image.name)
                await asyncio.to_thread(shutil.rmtree, self.images.dir(image), True)
            self.store.delete_build(each)
        return names

    def warm_up(self, image: ImageRecord) -> None:
        """Verify an image and pre-start its pool in the background, so that even
        the first launch after a daemon start or an image build is a warm one."""
        self.pool.refill(image, self._prewarm)

    async def close(self) -> None:
        """Daemon shutdown: discard the warm pool, detach from VMs but leave them running
        for the next daemon to re-adopt. Safe to call more than once."""
        await self.pool.close()
        for vm_id in list(self._watchers):
            self._unwatch(vm_id)
        for runtime in self._runtimes.values():
            await runtime.agent.close()
            await runtime.vmm.disconnect()
        self._runtimes.clear()
        await asyncio.to_thread(self.host.cgroups.release)


def host_pss_mib(pid: int) -> float | None:
    """The VMM's proportional share of host memory (shared template pages split among clones)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def _check_guest_path(path: str) -> None:
    if not path.startswith("/"):
        raise InvalidRequest(f"guest path {path!r} must be absolute (start with '/')")
    if "\0" in path or len(path) > 4096:
        raise InvalidRequest("guest path is malformed")


__all__ = ["Engine", "ImageNotFound", "Timings"]
