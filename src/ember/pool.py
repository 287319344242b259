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

A pre-start that fails (a loaded machine, a guest slow to answer) is retried
with backoff, so the pool heals without a daemon restart; an image being
removed is dropped first, and no refill starts for it afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import shutil
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ember import metrics
from ember.microvm import MicroVm
from ember.models import ImageRecord
from ember.runtime import Host

log = logging.getLogger(__name__)

RETRY_DELAYS_S = (1.0, 2.0, 5.0, 10.0, 30.0)  # then every 30 s while the image is launched


@dataclass
class Warm:
    vm: MicroVm
    uid: int


# (vm_id, uid, image) -> a restored, paused clone with its authenticated agent connection
Starter = Callable[[str, int, ImageRecord], Awaitable[MicroVm]]


def new_vm_id() -> str:
    return "vm-" + secrets.token_hex(6)


class WarmPool:
    def __init__(self, host: Host, size: int, start: Starter, *, budget: int) -> None:
        self.host = host
        self.size = size
        self.budget = budget  # warm and pre-starting VMMs of every image together
        self._start = start
        self._used: dict[tuple[str, str], float] = {}  # when each image last asked for a refill (a launch, a build)
        self._entries: dict[tuple[str, str], list[Warm]] = {}
        self._making: dict[tuple[str, str], set[asyncio.Task[None]]] = {}  # pre-starts in flight
        self._failures: dict[tuple[str, str], int] = {}  # consecutive failed pre-starts
        self._dropped: set[tuple[str, str]] = set()
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
                    if warm.vm.alive() and warm.vm.agent is not None and not warm.vm.agent.closed:
                        metrics.pool_hit()
                        return warm
                    self._discard_later(warm)
                left = deadline - asyncio.get_running_loop().time()
                if not self._making.get(key) or left <= 0:
                    metrics.pool_miss()
                    return None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), left)

    def refill(self, image: ImageRecord) -> None:
        """Start a pre-start for every missing entry at once: a pre-start is mostly the guest's
        first run under TCG, so two in flight use both cores and keep up with launches."""
        key = self.key(image)
        if self.size <= 0 or key in self._dropped:
            return
        self._used[key] = asyncio.get_running_loop().time()
        making = self._making.setdefault(key, set())
        for _ in range(self.size - len(self._entries.get(key, [])) - len(making)):
            if self.warm_count() >= self.budget and not self._evict_for(key):
                return  # every warm VMM belongs to an image launched more recently
            task = asyncio.create_task(self._make(image), name=f"pool-{image.name}")
            making.add(task)
            task.add_done_callback(making.discard)

    async def _make(self, image: ImageRecord) -> None:
        key = self.key(image)
        vm_id, uid = new_vm_id(), self.host.uids.allocate()
        try:
            warm = Warm(await self._start(vm_id, uid, image), uid)
        except BaseException as exc:  # cancelled by drop() or close() too: the starter freed what it held
            await asyncio.to_thread(shutil.rmtree, self.host.layout(vm_id).root, True)
            self.host.uids.release(uid)
            if not isinstance(exc, Exception):
                raise
            failures = self._failures[key] = self._failures.get(key, 0) + 1
            delay = RETRY_DELAYS_S[min(failures - 1, len(RETRY_DELAYS_S) - 1)]
            log.warning("could not pre-start a VMM for image %s (%s); retrying in %.0f s", image.name, exc, delay)
            async with self._changed:
                self._changed.notify_all()  # nobody should wait for an entry that is not coming soon
            await asyncio.sleep(delay)
            current = asyncio.current_task()
            if current is not None:
                self._making.get(key, set()).discard(current)
            self.refill(image)  # this one no longer counts as in flight
            return
        self._failures.pop(key, None)
        self._entries.setdefault(key, []).append(warm)
        async with self._changed:
            self._changed.notify_all()

    def warm_count(self) -> int:
        return sum(map(len, self._entries.values())) + sum(map(len, self._making.values()))

    def _evict_for(self, key: tuple[str, str]) -> bool:
        """Make room under the budget for ``key``: the least recently used other image with a warm entry
        gives one up, if it was used before ``key`` was."""
        others = [k for k, entries in self._entries.items() if entries and k != key]
        if not others:
            return False
        victim = min(others, key=lambda k: self._used.get(k, 0.0))
        if self._used.get(victim, 0.0) >= self._used[key]:
            return False
        self._discard_later(self._entries[victim].pop())
        return True

    def _discard_later(self, warm: Warm) -> None:
        task = asyncio.create_task(self._discard(warm))
        self._discards.add(task)
        task.add_done_callback(self._discards.discard)

    async def _discard(self, warm: Warm) -> None:
        await warm.vm.close()
        await asyncio.to_thread(shutil.rmtree, self.host.layout(warm.vm.id).root, True)
        self.host.uids.release(warm.uid)

    async def _cancel(self, tasks: set[asyncio.Task[None]]) -> None:
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def drop(self, image: ImageRecord) -> None:
        """Discard every warm entry of ``image`` (it is being removed); no refill starts for it again."""
        key = self.key(image)
        self._dropped.add(key)
        await self._cancel(self._making.pop(key, set()))
        for warm in self._entries.pop(key, []):
            await self._discard(warm)

    async def close(self) -> None:
        for making in self._making.values():
            await self._cancel(making)
        await asyncio.gather(*self._discards, return_exceptions=True)
        for entries in self._entries.values():
            for warm in entries:
                await self._discard(warm)
        self._entries.clear()
