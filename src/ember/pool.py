"""Pre-started VMMs: a launch skips QEMU's start-up (the largest part of it).

For each image that has been launched, the pool keeps ``EMBER_POOL_SIZE``
jailed clones: id, uid, cgroup and disk overlay in place, the image's
snapshot restored, run for one agent round trip and one ``exec true`` (under
TCG the first pass over guest code after a restore pays for translating it:
~50 ms for the agent, ~190 ms for fork/exec) and paused. A launch
takes one, lets it run and gives it its identity (fresh RNG seed, clock,
hostname, token); a background task refills the pool. Entries are not VMs yet:
they are not in the database, so a restarted daemon reaps them like any
other leftover.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ember.agent import AgentConnection
from ember.models import ImageRecord
from ember.runtime import Host
from ember.vmm.qemu import QemuVmm

log = logging.getLogger(__name__)


@dataclass
class Warm:
    vm_id: str
    uid: int
    vmm: QemuVmm
    agent: AgentConnection


# (vm_id, uid, image) -> a restored, paused VMM and its authenticated agent connection
Starter = Callable[[str, int, ImageRecord], Awaitable[tuple[QemuVmm, AgentConnection]]]


def new_vm_id() -> str:
    return "vm-" + secrets.token_hex(6)


class WarmPool:
    def __init__(
        self, host: Host, size: int, allocate_uid: Callable[[], int], release_uid: Callable[[int], None]
    ) -> None:
        self.host = host
        self.size = size
        self._allocate_uid = allocate_uid
        self._release_uid = release_uid
        self._entries: dict[tuple[str, str], list[Warm]] = {}
        self._fillers: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._discards: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Condition()

    @staticmethod
    def key(image: ImageRecord) -> tuple[str, str]:
        return (image.name, image.created_at)

    async def take(self, image: ImageRecord, wait_s: float = 1.0) -> Warm | None:
        """A warm entry for ``image``; waits up to ``wait_s`` for one being made
        (right after a daemon start or an image build) rather than starting cold."""
        key = self.key(image)
        deadline = asyncio.get_running_loop().time() + wait_s
        async with self._changed:
            while True:
                entries = self._entries.get(key, [])
                while entries:
                    warm = entries.pop(0)
                    if warm.vmm.alive() and not warm.agent.closed:
                        return warm
                    task = asyncio.create_task(self._discard(warm))
                    self._discards.add(task)
                    task.add_done_callback(self._discards.discard)
                filler = self._fillers.get(key)
                left = deadline - asyncio.get_running_loop().time()
                if filler is None or filler.done() or left <= 0:
                    return None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), left)

    def refill(self, image: ImageRecord, start: Starter) -> None:
        key = self.key(image)
        if self.size <= 0 or (key in self._fillers and not self._fillers[key].done()):
            return
        self._fillers[key] = asyncio.create_task(self._fill(image, start), name=f"pool-{image.name}")

    async def _fill(self, image: ImageRecord, start: Starter) -> None:
        key = self.key(image)
        entries = self._entries.setdefault(key, [])
        while len(entries) < self.size:
            vm_id, uid = new_vm_id(), self._allocate_uid()
            try:
                vmm, agent = await start(vm_id, uid, image)
            except BaseException as exc:  # cancelled by close() too: never leave a half-started VMM
                await self.host.teardown(vm_id, None)
                self._release_uid(uid)
                if not isinstance(exc, Exception):
                    raise
                log.warning("could not pre-start a VMM for image %s: %s", image.name, exc)
                async with self._changed:
                    self._changed.notify_all()  # nobody should wait for an entry that will not come
                return
            entries.append(Warm(vm_id, uid, vmm, agent))
            async with self._changed:
                self._changed.notify_all()

    async def _discard(self, warm: Warm) -> None:
        with contextlib.suppress(Exception):
            await warm.agent.close()
        await warm.vmm.shutdown()
        await self.host.teardown(warm.vm_id, None)
        self._release_uid(warm.uid)

    async def drop(self, image: ImageRecord) -> None:
        """Discard every warm entry of ``image`` (it is being removed)."""
        key = self.key(image)
        filler = self._fillers.pop(key, None)
        if filler is not None:
            filler.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await filler
        for warm in self._entries.pop(key, []):
            await self._discard(warm)

    async def close(self) -> None:
        for task in self._fillers.values():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await asyncio.gather(*self._discards, return_exceptions=True)
        for entries in self._entries.values():
            for warm in entries:
                await self._discard(warm)
        self._entries.clear()
