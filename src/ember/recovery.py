"""After a daemon restart: re-adopt running VMs, settle interrupted work, reap the rest.

For every VM in the store, by its recorded state and whether its VMM is still
alive in its cgroup:

- SUSPENDED: nothing runs; leftovers of an interrupted suspend are undone.
- PENDING or TERMINATING: finish the removal (nothing half-created stays).
- VMM gone: a suspend whose state was saved (its partial manifest, ``saved.json``) is
  finished and ends SUSPENDED, as does a resume cut short (its files go back); anything
  else ends FAILED with the reason ``vmm_exited``.
- VMM alive: re-attach over QMP, continue it if an interrupted operation left
  it paused, re-authenticate to the agent (with the token it may have just
  been given), and finish a resume's identity step.

A live VMM is never stopped because a check failed: a guest that does not
answer in time (a loaded host) is asked again with longer timeouts, and if it
still does not answer, the VM stays listed RUNNING with the reason, its VMM
untouched, while a background task keeps trying; a user may remove it.

Then every cgroup and control directory no adopted VMM uses (launched, pooled,
build or capture VMs of a killed daemon) is removed, and so are files of VMs
the store does not know.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import shutil
import time
from dataclasses import replace
from typing import TYPE_CHECKING

from ember.errors import AgentUnavailable, EmberError, TokenRefused
from ember.logs import vlog
from ember.microvm import MicroVm
from ember.models import StateReason, VmRecord, VmState, utcnow
from ember.runtime import finish_suspend, hand_over, move_files
from ember.snapshot import Snapshot, SnapshotManifest, commit

if TYPE_CHECKING:
    from ember.engine import Engine

log = logging.getLogger(__name__)

# Timeouts of the successive attempts to reach a re-adopted guest's agent (a loaded
# TCG host can take seconds to schedule a guest that was paused or starved).
AGENT_ATTEMPTS_S = (5.0, 15.0, 30.0)
RETRY_AFTER_S = (5.0, 10.0, 20.0, 30.0)  # waits before the background tries of an unreachable VM; then every 30 s
RECOVER_AT_ONCE = 16  # VMs recovered at the same time at start-up (each mostly waits on its VMM or guest)
UNREACHABLE = "unreachable after a daemon restart"
R = StateReason


async def recover(engine: Engine) -> None:
    """Re-adopt what a previous daemon left running; reap or fail the rest."""
    keep: set[str] = set()
    gate = asyncio.Semaphore(RECOVER_AT_ONCE)

    async def one(record: VmRecord) -> None:
        async with gate:
            try:
                if await _recover_one(engine, record):
                    keep.add(record.id)
            except Exception as exc:  # one broken VM must not stop the daemon, nor lose a live VMM
                vlog(record.id).exception("recovery failed: %s", exc)
                if _vmm_alive(engine, record):  # e.g. a VMM that did not answer QMP: kept, and tried again
                    keep.add(record.id)
                    engine.save(record.moved(record.state, R.AGENT_UNREACHABLE, f"{UNREACHABLE}: {exc}"))
                    engine.spawn_chore(_keep_trying(engine, record.id))
                else:
                    await asyncio.to_thread(engine.host.discard, record.id)
                    engine.save(record.moved(VmState.FAILED, R.RECOVERY_FAILED, str(exc), pid=0))

    # VMs at once: a guest that does not answer costs up to the sum of AGENT_ATTEMPTS_S, and one after
    # another a few of them kept a restarted daemon from serving for minutes
    await asyncio.gather(*(one(record) for record in engine.store.list_vms()))
    await asyncio.to_thread(engine.host.sweep, keep)
    known = {vm.id for vm in engine.store.list_vms()}  # live ones: a TERMINATED VM has no files
    if engine.settings.vms_dir.exists():
        for stray in engine.settings.vms_dir.iterdir():
            if stray.name not in known:
                log.warning("removing files of unknown VM %s", stray.name)
                await asyncio.to_thread(shutil.rmtree, stray, True)
    engine.images.clean_staging()


def _vmm_alive(engine: Engine, record: VmRecord) -> bool:
    return record.pid > 0 and record.pid in engine.host.cgroup_pids(record.id)


async def _recover_one(engine: Engine, record: VmRecord) -> bool:
    layout = engine.host.layout(record.id)
    snap = layout.suspended
    for consumed in layout.root.glob(".consumed-*"):
        shutil.rmtree(consumed, ignore_errors=True)
    alive = _vmm_alive(engine, record)
    for stray in layout.root.glob(".suspend.tmp-*"):  # a suspend cut short
        stray_snap = Snapshot(stray)
        saved, complete = stray_snap.saved_file.exists(), stray_snap.manifest_file.exists()
        if record.state is VmState.SUSPENDING and not alive and (saved or complete):
            # its state was saved and its VMM is gone: finish it (or, if only its commit was left,
            # commit it) rather than lose the VM
            await asyncio.to_thread(engine.host.discard, record.id)
            if saved:
                partial = SnapshotManifest.from_json(stray_snap.saved_file.read_text())
                await asyncio.to_thread(finish_suspend, layout, stray_snap, record.ram, partial)
            await asyncio.to_thread(commit, stray, snap.path)
            vlog(record.id).warning("a suspend cut short by the daemon's end was finished; the VM is SUSPENDED")
            engine.save(record.moved(VmState.SUSPENDED, R.DAEMON_RESTART, pid=0))
            return False
        move_files(stray, layout.root, layout.own_files(record.ram))
        shutil.rmtree(stray, ignore_errors=True)
    if record.state is VmState.SUSPENDED:
        await asyncio.to_thread(engine.host.discard, record.id)
        return False
    if record.state in (VmState.TERMINATING, VmState.PENDING):
        await asyncio.to_thread(engine.host.discard, record.id)
        shutil.rmtree(layout.root, ignore_errors=True)
        ended = (
            record.moved(VmState.TERMINATED, R.USER_TERMINATE, record.state_message)
            if record.state is VmState.TERMINATING
            else record.moved(VmState.TERMINATED, R.LAUNCH_FAILED, "the daemon stopped during the launch")
        )
        engine.save(replace(ended, uid=0, pid=0, terminated_at=utcnow()))
        return False
    if record.state is VmState.FAILED or not alive:
        await asyncio.to_thread(engine.host.discard, record.id)
        if record.state in (VmState.SUSPENDING, VmState.RESUMING) and snap.manifest_file.exists():
            # a resume cut short: its files go back (checked against their hashes on the next resume);
            # the manifest is read as is, for its files may be in the VM's directory right now
            manifest = SnapshotManifest.from_json(snap.manifest_file.read_text())
            back = move_files(layout.root, snap.path, [n for n in Snapshot.VM_FILES if n in manifest.files])
            hand_over([snap.path / name for name in back], 0)
            if Snapshot.RAM not in manifest.files:
                layout.ram.unlink(missing_ok=True)
            engine.save(record.moved(VmState.SUSPENDED, R.DAEMON_RESTART, pid=0))
        elif record.state is not VmState.FAILED:
            vlog(record.id).error("VMM gone after a daemon restart; marking FAILED")
            engine.save(record.moved(VmState.FAILED, R.VMM_EXITED, "the VMM was gone after a daemon restart", pid=0))
        return False
    # The VMM is alive: ask it, then re-attach to the agent.
    vm = await MicroVm.adopt(engine.host, record.id, record.pid)
    try:
        status = await vm.vmm.status()
        if status != "running":
            await vm.vmm.resume()  # an interrupted suspend or resume left it paused
        token = await reach_agent(vm, record)
    except BaseException as exc:
        await vm.detach()  # never stop a live VMM here: the VM stays listed, and we try again later
        if isinstance(exc, Exception):
            vlog(record.id).warning("%s: %s; will try again", UNREACHABLE, exc)
            engine.save(record.moved(VmState.RUNNING, R.AGENT_UNREACHABLE, f"{UNREACHABLE}: {exc}"))
            engine.spawn_chore(_keep_trying(engine, record.id))
            return True
        raise
    await _finish(engine, record, vm, token, status)
    return True


async def reach_agent(vm: MicroVm, record: VmRecord) -> str:
    """Authenticate to a re-adopted guest with the token it may just have been given, then the
    one before; a guest slow to answer is asked again with longer timeouts. Returns the token."""
    tokens = [t for t in (record.next_token, record.token) if t]
    last: Exception = AgentUnavailable("the VM has no agent token on record")
    for timeout_s in AGENT_ATTEMPTS_S:
        for token in tokens:
            try:
                await vm.connect_agent(token, timeout_s)
                return token
            except TokenRefused as exc:
                last = exc  # the other token may be the one
            except AgentUnavailable as exc:
                last = exc
                break  # no answer in time: both tokens again, with more time
    raise last


async def _finish(engine: Engine, record: VmRecord, vm: MicroVm, token: str, status: str) -> None:
    if record.state is VmState.RESUMING:
        # the interrupted restore may not have reached the identity step
        assert vm.agent is not None
        await vm.agent.restore_identity(record.id, token, os.urandom(64), time.time_ns())
        shutil.rmtree(engine.host.layout(record.id).suspended.path, ignore_errors=True)
    reason = R.DAEMON_RESTART if status != "running" else R.RECOVERED
    await engine.take_charge(record, vm, token, reason)
    vlog(record.id).info("re-adopted running VM (pid %d)", record.pid)


async def _keep_trying(engine: Engine, vm_id: str) -> None:
    """Re-attach to a VM recovery could not reach, until it answers, its VMM dies or it is removed."""
    for attempt in itertools.count():
        await asyncio.sleep(RETRY_AFTER_S[min(attempt, len(RETRY_AFTER_S) - 1)])
        async with engine.lock(vm_id):
            record = engine.store.get_vm(vm_id)
            if record is None or engine.has_runtime(vm_id) or record.state_reason is not R.AGENT_UNREACHABLE:
                return
            if not _vmm_alive(engine, record):
                await asyncio.to_thread(engine.host.discard, vm_id)
                engine.save(record.moved(VmState.FAILED, R.VMM_EXITED, pid=0))
                return
            try:
                vm = await MicroVm.adopt(engine.host, vm_id, record.pid)
            except EmberError as exc:  # its VMM does not answer QMP (yet)
                vlog(vm_id).warning("%s: %s; still retrying", UNREACHABLE, exc)
                continue
            try:
                status = await vm.vmm.status()
                if status != "running":
                    await vm.vmm.resume()
                token = await reach_agent(vm, record)
            except EmberError as exc:
                await vm.detach()
                vlog(vm_id).warning("%s: %s; still retrying", UNREACHABLE, exc)
                continue
            await _finish(engine, record, vm, token, status)
            return
