"""After a daemon restart: re-adopt running VMs, settle interrupted work, reap the rest.

For every VM in the store, by its recorded state and whether its VMM is still
alive in its cgroup:

- SUSPENDED: nothing runs; leftovers of an interrupted suspend are undone.
- PENDING or TERMINATING: finish the removal (nothing half-created stays).
- VMM gone: a suspend or resume that had committed its snapshot ends SUSPENDED,
  anything else ends FAILED with the reason ``vmm_exited``.
- VMM alive: re-attach over QMP, continue it if an interrupted operation left
  it paused, re-authenticate to the agent (with the token it may have just
  been given), and finish a resume's identity step.

Then every cgroup this daemon owns that no adopted VM uses is killed, and
files of VMs the store does not know are removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
from typing import TYPE_CHECKING

from ember.agent import AgentConnection, ChannelLimits
from ember.errors import AgentUnavailable, SnapshotError
from ember.logs import vlog
from ember.models import StopReason, VmRecord, VmState
from ember.runtime import VM_FILES, VmRuntime, move_files
from ember.snapshot import load_manifest
from ember.vmm.qemu import QemuVmm

if TYPE_CHECKING:
    from ember.engine import Engine

log = logging.getLogger(__name__)


async def recover(engine: Engine) -> None:
    """Re-adopt what a previous daemon left running; reap or fail the rest."""
    keep: set[str] = set()
    for record in engine.store.list_vms():
        try:
            if await _recover_one(engine, record):
                keep.add(record.id)
        except Exception as exc:  # one broken VM must not stop the daemon
            vlog(record.id).exception("recovery failed: %s", exc)
            await engine.host.stop(record.id, None)
            engine.save(record.moved(VmState.FAILED, f"recovery failed: {exc}", pid=0))
    for name in engine.host.cgroups.names():
        if name not in keep:
            log.warning("reaping leftover VMM cgroup %s", name)
            await asyncio.get_running_loop().run_in_executor(None, engine.host.cgroups.destroy, name)
    known = {vm.id for vm in engine.store.list_vms()}
    if engine.settings.vms_dir.exists():
        for stray in engine.settings.vms_dir.iterdir():
            if stray.name not in known:
                log.warning("removing files of unknown VM %s", stray.name)
                shutil.rmtree(stray, ignore_errors=True)
    engine.images.clean_staging()


async def _recover_one(engine: Engine, record: VmRecord) -> bool:
    layout = engine.host.layout(record.id)
    for consumed in layout.root.glob(".consumed-*"):
        shutil.rmtree(consumed, ignore_errors=True)
    for stray in layout.root.glob(".suspend.tmp-*"):  # a suspend cut short
        move_files(stray, layout.root, VM_FILES)
        shutil.rmtree(stray, ignore_errors=True)
    alive = record.pid > 0 and record.pid in engine.host.cgroup_pids(record.id)
    if record.state is VmState.SUSPENDED:
        await engine.host.stop(record.id, None)
        return False
    if record.state in (VmState.TERMINATING, VmState.PENDING):
        await engine.host.teardown(record.id, None)
        engine.store.delete_vm(record.id)
        return False
    if record.state is VmState.FAILED or not alive:
        await engine.host.stop(record.id, None)
        if record.state in (VmState.SUSPENDING, VmState.RESUMING) and (layout.suspend_dir / "manifest.json").exists():
            # a resume cut short: its files go back (checked against their hashes on the next resume)
            manifest = load_manifest(layout.suspend_dir)
            move_files(layout.root, layout.suspend_dir, [n for n in VM_FILES if n in manifest.files])
            if "ram" not in manifest.files:
                layout.ram.unlink(missing_ok=True)
            engine.save(record.moved(VmState.SUSPENDED, StopReason.DAEMON_RESTART.value, pid=0))
        elif record.state is not VmState.FAILED:
            vlog(record.id).error("VMM gone after a daemon restart; marking FAILED")
            engine.save(record.moved(VmState.FAILED, StopReason.VMM_EXITED.value, pid=0))
        return False
    # The VMM is alive: ask it, then re-attach to the agent.
    paths = layout.run_paths(layout.ram)
    vmm = await QemuVmm.adopt(record.pid, paths)
    status = await vmm.status()
    if status != "running":
        await vmm.resume()  # an interrupted suspend or resume left it paused
    agent, token = None, ""
    for token in filter(None, (record.next_token, record.token)):
        with contextlib.suppress(AgentUnavailable):
            limits = ChannelLimits.of(engine.settings)
            agent = await AgentConnection.connect(paths.agent_socket, token, 5, limits=limits)
            break
    if agent is None:
        await vmm.shutdown()
        raise SnapshotError("the guest agent did not accept this VM's token")
    if record.state is VmState.RESUMING:
        # the interrupted restore may not have reached the identity step
        await agent.restore_identity(record.id, token, os.urandom(64), time.time_ns())
        shutil.rmtree(layout.suspend_dir, ignore_errors=True)
    reason = StopReason.DAEMON_RESTART.value if status != "running" else ""
    engine.take_charge(record, VmRuntime(record.id, vmm, agent), token, reason)
    vlog(record.id).info("re-adopted running VM (pid %d)", record.pid)
    return True
