"""The VM engine: launch from snapshots, exec and files, suspend, resume, fork.

Every lifecycle call takes the VM's lock, checks the transition against
:data:`ember.models.TRANSITIONS`, persists the intermediate state first (so a
daemon killed mid-way knows what was in flight) and cleans up fully when it
fails: nothing half-created survives an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import errno
import logging
import os
import secrets
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ember.agent import AgentConnection, ExecRequest, ExecResult, GuestIdleState, Listing, identity_request
from ember.applog import LogChunk
from ember.config import Settings
from ember.db.store import Store
from ember.errors import (
    AgentUnavailable,
    Conflict,
    EmberError,
    GuestError,
    HookFailed,
    ImageNotFound,
    InvalidRequest,
    VmmError,
    VmNotFound,
    log_with_id,
)
from ember.hooks import AppHooks, Hook
from ember.imagecfg import ImageDefaults, file_owner, guest_path
from ember.images import ImageStore
from ember.lifecycle.activity import Activity
from ember.lifecycle.wake import Waker
from ember.logs import vlog
from ember.metrics import Operation, timed
from ember.microvm import MicroVm, VmPlan
from ember.models import (
    FileDigest,
    IdlePolicy,
    ImageRecord,
    StateReason,
    VmRecord,
    VmState,
    check_transition,
    require_running,
)
from ember.network.policy import NO_EGRESS, EgressPolicy
from ember.pool import WarmPool, new_vm_id
from ember.runtime import Host, VmLayout, finish_suspend, hand_over, move_files
from ember.snapshot import (
    XXH3,
    Snapshot,
    durable,
    hash_file,
    load_verified,
    mapped_ram_offset,
    migration_deadline,
    new_manifest,
    raise_storage,
    save_streamed,
    staging,
    unwritten_bytes,
    verify_files,
)
from ember.vmm.machine import DiskChain, MachineConfig, RamBacking, RamMode

log = logging.getLogger(__name__)


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


def public_reason(exc: BaseException) -> str:
    """What a VM's record, events and webhooks may say of ``exc``: Ember's own message (written for the
    client), else only an id under which the daemon log has the details (host paths, QMP text)."""
    if isinstance(exc, EmberError):
        return str(exc)[:2000]
    return f"internal error; the daemon log has the details under id {log_with_id('VM state change', exc=exc)}"


@dataclass(frozen=True)
class RunOptions:
    """What a launch asks beyond its image (checked by the API before it gets here)."""

    tenant: str
    env: Mapping[str, str] = field(default_factory=dict)
    tags: Mapping[str, str] = field(default_factory=dict)
    idle: IdlePolicy = field(default_factory=IdlePolicy)  # idle policy and lifetime (ember.lifecycle)
    run_payload: bytes = b""  # the body of the app's run hook (ember.hooks)
    egress: EgressPolicy = NO_EGRESS  # ember.network.policy
    aws: Mapping[str, Any] = field(default_factory=dict)  # run through the AWS API (ember.aws.microvms)
    on_record: Callable[[str], None] | None = None  # told the VM's id once its record exists


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
        self.pool = WarmPool(host, settings.pool_size, self._prewarm, budget=settings.pool_max_vmms)
        self.activity = Activity()  # what keeps each VM busy (exec, files, shells, ingress): ember.lifecycle
        self._waker = Waker(self)
        # an auto-resume runs inside this (the API's quota check of a resume), when the API has set it
        self.admit_resume: Callable[[VmRecord], contextlib.AbstractAsyncContextManager[Any]] | None = None
        self.hooks = AppHooks(settings, store)

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
                failed = record.moved(VmState.FAILED, StateReason.VMM_EXITED, "the VMM exited unasked", pid=0)
                await self.save_async(failed)

        # a fresh context: what the watcher records is the daemon's doing (actor "system"), not the launcher's
        self._watchers[vm.id] = asyncio.create_task(watch(), name=f"watch-{vm.id}", context=contextvars.Context())

    async def take_charge(
        self, record: VmRecord, vm: MicroVm, token: str, reason: StateReason, ram: RamMode | None = None
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
        task = asyncio.create_task(work, context=contextvars.Context())  # the daemon's own work: actor "system"
        self._chores.add(task)
        task.add_done_callback(self._chores.discard)

    def _unwatch(self, vm_id: str) -> None:
        task = self._watchers.pop(vm_id, None)
        if task is not None:
            task.cancel()

    async def _start_paused(
        self, vm_id: str, uid: int, machine: MachineConfig, image: ImageRecord, ram: RamBacking,
        groups: tuple[int, ...], egress: EgressPolicy = NO_EGRESS,
    ) -> MicroVm:  # fmt: skip
        """Start a jailed VMM waiting for a snapshot, and open (not yet use) its agent socket.
        Its disk is the VM's overlay on the image's disk (which reaches QEMU as a read-only fd)."""
        layout = self.host.layout(vm_id)
        disk = DiskChain(top=layout.disk, backing=(self.images.snapshot(image).disk,))
        plan = VmPlan(
            vm_id=vm_id, machine=machine, disk=disk, ram=ram, uid=uid, groups=groups, incoming=True, egress=egress
        )
        vm = await MicroVm.start(self.host, plan)
        try:
            # connected before the guest runs, the port is never seen closed by the guest
            await vm.open_agent(self.settings.agent_timeout_s)
        except BaseException:
            await vm.close()
            raise
        return vm

    async def _start_clone(self, vm_id: str, uid: int, image: ImageRecord, egress: EgressPolicy = NO_EGRESS) -> MicroVm:
        layout = self.host.layout(vm_id)
        layout.root.mkdir(mode=0o711)
        verified = await self.images.verified_snapshot(image)
        await self.host.qemu_img.create_overlay(
            self.images.snapshot(image).disk, layout.disk, owner_uid=uid, virtual_size=verified.disk_size
        )
        # the image's group reads its template RAM (0440, root-owned): mapped read-only, privately
        ram = RamBacking(self.images.snapshot(image).ram, RamMode.CLONE)
        return await self._start_paused(vm_id, uid, image.machine, image, ram, (image.gid,), egress)

    async def _activate(
        self, record: VmRecord, vm: MicroVm, load: Callable[[], Awaitable[None]], phases: Phases
    ) -> str:
        """Load a snapshot into a paused VMM with ``load``, then run it with a fresh identity
        (see _give_identity)."""
        try:
            await load()
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
            # the pid too: a daemon killed once the guest runs must find this VMM alive, not discard it
            await self.save_async(replace(record, next_token=new_token, pid=vm.pid))
            await vm.vmm.resume()
            identity = identity_request(record.id, new_token, os.urandom(64), time.time_ns())
            if first_contact:
                await vm.agent.authenticate(record.token, self.settings.restore_answer_timeout_s, then=identity)
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
            await vm.agent.authenticate(image.token, self.settings.restore_answer_timeout_s)
            await vm.agent.restore_identity("ember", image.token, os.urandom(64), time.time_ns())
            phases.mark("agent")
            with contextlib.suppress(GuestError):  # no `true` (FROM scratch): the failed exec warmed most of it
                async for _ in vm.agent.exec(ExecRequest(("true",), timeout_s=10)):
                    pass
            phases.mark("exec_true")
            warmed = await self.hooks.warm(image.name, vm.agent)  # the app's request path, once
            if warmed is not None and not warmed.ok:
                vlog(vm_id).warning("pre-start for the pool of %s: %s", image.name, warmed.describe())
            await vm.vmm.pause()
            phases.mark("app_warm")
            vlog(vm_id).debug("pre-started for the pool of %s in %.0f ms %s", image.name, phases.total_ms, phases.ms)
            return vm
        except BaseException:
            await vm.close()
            raise

    @timed(Operation.LAUNCH)
    async def run(self, image: ImageRecord, options: RunOptions) -> VmRecord:
        if options.egress.needs_network and not image.machine.nic:
            raise InvalidRequest(
                f"image {image.name} was built before VMs had a network card: rebuild it to launch VMs with egress"
            )
        snap = await self.images.verified_snapshot(image)
        phases = Phases()
        # pooled VMMs have a NIC with no backend: a VM with egress starts its own, on a tap in its namespace
        warm = None if options.egress.needs_network else await self.pool.take(image)
        if warm is None:
            vm_id, uid = new_vm_id(), self.host.uids.allocate()
        else:
            vm_id, uid = warm.vm.id, warm.uid
        record = VmRecord(
            id=vm_id, image=image.name, state=VmState.PENDING, machine=image.machine, uid=uid,
            token=image.token, ram=RamMode.CLONE, tenant=options.tenant, env=dict(options.env),
            tags=dict(options.tags), idle=options.idle, egress=options.egress, aws=dict(options.aws),
        )  # fmt: skip
        await asyncio.to_thread(self.store.insert_vm, record)
        if options.on_record is not None:
            options.on_record(vm_id)  # after the commit: a quota check from here on counts this VM
        self.host.uids.settle(uid)
        async with self._lock(vm_id):
            vm: MicroVm | None = warm.vm if warm is not None else None
            try:
                if vm is None:
                    vm = await self._start_clone(vm_id, uid, image, options.egress)
                    phases.mark("start_vmm")
                    expected = snap.manifest.files[Snapshot.STATE]
                    token = await self._activate(
                        record, vm, lambda: load_verified(vm.vmm, snap.state_file, expected, True), phases
                    )
                else:
                    phases.mark("warm_vmm")
                    token = await self._give_identity(record, vm, phases, False)
                assert vm.agent is not None
                ran = await self.hooks.fire(record, vm.agent, Hook.RUN, options.run_payload)
                if ran is not None and not ran.ok:
                    raise HookFailed(f"the app's run hook failed, so the VM was removed: {ran.describe()}")
                phases.mark("run_hook")
            except BaseException as exc:
                if vm is not None:
                    await vm.close()
                await asyncio.to_thread(shutil.rmtree, self.host.layout(vm_id).root, True)
                why = StateReason.RUN_HOOK_FAILED if isinstance(exc, HookFailed) else StateReason.LAUNCH_FAILED
                failed = record.moved(VmState.TERMINATED, why, public_reason(exc), uid=0)
                await self.save_async(replace(failed, terminated_at=failed.updated_at))
                raise
            finally:
                self.pool.refill(image)
            record = await self.take_charge(record, vm, token, StateReason.LAUNCH)
        vlog(vm_id).info("launched from %s in %.0f ms %s", image.name, phases.total_ms, phases.ms)
        return record

    # ---- guest operations --------------------------------------------------

    async def exec(
        self, vm_id: str, req: ExecRequest, stdin: AsyncIterator[bytes] | None
    ) -> AsyncIterator[tuple[str, bytes] | ExecResult]:
        return self._agent(self.get(vm_id), "exec in").exec(req, stdin)

    def guest(self, vm_id: str, action: str) -> AgentConnection:
        """A RUNNING VM's agent channel (shells, background processes); ``action`` words the refusal."""
        return self._agent(self.get(vm_id), action)

    @contextlib.asynccontextmanager
    async def using(self, vm_id: str, action: str) -> AsyncIterator[AgentConnection]:
        """A guest call (exec, files, shell, processes): the VM is held busy (no idle suspend) for as long as
        the block runs, and woken first (auto-resume; else a VM not running is refused)."""
        async with self.activity.hold(vm_id):
            await self.wake(vm_id, action=action)
            yield self.guest(vm_id, action)

    def image_defaults(self, record: VmRecord) -> ImageDefaults | None:
        """What exec, shell and file calls in the VM default to (ember.imagecfg): its image's
        ENV, WORKDIR and USER; None for an image without a Dockerfile config."""
        image = self.store.get_image(record.image)  # kept while a VM uses it (remove_image refuses)
        return image.defaults if image is not None else None

    async def write_file(
        self, vm_id: str, path: str, data: AsyncIterator[bytes], mode: int, mkdirs: bool, *, user: str | None = None
    ) -> int:
        """``user`` owns the file (None: the image's USER, else root)."""
        record = self.get(vm_id)
        defaults = self.image_defaults(record)
        agent = self._agent(record, "copy files into")
        owner = file_owner(defaults, user)
        return await agent.write_file(guest_path(defaults, path), data, mode, mkdirs, owner=owner)

    async def read_file(self, vm_id: str, path: str) -> tuple[int, AsyncIterator[bytes]]:
        record = self.get(vm_id)
        resolved = guest_path(self.image_defaults(record), path)
        return await self._agent(record, "copy files from").read_file(resolved)

    async def list_dir(self, vm_id: str, path: str) -> Listing:
        record = self.get(vm_id)
        resolved = guest_path(self.image_defaults(record), path)
        return await self._agent(record, "list files in").list_dir(resolved)

    async def read_log(self, vm_id: str, start: int, limit: int, wait_s: float) -> LogChunk:
        """A piece of the VM's app log (ember.applog: it lives in the guest; the host keeps none)."""
        return await self._agent(self.get(vm_id), "read the app log of").read_log(start, limit, wait_s)

    async def wake(self, vm_id: str, *, action: str = "reach") -> VmRecord:
        """Return once the VM is RUNNING: a SUSPENDED VM run with auto-resume is resumed (one resume for every
        concurrent caller); otherwise a VM that is not running raises the usual error (``action`` names what the
        caller wanted, e.g. "exec in")."""
        return await self._waker.wake(vm_id, action=action)

    async def guest_idle_state(self, vm_id: str, timeout_s: float) -> GuestIdleState:
        """Whether the guest holds itself awake or asks to be suspended (ember-idle)."""
        return await self._agent(self.get(vm_id), "ask").idle_state(timeout_s)

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

    @timed(Operation.SUSPEND)
    async def suspend(
        self, vm_id: str, *, reason: StateReason = StateReason.USER_SUSPEND, message: str = ""
    ) -> Timings:
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
            record = await self.save_async(record.moved(VmState.SUSPENDING, reason, message))
            layout = self.host.layout(vm_id)
            try:
                await self.hooks.fire(record, agent, Hook.SUSPEND)  # a failed one is recorded; the suspend goes on
                phases.mark("suspend_hook")
                await agent.sync()
                phases.mark("guest_sync")
                async with staging(layout.suspended.path) as tmp, self._files_back_on_failure(layout, tmp, record):
                    snap = Snapshot(tmp)
                    saved = await self._save(vm, snap, own_ram=own_ram, memory_mib=record.machine.memory_mib)
                    phases.mark("save_state")
                    # what this suspend writes: the state stream, plus the RAM pages fsync must flush
                    unflushed = await asyncio.to_thread(unwritten_bytes, layout.ram if own_ram else snap.ram)
                    settled: dict[str, FileDigest] = {} if saved.state is None else {Snapshot.STATE: saved.state}
                    if not own_ram:  # a new RAM file, root's, that no VMM maps: settled before the VMM goes
                        await asyncio.to_thread(durable, [snap.ram])
                        settled[Snapshot.RAM] = await asyncio.to_thread(hash_file, snap.ram, True, algo=XXH3)
                    # the state is saved: from here a daemon killed before the manifest exists finishes this
                    # suspend after its restart (recovery.py) instead of losing the VM
                    partial = new_manifest("suspend", record.machine, settled, own_ram, ram_offset=saved.ram_offset,
                                           mapped_ram=not own_ram)  # fmt: skip
                    await asyncio.to_thread(snap.write_saved, partial)
                    self._unwatch(vm_id)
                    self._runtimes.pop(vm_id, None)
                    await vm.close()
                    phases.mark("stop_vmm")
                    await asyncio.to_thread(finish_suspend, layout, snap, record.ram, partial)
                    written = (saved.state.size if saved.state else 0) + (unflushed or 0)
                    phases.mark("fsync+hash")
                phases.mark("commit")
            except BaseException as exc:
                await self._suspend_failed(record, vm, exc)
                raise
            await self.save_async(record.moved(VmState.SUSPENDED, reason, message, pid=0))
            vlog(vm_id).info("suspended in %.0f ms (%d bytes written) %s", phases.total_ms, written, phases.ms)
            return Timings(phases.total_ms, phases.ms, written)

    @contextlib.asynccontextmanager
    async def _files_back_on_failure(self, layout: VmLayout, tmp: Path, record: VmRecord) -> AsyncIterator[None]:
        """A suspend that fails after the VM's files moved into its staging directory puts them
        back before the directory is removed (a full disk must not cost the VM its disk)."""
        try:
            yield
        except BaseException:
            move_files(tmp, layout.root, layout.own_files(record.ram))
            raise

    async def _save(self, vm: MicroVm, snap: Snapshot, *, own_ram: bool, memory_mib: int) -> _Saved:
        """Save a running VM into ``snap``. A VM with its own RAM file saves its device state
        alone (``x-ignore-shared``, ~100 KB), beside a RAM file that stays where it is. A clone
        (its RAM a private view of its image's template) saves all of it with QEMU's
        ``mapped-ram`` into a new RAM file: its non-zero pages at fixed offsets, which its
        resume then maps as the VM's own RAM file, so nothing is copied twice."""
        if own_ram:
            state = await save_streamed(
                vm.vmm,
                snap.state,
                ignore_shared=True,
                memory_mib=memory_mib,
                deadline_s=self.settings.migration_timeout_s,
                what="saving the VM's state",
            )
            return _Saved(state, self.host.layout(vm.id).ram_offset())
        async with migration_deadline(self.settings.migration_timeout_s, "saving the VM's state"):
            fd = os.open(snap.ram, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                await vm.vmm.save_mapped(fd)
            except VmmError as exc:  # QEMU writes the file itself: a full disk comes back as its error
                if os.strerror(errno.ENOSPC) in str(exc):
                    raise_storage(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), "saving the VM's memory")
                raise
            finally:
                os.close(fd)
        offset = await asyncio.to_thread(mapped_ram_offset, snap.ram, memory_mib << 20)
        # zero pages are holes: reserve them now, so a full disk fails this suspend (the VM runs on)
        # rather than the resumed guest's first write to one of them (a SIGBUS in its VMM)
        await asyncio.to_thread(_reserve, snap.ram, offset, memory_mib << 20)
        return _Saved(None, offset)

    async def _suspend_failed(self, record: VmRecord, vm: MicroVm, exc: BaseException) -> None:
        layout = self.host.layout(record.id)
        if self._runtimes.get(record.id) is vm and vm.alive():
            vlog(record.id).warning("suspend failed (%s); the VM keeps running", exc)
            with contextlib.suppress(EmberError):
                await vm.vmm.resume()
            await self.save_async(record.moved(VmState.RUNNING, StateReason.SUSPEND_FAILED, public_reason(exc)))
            return
        # The VMM already stopped: put its files back and give up on this VM.
        self._runtimes.pop(record.id, None)
        await vm.close()
        for stray in layout.root.glob(".suspend.tmp-*"):
            move_files(stray, layout.root, layout.own_files(record.ram))
        message = f"the VMM had stopped: {public_reason(exc)}"
        await self.save_async(record.moved(VmState.FAILED, StateReason.SUSPEND_FAILED, message, pid=0))

    @timed(Operation.RESUME)
    async def resume(self, vm_id: str, *, reason: StateReason = StateReason.USER_RESUME) -> Timings:
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
            mapped = manifest.mapped_ram
            image = self.images.get(record.image)
            record = await self.save_async(record.moved(VmState.RESUMING, reason))
            moved = move_files(snap.path, layout.root, Snapshot.VM_FILES)
            owned = [layout.root / name for name in moved]
            vm: MicroVm | None = None
            try:
                await asyncio.to_thread(verify_files, manifest, {Snapshot.DISK: layout.disk})
                phases.mark("verify_disk")
                await asyncio.to_thread(hand_over, owned, record.uid)  # no guest runs before the RAM passed
                checks = {Snapshot.RAM: layout.ram, **({} if mapped else {Snapshot.STATE: snap.state})}
                checking = asyncio.create_task(asyncio.to_thread(verify_files, manifest, checks))
                try:
                    ram = RamBacking(layout.ram, RamMode.OWN, offset=manifest.ram_offset)
                    vm = await self._start_paused(vm_id, record.uid, record.machine, image, ram, (), record.egress)
                finally:
                    await asyncio.gather(checking, return_exceptions=True)
                checking.result()  # a damaged file stops us here, before the state loads and the guest runs
                phases.mark("start_vmm+verify")
                started = vm
                async with migration_deadline(self.settings.migration_timeout_s, "loading the VM's state"):
                    if mapped:
                        token = await self._activate(record, vm, lambda: _load_mapped(started, layout.ram), phases)
                    else:
                        expected = manifest.files[Snapshot.STATE]
                        load = lambda: load_verified(started.vmm, snap.state, expected, True)  # noqa: E731
                        token = await self._activate(record, vm, load, phases)
                await asyncio.to_thread(layout.set_ram_offset, manifest.ram_offset)
                assert vm.agent is not None
                await self.hooks.fire(record, vm.agent, Hook.RESUME)  # the restore bumped the generation already
                phases.mark("resume_hook")
            except BaseException as exc:
                if vm is not None:
                    await vm.close()
                move_files(layout.root, snap.path, moved)
                await asyncio.to_thread(hand_over, [snap.path / name for name in moved], 0)
                vlog(vm_id).error("resume failed: %s", exc)
                await self.save_async(record.moved(VmState.SUSPENDED, StateReason.RESUME_FAILED, public_reason(exc)))
                raise
            # the consumed snapshot is deleted off the critical path (a 90 MB unlink takes ~60 ms)
            consumed = snap.path.rename(layout.root / f".consumed-{secrets.token_hex(4)}")
            self.spawn_chore(asyncio.to_thread(shutil.rmtree, consumed, True))
            await self.take_charge(record, vm, token, reason, ram=RamMode.OWN)
            phases.mark("commit")
            vlog(vm_id).info("resumed in %.0f ms %s", phases.total_ms, phases.ms)
            return Timings(phases.total_ms, phases.ms)

    # ---- snapshot (fork) -------------------------------------------------

    async def snapshot(self, vm_id: str, name: str) -> ImageRecord:
        """Fork a running VM into the image ``name`` (an internal name: ember.tenancy.names)."""
        self.images.check_new_name(name)
        stream = self.images.staging_stream(name)
        disk_copy = stream.with_name(stream.name + ".disk")
        try:
            async with self._lock(vm_id):
                record = self.get(vm_id)
                vm = self._runtime(record, "snapshot")
                await self._agent(record, "snapshot").sync()
                try:
                    digest = await save_streamed(
                        vm.vmm, stream, ignore_shared=False, memory_mib=record.machine.memory_mib,
                        deadline_s=self.settings.migration_timeout_s, what="saving the VM's state",
                    )  # fmt: skip
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

    async def remove(self, vm_id: str, *, reason: StateReason = StateReason.USER_TERMINATE, message: str = "") -> None:
        """Stop the VM and delete its files; its record stays, TERMINATED, for the retention period."""
        async with self._lock(vm_id):
            record = self.get(vm_id)
            if record.state is VmState.TERMINATED:
                return
            running = self._runtimes.get(vm_id) if record.state is VmState.RUNNING else None
            record = await self.save_async(record.moved(VmState.TERMINATING, reason, message))
            if running is not None and running.agent is not None and not running.agent.closed:
                await self.hooks.fire(record, running.agent, Hook.TERMINATE)  # a failed one is recorded only
            self._unwatch(vm_id)
            vm = self._runtimes.pop(vm_id, None)
            if vm is not None:
                await vm.close()
            await asyncio.to_thread(self.host.discard, vm_id)  # a VMM recovery could not reach, too
            await asyncio.to_thread(shutil.rmtree, self.host.layout(vm_id).root, True)
            ended = record.moved(VmState.TERMINATED, reason, message, pid=0, uid=0)
            await self.save_async(replace(ended, terminated_at=ended.updated_at))
        self._locks.pop(vm_id, None)
        self.activity.forget(vm_id)
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
            self.hooks.forget(each)
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
        await asyncio.to_thread(self.host.net.release)


@dataclass(frozen=True)
class _Saved:
    state: FileDigest | None  # a separate device-state file, or None (it is inside a mapped-ram RAM file)
    ram_offset: int


def _reserve(path: Path, offset: int, length: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.posix_fallocate(fd, offset, length)
    except OSError as exc:
        raise_storage(exc, "reserving the VM's RAM file")
    finally:
        os.close(fd)


async def _load_mapped(vm: MicroVm, ram: Path) -> None:
    fd = os.open(ram, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        await vm.vmm.load_mapped(fd)
    finally:
        os.close(fd)


def host_pss_mib(pid: int) -> float | None:
    """The VMM's proportional share of host memory (shared template pages split among clones)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


__all__ = ["Engine", "ImageNotFound", "Timings"]
