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

from ember.agent import AgentConnection, ExecRequest, ExecResult, Listing, identity_request
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
from ember.microvm import MicroVm, VmPlan
from ember.models import FileDigest, ImageRecord, StopReason, VmRecord, VmState, check_transition, require_running
from ember.pool import WarmPool, new_vm_id
from ember.runtime import Host, hand_over, move_files, new_ram_file
from ember.snapshot import (
    XXH3,
    Snapshot,
    StreamTap,
    durable,
    hash_file,
    load_verified,
    migration_deadline,
    new_manifest,
    raise_storage,
    staging,
    unwritten_bytes,
    verify_files,
)
from ember.store import Store
from ember.vmm.machine import DiskChain, MachineConfig, RamBacking, RamMode

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
        self._runtimes: dict[str, MicroVm] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._watchers: dict[str, asyncio.Task[None]] = {}
        self._chores: set[asyncio.Task[Any]] = set()
        self.pool = WarmPool(host, settings.pool_size, self._prewarm)

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

    async def save_async(self, record: VmRecord) -> VmRecord:
        """``save`` off the event loop (a durable SQLite commit waits for an fsync)."""
        await asyncio.to_thread(self.store.update_vm, record)
        return record

    def _runtime(self, record: VmRecord, action: str) -> MicroVm:
        require_running(record.id, record.state, action)
        runtime = self._runtimes.get(record.id)
        if runtime is None or runtime.agent is None or runtime.agent.closed:
            why = f": {record.state_reason}" if record.state_reason else ""
            raise AgentUnavailable(
                f"VM {record.id} is not answering{why}; inspect it with 'ember inspect {record.id}', "
                f"or remove it with 'ember rm {record.id}'"
            )
        return runtime

    def _agent(self, record: VmRecord, action: str) -> AgentConnection:
        agent = self._runtime(record, action).agent
        assert agent is not None
        return agent

    def _watch(self, vm: MicroVm) -> None:
        """Notice a VMM that dies on its own (crash, OOM kill) and mark the VM failed."""

        async def watch() -> None:
            await vm.wait_exit()
            async with self._lock(vm.id):
                record = self.store.get_vm(vm.id)
                if record is None or self._runtimes.get(vm.id) is not vm:
                    return
                vlog(vm.id).error("VMM exited unexpectedly; marking the VM FAILED")
                del self._runtimes[vm.id]
                await vm.close()
                await self.save_async(record.moved(VmState.FAILED, StopReason.VMM_EXITED.value, pid=0))

        self._watchers[vm.id] = asyncio.create_task(watch(), name=f"watch-{vm.id}")

    async def take_charge(
        self, record: VmRecord, vm: MicroVm, token: str, reason: str = "", ram: RamMode | None = None
    ) -> VmRecord:
        """A VM now runs in ``vm`` (launched, resumed, or re-adopted after a daemon
        restart): watch its VMM and record it RUNNING with the agent's current token."""
        self._runtimes[record.id] = vm
        self._watch(vm)
        return await self.save_async(
            record.moved(VmState.RUNNING, reason, pid=vm.pid, token=token, next_token="", ram=ram or record.ram)
        )

    def lock(self, vm_id: str) -> asyncio.Lock:
        return self._lock(vm_id)

    def has_runtime(self, vm_id: str) -> bool:
        return vm_id in self._runtimes

    def spawn_chore(self, work: Coroutine[Any, Any, Any]) -> None:
        """Run ``work`` in the background; cancelled when the daemon stops."""
        task = asyncio.create_task(work)
        self._chores.add(task)
        task.add_done_callback(self._chores.discard)

    def _unwatch(self, vm_id: str) -> None:
        task = self._watchers.pop(vm_id, None)
        if task is not None:
            task.cancel()

    async def _start_paused(
        self, vm_id: str, uid: int, machine: MachineConfig, image: ImageRecord, ram: RamBacking,
        groups: tuple[int, ...],
    ) -> MicroVm:  # fmt: skip
        """Start a jailed VMM waiting for a snapshot, and open (not yet use) its agent socket.
        Its disk is the VM's overlay on the image's disk (which reaches QEMU as a read-only fd)."""
        layout = self.host.layout(vm_id)
        disk = DiskChain(top=layout.disk, backing=(self.images.snapshot(image).disk,))
        plan = VmPlan(vm_id=vm_id, machine=machine, disk=disk, ram=ram, uid=uid, groups=groups, incoming=True)
        vm = await MicroVm.start(self.host, plan)
        try:
            # connected before the guest runs, the port is never seen closed by the guest
            await vm.open_agent(self.settings.agent_timeout_s)
        except BaseException:
            await vm.close()
            raise
        return vm

    async def _start_clone(self, vm_id: str, uid: int, image: ImageRecord) -> MicroVm:
        layout = self.host.layout(vm_id)
        layout.root.mkdir(mode=0o711)
        verified = await self.images.verified_snapshot(image)
        await self.host.qemu_img.create_overlay(
            self.images.snapshot(image).disk, layout.disk, owner_uid=uid, virtual_size=verified.disk_size
        )
        # the image's group reads its template RAM (0440, root-owned): mapped read-only, privately
        ram = RamBacking(self.images.snapshot(image).ram, RamMode.CLONE)
        return await self._start_paused(vm_id, uid, image.machine, image, ram, (image.gid,))

    async def _activate(
        self, record: VmRecord, vm: MicroVm, state_file: Path, expected: FileDigest, ignore_shared: bool,
        phases: Phases,
    ) -> str:  # fmt: skip
        """Load a snapshot into a paused VMM, then run it with a fresh identity (see _give_identity)."""
        try:
            await load_verified(vm.vmm, state_file, expected, ignore_shared)
        except BaseException:
            await vm.close()
            raise
        phases.mark("load_state")
        return await self._give_identity(record, vm, phases, first_contact=True)

    async def _give_identity(self, record: VmRecord, vm: MicroVm, phases: Phases, first_contact: bool) -> str:
        """Let a restored, paused guest run and give it this VM's identity: a fresh RNG seed,
        the host's clock, the VM id as hostname, and a new agent token.

        ``record.token`` is the token the guest's agent knows; the new one is
        recorded as ``next_token`` before it is sent (so a daemon killed
        mid-way can still authenticate) and returned. ``first_contact``
        pipelines the agent handshake with the identity request (one round
        trip). On failure the VMM is stopped and everything it held is freed.
        """
        try:
            assert vm.agent is not None
            new_token = secrets.token_hex(16)
            await self.save_async(replace(record, next_token=new_token))
            await vm.vmm.resume()
            identity = identity_request(record.id, new_token, os.urandom(64), time.time_ns())
            if first_contact:
                await vm.agent.authenticate(record.token, self.settings.agent_timeout_s, then=identity)
            else:
                await vm.agent.request(*identity)
            phases.mark("identity")
            return new_token
        except BaseException:
            await vm.close()
            raise

    # ---- launch ------------------------------------------------------------

    async def _prewarm(self, vm_id: str, uid: int, image: ImageRecord) -> MicroVm:
        """A pool entry: a clone already restored and run once (TCG has translated the
        agent's paths, and fork/exec's through one ``true``), then paused before it gets
        an identity of its own. The app is not touched: its state stays as captured."""
        phases = Phases()
        vm = await self._start_clone(vm_id, uid, image)
        try:
            assert vm.agent is not None
            phases.mark("start_vmm")
            snap = await self.images.verified_snapshot(image)
            await load_verified(vm.vmm, snap.state_file, snap.manifest.files[Snapshot.STATE], True)
            phases.mark("load_state")
            await vm.vmm.resume()
            await vm.agent.authenticate(image.token, self.settings.agent_timeout_s)
            await vm.agent.restore_identity("ember", image.token, os.urandom(64), time.time_ns())
            phases.mark("agent")
            with contextlib.suppress(GuestError):  # no `true` (FROM scratch): the failed exec warmed most of it
                async for _ in vm.agent.exec(ExecRequest(("true",), timeout_s=10)):
                    pass
            await vm.vmm.pause()
            phases.mark("exec_true")
            vlog(vm_id).debug("pre-started for the pool of %s in %.0f ms %s", image.name, phases.total_ms, phases.ms)
            return vm
        except BaseException:
            await vm.close()
            raise

    async def run(self, image_name: str) -> VmRecord:
        image = self.images.get(image_name)
        snap = await self.images.verified_snapshot(image)
        phases = Phases()
        warm = await self.pool.take(image)
        if warm is None:
            vm_id, uid = new_vm_id(), self.host.uids.allocate()
        else:
            vm_id, uid = warm.vm.id, warm.uid
        record = VmRecord(
            id=vm_id, image=image.name, state=VmState.PENDING, machine=image.machine, uid=uid,
            token=image.token, ram=RamMode.CLONE,
        )  # fmt: skip
        await asyncio.to_thread(self.store.insert_vm, record)
        self.host.uids.settle(uid)
        async with self._lock(vm_id):
            vm: MicroVm | None = warm.vm if warm is not None else None
            try:
                if vm is None:
                    vm = await self._start_clone(vm_id, uid, image)
                    phases.mark("start_vmm")
                    token = await self._activate(
                        record, vm, snap.state_file, snap.manifest.files[Snapshot.STATE], True, phases
                    )
                else:
                    phases.mark("warm_vmm")
                    token = await self._give_identity(record, vm, phases, False)
            except BaseException:
                if vm is not None:
                    await vm.close()
                await asyncio.to_thread(shutil.rmtree, self.host.layout(vm_id).root, True)
                await asyncio.to_thread(self.store.delete_vm, vm_id)
                raise
            finally:
                self.pool.refill(image)
            record = await self.take_charge(record, vm, token)
        vlog(vm_id).info("launched from %s in %.0f ms %s", image.name, phases.total_ms, phases.ms)
        return record

    # ---- guest operations --------------------------------------------------

    async def exec(
        self, vm_id: str, req: ExecRequest, stdin: AsyncIterator[bytes] | None
    ) -> AsyncIterator[tuple[str, bytes] | ExecResult]:
        return self._agent(self.get(vm_id), "exec in").exec(req, stdin)

    async def write_file(self, vm_id: str, path: str, data: AsyncIterator[bytes], mode: int, mkdirs: bool) -> int:
        _check_guest_path(path)
        return await self._agent(self.get(vm_id), "copy files into").write_file(path, data, mode, mkdirs)

    async def read_file(self, vm_id: str, path: str) -> tuple[int, AsyncIterator[bytes]]:
        _check_guest_path(path)
        return await self._agent(self.get(vm_id), "copy files from").read_file(path)

    async def list_dir(self, vm_id: str, path: str) -> Listing:
        _check_guest_path(path)
        return await self._agent(self.get(vm_id), "list files in").list_dir(path)

    async def inspect(self, vm_id: str) -> dict[str, Any]:
        record = self.get(vm_id)
        info: dict[str, Any] = {"vmm_status": None, "host_pss_mib": None, "agent_ping_ms": None}
        runtime = self._runtimes.get(vm_id)
        if record.state is VmState.RUNNING and runtime is not None and runtime.agent is not None:
            with contextlib.suppress(VmmError):
                info["vmm_status"] = await runtime.vmm.status()
            info["host_pss_mib"] = host_pss_mib(runtime.pid)
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
            vm = self._runtime(record, "suspend")
            agent = self._agent(record, "suspend")
            phases = Phases()
            own_ram = record.ram is RamMode.OWN
            record = await self.save_async(record.moved(VmState.SUSPENDING))
            layout = self.host.layout(vm_id)
            try:
                await agent.sync()
                phases.mark("guest_sync")
                async with staging(layout.suspended.path) as tmp:
                    snap = Snapshot(tmp)
                    tap = StreamTap.sink(snap.state)
                    try:
                        async with migration_deadline(self.settings.migration_timeout_s, "saving the VM's state"):
                            await vm.vmm.save_state(tap.fd, ignore_shared=own_ram)
                    finally:
                        state = await asyncio.to_thread(tap.finish)
                    phases.mark("save_state")
                    self._unwatch(vm_id)
                    self._runtimes.pop(vm_id, None)
                    await vm.close()
                    phases.mark("stop_vmm")
                    moved = move_files(layout.root, tmp, Snapshot.VM_FILES)
                    # root's from now on: checked against damage, no VMM can write them (see XXH3)
                    await asyncio.to_thread(hand_over, [tmp / name for name in moved], 0)
                    # what this suspend writes: the state stream, plus the RAM pages fsync must flush
                    written = state.size + ((unwritten_bytes(snap.ram) or 0) if Snapshot.RAM in moved else 0)
                    # the files are final once the VMM exited: hash them while fsync flushes them
                    flushing = asyncio.create_task(asyncio.to_thread(durable, [tmp / name for name in moved]))
                    digests = await asyncio.gather(
                        *(asyncio.to_thread(hash_file, tmp / name, True, algo=XXH3) for name in moved)
                    )
                    await flushing
                    phases.mark("fsync+hash")
                    files = {Snapshot.STATE: state, **dict(zip(moved, digests, strict=True))}
                    snap.write(new_manifest("suspend", record.machine, files, own_ram))
                phases.mark("commit")
            except BaseException as exc:
                await self._suspend_failed(record, vm, exc)
                raise
            await self.save_async(record.moved(VmState.SUSPENDED, StopReason.USER.value, pid=0))
            vlog(vm_id).info("suspended in %.0f ms (%d bytes written) %s", phases.total_ms, written, phases.ms)
            return Timings(phases.total_ms, phases.ms, written)

    async def _suspend_failed(self, record: VmRecord, vm: MicroVm, exc: BaseException) -> None:
        layout = self.host.layout(record.id)
        if self._runtimes.get(record.id) is vm and vm.alive():
            vlog(record.id).warning("suspend failed (%s); the VM keeps running", exc)
            with contextlib.suppress(EmberError):
                await vm.vmm.resume()
            await self.save_async(record.moved(VmState.RUNNING, f"suspend failed: {exc}"))
            return
        # The VMM already stopped: put its files back and give up on this VM.
        self._runtimes.pop(record.id, None)
        await vm.close()
        for stray in layout.root.glob(".suspend.tmp-*"):
            move_files(stray, layout.root, Snapshot.VM_FILES)
        await self.save_async(record.moved(VmState.FAILED, f"suspend failed after the VMM stopped: {exc}", pid=0))

    async def resume(self, vm_id: str) -> Timings:
        """Restore a suspended VM under the same id, into its own RAM file.

        Nothing of the snapshot reaches QEMU unchecked: the disk (which QEMU parses as it
        starts) is verified before QEMU starts; the RAM file and the device state are
        verified on the other core while it starts, and both checks finish before the
        state is loaded and the guest runs. The VMM gets no image group: the image's disk
        reaches it as a read-only fd."""
        async with self._lock(vm_id):
            record = self.get(vm_id)
            check_transition(vm_id, record.state, VmState.RESUMING, "resume")
            phases = Phases()
            layout = self.host.layout(vm_id)
            snap = layout.suspended
            manifest = snap.load()
            self.images.check_restorable(manifest.machine, f"the snapshot of VM {vm_id}")
            own_ram = Snapshot.RAM in manifest.files
            image = self.images.get(record.image)
            record = await self.save_async(record.moved(VmState.RESUMING))
            moved = move_files(snap.path, layout.root, Snapshot.VM_FILES)
            owned = [layout.root / name for name in moved]
            vm: MicroVm | None = None
            try:
                await asyncio.to_thread(verify_files, manifest, {Snapshot.DISK: layout.disk})
                phases.mark("verify_disk")
                await asyncio.to_thread(hand_over, owned, record.uid)  # no guest runs before the RAM passed
                if not own_ram:  # a full stream: it is loaded into a fresh RAM file
                    await asyncio.to_thread(new_ram_file, layout.ram, record.machine.memory_mib, record.uid)
                checks = {Snapshot.STATE: snap.state, **({Snapshot.RAM: layout.ram} if own_ram else {})}
                checking = asyncio.create_task(asyncio.to_thread(verify_files, manifest, checks))
                try:
                    vm = await self._start_paused(
                        vm_id, record.uid, record.machine, image, RamBacking(layout.ram, RamMode.OWN), ()
                    )
                finally:
                    await asyncio.gather(checking, return_exceptions=True)
                checking.result()  # a damaged file stops us here, before the state loads and the guest runs
                phases.mark("start_vmm+verify")
                async with migration_deadline(self.settings.migration_timeout_s, "loading the VM's state"):
                    token = await self._activate(
                        record, vm, snap.state, manifest.files[Snapshot.STATE], own_ram, phases
                    )
            except BaseException as exc:
                if vm is not None:
                    await vm.close()
                if not own_ram:
                    layout.ram.unlink(missing_ok=True)
                move_files(layout.root, snap.path, moved)
                await asyncio.to_thread(hand_over, [snap.path / name for name in moved], 0)
                reason = f"resume failed: {exc}"
                vlog(vm_id).error(reason)
                await self.save_async(record.moved(VmState.SUSPENDED, reason))
                raise
            # the consumed snapshot is deleted off the critical path (a 90 MB unlink takes ~60 ms)
            consumed = snap.path.rename(layout.root / f".consumed-{secrets.token_hex(4)}")
            self.spawn_chore(asyncio.to_thread(shutil.rmtree, consumed, True))
            await self.take_charge(record, vm, token, ram=RamMode.OWN)
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
                vm = self._runtime(record, "snapshot")
                await self._agent(record, "snapshot").sync()
                try:
                    tap = StreamTap.sink(stream)
                    try:
                        async with migration_deadline(self.settings.migration_timeout_s, "saving the VM's state"):
                            await vm.vmm.save_state(tap.fd, ignore_shared=False)
                    finally:
                        digest = await asyncio.to_thread(tap.finish)
                    # copied while the guest is paused: the copy is root's, so its header no longer changes
                    await asyncio.to_thread(shutil.copyfile, self.host.layout(vm_id).disk, disk_copy)
                    os.chown(disk_copy, 0, self.images.get(record.image).gid)  # qemu-img reads it through the group
                    os.chmod(disk_copy, 0o640)
                except OSError as exc:
                    raise_storage(exc, "snapshotting the VM")
                finally:
                    with contextlib.suppress(EmberError):
                        await vm.vmm.resume()
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
            await self.save_async(record.moved(VmState.TERMINATING, StopReason.USER.value))
            self._unwatch(vm_id)
            vm = self._runtimes.pop(vm_id, None)
            if vm is not None:
                await vm.close()
            await asyncio.to_thread(self.host.discard, vm_id)  # a VMM recovery could not reach, too
            await asyncio.to_thread(shutil.rmtree, self.host.layout(vm_id).root, True)
            await asyncio.to_thread(self.store.delete_vm, vm_id)
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
        self.pool.refill(image)

    async def close(self) -> None:
        """Daemon shutdown: discard the warm pool, detach from VMs but leave them running
        for the next daemon to re-adopt. Safe to call more than once."""
        await self.pool.close()
        for task in list(self._chores):
            task.cancel()
        await asyncio.gather(*self._chores, return_exceptions=True)
        for vm_id in list(self._watchers):
            self._unwatch(vm_id)
        for vm in self._runtimes.values():
            await vm.detach()
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
