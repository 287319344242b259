"""The idle scheduler: a daemon chore that applies each VM's idle policy and lifetime every
EMBER_IDLE_CHECK_S (:mod:`ember.lifecycle.policy` decides; this module measures and acts).

Every pass, for every live VM: one past its maximum duration, or SUSPENDED past its suspended TTL, is
terminated (reasons ``max_duration``, ``suspended_ttl``; the deadlines are computed from timestamps on its
record, so they hold across daemon restarts). A RUNNING VM with an idle timeout has its VMM's CPU time sampled
(``/proc/<pid>/stat``, user + system, all threads) and its guest asked whether it holds itself awake or asks to
be suspended (``ember-idle``); one idle for its timeout, or asking, is suspended (reason ``idle``), or
terminated if its suspended TTL is 0. A check that fails (no CPU sample, a guest that does not answer) never
moves a VM: it is looked at again next pass. Every transition is the daemon's own (actor ``system``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

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


class Scheduler:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.settings = engine.settings
        self._watches: dict[str, _Watch] = {}

    async def run(self) -> None:
        while True:
            try:
                await self.check_all()
            except Exception:  # a busy or full database: next pass
                log.exception("the idle scheduler's pass failed")
            await asyncio.sleep(self.settings.idle_check_s)

    async def check_all(self) -> None:
        records = await asyncio.to_thread(self.engine.store.list_vms)
        for gone in self._watches.keys() - {r.id for r in records}:
            del self._watches[gone]
        for record in records:
            try:
                await self.check(record)
            except EmberError as exc:  # e.g. a suspend that failed: the engine recorded it; next pass
                vlog(record.id).warning("automatic lifecycle step failed: %s", exc)
            except Exception:
                vlog(record.id).exception("automatic lifecycle step failed")

    async def check(self, record: VmRecord) -> None:
        ended = lifetime_end(record, datetime.now(UTC))
        if ended is not None:
            vlog(record.id).info("terminating: %s", ended.value)
            await self._terminate(record.id, ended)
            return
        if record.state is not VmState.RUNNING or record.idle.idle_timeout_s is None:
            self._watches.pop(record.id, None)
            return
        if not self.engine.has_runtime(record.id):
            return  # not adopted (agent unreachable after a restart): nothing to measure
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
            return
        try:
            guest = await self.engine.guest_idle_state(record.id, self.settings.idle_guest_answer_s)
        except EmberError as exc:
            vlog(record.id).debug("no idle state from the guest (%s): not idle this pass", exc)
            watch.last_busy = now
            return
        if guest.hold:
            watch.last_busy = now
        idle_s = idle_seconds(
            now=now, running_since=watch.running_since, last_active=activity.last_active(record.id),
            last_busy=watch.last_busy,
        )  # fmt: skip
        # a guest that holds itself awake is not suspended even if it also asked (its request is dropped)
        action = idle_action(record.idle, idle_s, suspend_asked=guest.suspend_now and not guest.hold)
        if action is None:
            return
        async with activity.closing(record.id) as free:
            if not free:
                return
            why = "asked by the guest (ember-idle suspend)" if guest.suspend_now else ""
            why = why or f"idle for {idle_s:.1f} s (timeout {record.idle.idle_timeout_s} s)"
            vlog(record.id).info("%s: %s", "terminating" if action is IdleAction.TERMINATE else "suspending", why)
            try:
                if action is IdleAction.TERMINATE:
                    await self._terminate(record.id, StateReason.IDLE, why)
                else:
                    await self.engine.suspend(record.id, reason=StateReason.IDLE, message=why)
            finally:
                watch.last_busy = time.monotonic()  # a failed suspend waits a whole timeout again

    async def _terminate(self, vm_id: str, reason: StateReason, message: str = "") -> None:
        await self.engine.remove(vm_id, reason=reason, message=message)
        self._watches.pop(vm_id, None)
        self.engine.activity.forget(vm_id)
