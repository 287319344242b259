"""The idle scheduler: a daemon chore that applies each VM's idle policy and lifetime every
EMBER_IDLE_CHECK_S (:mod:`ember.lifecycle.policy` decides; this module measures and acts).

Every pass, for every live VM: one past its maximum duration, or SUSPENDED past its suspended TTL, is
terminated (reasons ``max_duration``, ``suspended_ttl``; the deadlines are computed from timestamps on its
record, so they hold across daemon restarts). A RUNNING VM with an idle timeout has its VMM's CPU time sampled
(``/proc/<pid>/stat``, user + system, all threads) and its guest asked whether it holds itself awake or asks to
be suspended (``ember-idle``); one idle for its timeout, or asking, is suspended (reason ``idle``), or
terminated if its suspended TTL is 0. A check that fails (no CPU sample, a guest that does not answer) never
moves a VM: it is looked at again next pass. Every transition is the daemon's own (actor ``system``).

Nothing a guest controls holds up a pass, so one tenant's VMs delay no other tenant's: a pass reads the
records and decides the lifetimes itself (no guest is asked), and starts the rest as tasks it does not wait
for. Each idle check is one task (EMBER_IDLE_CHECK_CONCURRENCY at once); each suspend or termination is one
task, and :class:`_InFlight` keeps at most one check and one action per VM: a VM whose check or action is
still running is skipped by the next pass, never given a second one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import TYPE_CHECKING, Any

from ember.errors import EmberError
from ember.lifecycle.policy import CpuSample, IdleAction, cpu_busy, idle_action, idle_seconds, lifetime_end
from ember.logs import vlog
from ember.models import StateReason, VmRecord, VmState

if TYPE_CHECKING:
    from ember.engine import Engine

log = logging.getLogger(__name__)
TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def stat_cpu_seconds(raw: bytes) -> float:
    """User + system CPU seconds (all threads) from a ``/proc/<pid>/stat`` line. The command name in it is the
    VMM's to choose (it may hold ')' and spaces): the fields are read after the last ')'."""
    fields = raw.rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS_PER_S


def vmm_cpu(pid: int) -> float | None:
    """The process's CPU seconds so far, or None if they cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return stat_cpu_seconds(f.read(4096))
    except (OSError, IndexError, ValueError):
        return None


@dataclass
class _Watch:
    """What the scheduler knows of one RUNNING VM with an idle timeout (in memory: a restarted daemon, or a new
    VMM after a resume, starts its idle time again)."""

    pid: int
    running_since: float
    cpu: CpuSample | None = None
    last_busy: float = 0.0


class _InFlight:
    """The tasks of one kind (checks, or actions) running for VMs: at most one per VM. Their failures are
    logged, never raised: a failed step is tried again by a later pass."""

    def __init__(self, kind: str) -> None:
        self._kind = kind
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def __contains__(self, vm_id: str) -> bool:
        return vm_id in self._tasks

    def start(self, vm_id: str, work: Callable[[], Coroutine[Any, Any, None]]) -> bool:
        """Run ``work()`` for the VM unless one is already running for it (then False, and ``work`` is not
        called)."""
        if vm_id in self._tasks:
            return False
        task = asyncio.create_task(self._logged(vm_id, work()), name=f"{self._kind}-{vm_id}")
        self._tasks[vm_id] = task
        task.add_done_callback(partial(self._finished, vm_id))
        return True

    def _finished(self, vm_id: str, task: asyncio.Task[None]) -> None:
        if self._tasks.get(vm_id) is task:
            del self._tasks[vm_id]

    async def _logged(self, vm_id: str, work: Coroutine[Any, Any, None]) -> None:
        try:
            await work
        except EmberError as exc:  # e.g. a suspend that failed: the engine recorded it; next pass
            vlog(vm_id).warning("automatic lifecycle %s failed: %s", self._kind, exc)
        except Exception:
            vlog(vm_id).exception("automatic lifecycle %s failed", self._kind)

    async def cancel(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class Scheduler:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.settings = engine.settings
        self._watches: dict[str, _Watch] = {}
        self._checks = _InFlight("check")  # idle checks: CPU sample, guest's answer, decision
        self._actions = _InFlight("step")  # suspends and terminations
        self._slots = asyncio.Semaphore(self.settings.idle_check_concurrency)

    async def run(self) -> None:
        try:
            while True:
                try:
                    await self.check_all()
                except Exception:  # a busy or full database: next pass
                    log.exception("the idle scheduler's pass failed")
                await asyncio.sleep(self.settings.idle_check_s)
        finally:  # the daemon stops: so does the work in flight (as an awaited step was before)
            await self._checks.cancel()
            await self._actions.cancel()

    async def check_all(self) -> None:
        """One pass: end expired VMs and start idle checks; waits for neither (only for the records)."""
        records = await asyncio.to_thread(self.engine.store.list_vms)
        now = datetime.now(UTC)
        for gone in self._watches.keys() - {r.id for r in records}:
            del self._watches[gone]
        for record in records:
            if record.id in self._actions:
                continue  # its suspend or termination is still running: looked at again next pass
            ended = lifetime_end(record, now)
            if ended is not None:
                vlog(record.id).info("terminating: %s", ended.value)
                self._actions.start(record.id, partial(self._terminate, record.id, ended))
            elif record.state is not VmState.RUNNING or record.idle.idle_timeout_s is None:
                self._watches.pop(record.id, None)
            elif self.engine.has_runtime(record.id):  # else not adopted (agent unreachable after a restart)
                self._checks.start(record.id, partial(self._check_idle, record))

    async def _check_idle(self, record: VmRecord) -> None:
        async with self._slots:
            decided = await self._measure(record)
        if decided is None or not self.engine.has_runtime(record.id):
            return  # nothing to do, or ended meanwhile
        action, why, watch = decided
        self._actions.start(record.id, partial(self._idle_step, record.id, action, why, watch))

    async def _measure(self, record: VmRecord) -> tuple[IdleAction, str, _Watch] | None:
        """Sample the VMM's CPU and ask the guest; what to do with the VM if it is idle (or asks), else None."""
        if record.id in self._actions or not self.engine.has_runtime(record.id):
            return None  # a termination started while this check waited for a slot
        now = time.monotonic()
        watch = self._watches.get(record.id)
        if watch is None or watch.pid != record.pid:
            watch = self._watches[record.id] = _Watch(pid=record.pid, running_since=now)
        cpu = vmm_cpu(record.pid)
        sample = CpuSample(now, cpu) if cpu is not None else None
        if sample is None or watch.cpu is None or cpu_busy(watch.cpu, sample, self.settings.idle_cpu_threshold):
            watch.last_busy = now
        if sample is not None and watch.cpu is not None and sample.at > watch.cpu.at:
            rate = (sample.cpu_s - watch.cpu.cpu_s) / (sample.at - watch.cpu.at)
            vlog(record.id).debug("VMM CPU %.4f cores over %.2f s", rate, sample.at - watch.cpu.at)
        watch.cpu = sample
        activity = self.engine.activity
        if activity.busy(record.id):
            watch.last_busy = now
            return None
        try:
            guest = await self.engine.guest_idle_state(record.id, self.settings.idle_guest_answer_s)
        except EmberError as exc:
            vlog(record.id).debug("no idle state from the guest (%s): not idle this pass", exc)
            watch.last_busy = now
            return None
        if guest.hold:
            watch.last_busy = now
        idle_s = idle_seconds(
            now=now, running_since=watch.running_since, last_active=activity.last_active(record.id),
            last_busy=watch.last_busy,
        )  # fmt: skip
        # a guest that holds itself awake is not suspended even if it also asked (its request is dropped)
        action = idle_action(record.idle, idle_s, suspend_asked=guest.suspend_now and not guest.hold)
        if action is None:
            return None
        why = "asked by the guest (ember-idle suspend)" if guest.suspend_now else ""
        return action, why or f"idle for {idle_s:.1f} s (timeout {record.idle.idle_timeout_s} s)", watch

    async def _idle_step(self, vm_id: str, action: IdleAction, why: str, watch: _Watch) -> None:
        async with self.engine.activity.closing(vm_id) as free:
            if not free:
                return  # used since the check: not idle
            vlog(vm_id).info("%s: %s", "terminating" if action is IdleAction.TERMINATE else "suspending", why)
            try:
                if action is IdleAction.TERMINATE:
                    await self._terminate(vm_id, StateReason.IDLE, why)
                else:
                    await self.engine.suspend(vm_id, reason=StateReason.IDLE, message=why)
            finally:
                watch.last_busy = time.monotonic()  # a failed suspend waits a whole timeout again

    async def _terminate(self, vm_id: str, reason: StateReason, message: str = "") -> None:
        await self.engine.remove(vm_id, reason=reason, message=message)
        self._watches.pop(vm_id, None)
        self.engine.activity.forget(vm_id)
