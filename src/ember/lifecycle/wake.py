"""Auto-resume: ``await engine.wake(vm_id)`` returns once the VM is RUNNING.

A SUSPENDED VM run with auto-resume is resumed (reason ``auto_resume``, actor ``system``); one being
suspended or resumed is waited for, then looked at again. It is held to the tenant's quotas as a resume
request is (running VMs, vCPUs, memory: 429 QuotaExceeded to every caller). Concurrent callers share one resume
(single flight),
which a caller that goes away does not cancel. Without auto-resume, or in any other state, the caller gets the
error a request to a VM that is not running always got.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from typing import TYPE_CHECKING

from ember.errors import InvalidStateTransition
from ember.models import StateReason, VmRecord, VmState, require_running

if TYPE_CHECKING:
    from ember.engine import Engine

WAKEABLE = frozenset({VmState.SUSPENDED, VmState.SUSPENDING, VmState.RESUMING})
LOOKS = 4  # a VM moved by someone else between two looks is looked at again, this many times at most


class Waker:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._flights: dict[str, asyncio.Task[None]] = {}

    async def wake(self, vm_id: str, *, action: str = "reach") -> VmRecord:
        record = self._engine.get(vm_id)
        for _ in range(LOOKS):
            if record.state is VmState.RUNNING:
                return record
            if not (record.idle.auto_resume and record.state in WAKEABLE):
                break
            flight = self._flights.get(vm_id)
            if flight is None:
                # the daemon's own work (actor "system"), and no caller's cancellation stops it
                flight = asyncio.create_task(self._resume(vm_id), name=f"wake-{vm_id}", context=contextvars.Context())
                self._flights[vm_id] = flight
                flight.add_done_callback(lambda _: self._flights.pop(vm_id, None))
            with contextlib.suppress(InvalidStateTransition):  # moved meanwhile (a user's resume or remove): look again
                await asyncio.shield(flight)
            record = self._engine.get(vm_id)
        require_running(vm_id, record.state, action)
        return record

    async def _resume(self, vm_id: str) -> None:
        async with self._engine.lock(vm_id):  # a suspend in flight finishes first
            pass
        record = self._engine.get(vm_id)
        if record.state is not VmState.SUSPENDED:
            return
        admit = self._engine.admit_resume
        async with admit(record) if admit is not None else contextlib.nullcontext():  # quotas, as a resume's
            await self._engine.resume(vm_id, reason=StateReason.AUTO_RESUME)
