"""What keeps a VM busy, and when it was last used (in memory: after a daemon restart every VM's idle
time starts again).

``hold(vm_id)`` marks the VM busy for as long as the block runs (an exec and its output stream, a file
transfer, a shell, an open ingress connection); ``touch(vm_id)`` records one use (an ingress request). The
idle scheduler suspends a VM only through :meth:`Activity.closing`, which refuses while anything holds it and
makes new holders wait until the suspend has finished (they then wake the VM again, :mod:`ember.lifecycle.wake`):
a VM is never suspended under a request that has started.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator


class Activity:
    def __init__(self) -> None:
        self._holds: dict[str, int] = {}
        self._last: dict[str, float] = {}
        self._closing: dict[str, asyncio.Event] = {}

    def touch(self, vm_id: str) -> None:
        """The VM was used now."""
        self._last[vm_id] = time.monotonic()

    def last_active(self, vm_id: str) -> float:
        """Monotonic time of its last use (0: none since the daemon started)."""
        return self._last.get(vm_id, 0.0)

    def busy(self, vm_id: str) -> bool:
        return self._holds.get(vm_id, 0) > 0

    @contextlib.asynccontextmanager
    async def hold(self, vm_id: str) -> AsyncIterator[None]:
        """The VM is busy inside this block. Waits first while the scheduler suspends it."""
        while (closing := self._closing.get(vm_id)) is not None:
            await closing.wait()
        self._holds[vm_id] = self._holds.get(vm_id, 0) + 1
        self.touch(vm_id)
        try:
            yield
        finally:
            self.touch(vm_id)
            left = self._holds[vm_id] - 1
            if left:
                self._holds[vm_id] = left
            else:
                del self._holds[vm_id]

    @contextlib.asynccontextmanager
    async def closing(self, vm_id: str) -> AsyncIterator[bool]:
        """For the scheduler: yields False if the VM is busy (do nothing), else True, and new holders wait
        until the block ends."""
        if self.busy(vm_id) or vm_id in self._closing:
            yield False
            return
        gate = self._closing[vm_id] = asyncio.Event()
        try:
            yield True
        finally:
            del self._closing[vm_id]
            gate.set()

    def forget(self, vm_id: str) -> None:
        """The VM is gone: drop what is kept of it (holders, if any, clean up after themselves)."""
        self._last.pop(vm_id, None)
