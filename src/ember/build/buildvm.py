"""The micro-VM a build stage runs in: RUN steps are untrusted code, so they run here.

The VM runs Ember's build initramfs (agent in build mode plus a static
busybox) with the stage's layer chain as its root disk, mounted at /newroot
and never entered by the agent itself: steps run chrooted into it, Ember's
tools run from outside it. Each finished step becomes a layer: the guest
syncs and freezes the filesystem, QEMU switches the disk to a new qcow2
overlay (the old top is never written again), the guest thaws.

It is restored from the builder snapshot (ember.build.template) with the
stage's disks behind the snapshot's devices; it cold-boots only when they do
not fit there. Either way its agent mounts the root disk at the identity step
(RESTORE), after dropping what its kernel read of the disks before.

A RUN step is root in the guest and can stop the agent from ever answering,
so every exec here has a deadline on the host too: when it passes, the build
VM is killed and the step fails. Its serial log is capped like a launched VM's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

from ember.agent import AgentConnection, ExecRequest, ExecResult, identity_request
from ember.build.template import BuilderTemplate, device_args
from ember.errors import BuildFailed, EmberError
from ember.guest.artifacts import BUILD_TOOL
from ember.microvm import MicroVm, VmPlan
from ember.runtime import Host, new_ram_file
from ember.snapshot import load_verified, migration_deadline
from ember.vmm.machine import DiskChain, MachineConfig, RamBacking, RamMode
from ember.vmm.qemu import Vmm

log = logging.getLogger(__name__)
T = TypeVar("T")

ROOT = "/newroot"
RESOLV_CONF = Path("/etc/resolv.conf")
OUTPUT_TAIL = 4000
# A RUN step's host deadline passes this long after the agent's own timeout (which reports output and status).
HOST_GRACE_S = 5.0


@dataclass(frozen=True)
class StepOutput:
    result: ExecResult
    tail: str
    limit_s: float = 0.0  # the step's time limit
    vm_killed: bool = False  # the host deadline passed: the build VM was killed


@dataclass(frozen=True)
class Deadlines:
    """Host-side limits on what runs in a build VM."""

    boot_s: float
    tool_s: float  # one of Ember's tools (mkdir, tar, fsfreeze, kill)


class BuildVm:
    def __init__(self, vm: MicroVm, agent: AgentConnection, top: Path, uid: int, deadlines: Deadlines) -> None:
        self.vm = vm
        self.vm_id = vm.id
        self.agent = agent
        self.top = top
        self.uid = uid
        self.deadlines = deadlines

    @property
    def vmm(self) -> Vmm:
        return self.vm.vmm

    @classmethod
    async def start(
        cls, host: Host, machine: MachineConfig, token: str, top: Path, readonly: list[Path], network: bool,
        uid: int, deadlines: Deadlines,
    ) -> BuildVm:  # fmt: skip
        """Cold-boot a build VM (when the builder snapshot does not fit: see :meth:`restore`);
        ``machine`` must use the build initramfs and ``ember.build=1``.

        Its VMM runs as ``uid`` (the build's own) and sees, besides its own RAM file, only
        the layer directory (0710, not listable): finished layers are root's, 0440 with the
        layer group, which it has; the layer it writes is its uid's. New layers are created
        there while it runs (see :meth:`new_layer`)."""
        vm_id = f"build-{secrets.token_hex(4)}"
        ram = host.control_dir(vm_id).path / "ram"
        plan = VmPlan(
            vm_id=vm_id, machine=machine, disk=DiskChain(top), ram=RamBacking(ram, RamMode.OWN), uid=uid,
            groups=(host.settings.layer_gid,), network=network, extra_args=device_args(network, readonly),
            ro_paths=_resolv_conf(network), rw_paths=(top.parent,),
        )  # fmt: skip
        vm = await MicroVm.start(host, plan, prepare=lambda: new_ram_file(ram, machine.memory_mib, uid))
        try:
            agent = await vm.connect_agent(token, deadlines.boot_s, first_boot=True)
            await agent.restore_identity(vm_id, token, os.urandom(64), time.time_ns())  # mounts the root disk
        except BaseException:
            log.error("build VM did not start: %s", vm.serial_tail(2000))
            await vm.close()
            raise
        return await cls(vm, agent, top, uid, deadlines)._devices(network, len(readonly))

    @classmethod
    async def restore(
        cls, host: Host, template: BuilderTemplate, top: Path, readonly: list[Path], network: bool, uid: int,
        deadlines: Deadlines,
    ) -> BuildVm:  # fmt: skip
        """A build VM restored from ``template`` (its layout: ``network``; ``readonly`` fits its
        slots) with ``top`` behind its root device. Its RAM is the template's file mapped
        privately and read-only (what it writes is its own); its VMM is confined as in
        :meth:`start`. It runs only after the template's state passed its SHA-256 check, and
        gets a fresh identity (RNG seed, clock, hostname, token) at once."""
        vm_id = f"build-{secrets.token_hex(4)}"
        plan = VmPlan(
            vm_id=vm_id, machine=template.machine, disk=DiskChain(top), ram=RamBacking(template.ram, RamMode.CLONE),
            uid=uid, groups=(host.settings.layer_gid,), incoming=True, network=network,
            extra_args=device_args(network, template.slots(readonly)),
            ro_paths=(template.blank_disk, *_resolv_conf(network)), rw_paths=(top.parent,),
        )  # fmt: skip
        vm = await MicroVm.start(host, plan)
        try:
            agent = await vm.open_agent(deadlines.boot_s)
            async with migration_deadline(host.settings.migration_timeout_s, "loading the builder snapshot"):
                await load_verified(vm.vmm, template.snapshot.state, template.state, ignore_shared=True)
            await vm.vmm.resume()
            identity = identity_request(vm_id, secrets.token_hex(16), os.urandom(64), time.time_ns())
            await agent.authenticate(template.token, deadlines.boot_s, then=identity)  # mounts the root disk
        except BaseException:
            log.error("build VM did not restore: %s", vm.serial_tail(2000))
            await vm.close()
            raise
        return await cls(vm, agent, top, uid, deadlines)._devices(network, len(readonly))

    async def _devices(self, network: bool, readonly: int) -> BuildVm:
        """Bring up the NIC and mount the COPY --from disks (by serial); the VM is stopped if that fails."""
        try:
            if network:
                await self.tool_ok(["sh", "-c", "ip link set lo up; ip addr add 10.0.2.15/24 dev eth0 && "
                                    "ip link set eth0 up && ip route add default via 10.0.2.2"])  # fmt: skip
            for i in range(readonly):
                script = (
                    f'for d in /sys/block/vd*; do if [ "$(cat $d/serial 2>/dev/null)" = ember-ro{i} ]; then '
                    f"mkdir -p /ember/from{i} && exec mount -t ext4 -o ro,noload /dev/${{d##*/}} /ember/from{i}; "
                    "fi; done; exit 1"
                )
                await self.tool_ok(["sh", "-c", script])
        except BaseException:
            await self.stop()
            raise
        return self

    async def tool(
        self, argv: list[str], root: str = "", stdin: AsyncIterator[bytes] | None = None,
        sink: Callable[[bytes], object] | None = None,
    ) -> StepOutput:  # fmt: skip
        """Run Ember's busybox applet ``argv`` (chrooted into the image if ``root``)."""
        req = ExecRequest(argv=[BUILD_TOOL, *argv], root=root, tool=True)
        limit = self.deadlines.tool_s
        out = await self._exec(req, stdin, sink, None, limit)
        if out.vm_killed:
            raise BuildFailed(f"Ember's build tool '{argv[0]}' did not finish within {limit:.0f} s "
                              "(EMBER_BUILD_TOOL_TIMEOUT); the build VM was stopped")  # fmt: skip
        return out

    async def tool_ok(self, argv: list[str], root: str = "", stdin: AsyncIterator[bytes] | None = None) -> None:
        out = await self.tool(argv, root, stdin)
        if out.result.exit_code != 0:
            raise EmberError(f"build VM tool {argv[0]} failed: {out.tail.strip()[-1000:]}")

    async def run(
        self, argv: list[str], env: list[str], cwd: str, user: str, timeout_s: float, on_output: Callable[[str], None]
    ) -> StepOutput:
        """Run a step; the agent stops it at ``timeout_s``, and if the agent does not answer by
        then (the step may have stopped it), the host kills the build VM."""
        req = ExecRequest(argv=argv, env=env, cwd=cwd, user=user, timeout_s=timeout_s, root=ROOT)
        out = await self._exec(req, None, None, on_output, timeout_s + HOST_GRACE_S)
        out = replace(out, limit_s=timeout_s)
        if not out.vm_killed:
            # the step is over: as when a container exits, nothing it started keeps running
            await self.tool(["kill", "-9", "-1"])
        return out

    async def _exec(
        self, req: ExecRequest, stdin: AsyncIterator[bytes] | None, sink: Callable[[bytes], object] | None,
        on_output: Callable[[str], None] | None, deadline_s: float,
    ) -> StepOutput:  # fmt: skip
        """Run ``req``; past ``deadline_s`` the VM is killed and a timed-out result comes back
        with ``vm_killed`` set. Killing it first frees whatever waits on the agent."""
        tail = ""

        async def consume() -> ExecResult:
            nonlocal tail
            result: ExecResult | None = None
            async for item in self.agent.exec(req, stdin):
                if isinstance(item, ExecResult):
                    result = item
                elif sink is not None and item[0] == "stdout":
                    sink(item[1])
                else:
                    text = item[1].decode(errors="replace")
                    tail = (tail + text)[-OUTPUT_TAIL:]
                    if on_output is not None:
                        on_output(text)
            assert result is not None
            return result

        task = asyncio.create_task(consume())
        expired = False
        try:
            done, _ = await asyncio.wait({task}, timeout=deadline_s)
            expired = not done
        finally:
            if not task.done():  # the deadline passed (or the build was cancelled)
                await self.stop()
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        if expired:
            log.warning("%s: %s did not finish within %.0f s; build VM stopped", self.vm_id, req.argv[0], deadline_s)
            return StepOutput(ExecResult(exit_code=-1, signal=0, timed_out=True), tail, vm_killed=True)
        return StepOutput(task.result(), tail)

    async def sync(self) -> None:
        await self.agent.sync()

    async def new_layer(self, overlay: Path) -> None:
        """Freeze the current top as a finished layer and continue on ``overlay`` (made in the
        same directory, which the VMM sees)."""
        await self.vm.host.qemu_img.create_overlay(
            self.top, overlay, owner_uid=self.uid, virtual_size=self.vm.host.settings.disk_gib << 30
        )
        await self.tool_ok(["fsfreeze", "--freeze", ROOT])
        try:
            await self.vmm.switch_disk(overlay)
        finally:
            await self.tool_ok(["fsfreeze", "--unfreeze", ROOT])
        self.top = overlay

    async def within(self, what: str, work: Awaitable[T]) -> T:
        """``work`` with the tool deadline: past it the VM is killed (which frees what waits on
        its agent) and the build fails naming ``what``."""
        try:
            async with asyncio.timeout(self.deadlines.tool_s):
                return await work
        except TimeoutError:
            await self.stop()
            raise BuildFailed(
                f"{what} did not finish within {self.deadlines.tool_s:.0f} s (EMBER_BUILD_TOOL_TIMEOUT); "
                "the build VM stopped answering and was killed"
            ) from None

    async def stop(self) -> None:
        """Kill the VM and free everything it held (safe to repeat)."""
        await self.vm.close()


def _resolv_conf(network: bool) -> tuple[Path, ...]:
    """QEMU's user-mode network forwards the guest's DNS to the host's resolvers, read from here."""
    return (RESOLV_CONF,) if network else ()


def step_failed(what: str, out: StepOutput, hint: str = "") -> BuildFailed:
    """The error of a step that failed; ``hint`` (one line: what to do) ends it."""
    r = out.result
    if r.timed_out:
        why = f"did not finish within {out.limit_s:.0f} s (EMBER_BUILD_STEP_TIMEOUT)"
        if out.vm_killed:
            why += "; the build VM stopped answering and was killed"
    else:
        why = f"killed by signal {r.signal}" if r.signal else f"exit code {r.exit_code}"
    message = f"{why}; its last output:\n{out.tail.strip()[-2000:]}"
    return BuildFailed(f"{message}\n{hint}" if hint else message, what)
