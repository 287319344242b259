"""The warm pool's budget: pre-started VMMs of all images together stay under EMBER_POOL_MAX_VMMS; a more
recently launched image takes a warm VMM from the least recently used one (hostile review M5: every built
image used to keep its own pool, outside every quota)."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

from ember.models import ImageRecord
from ember.pool import WarmPool
from ember.runtime import Host
from ember.vmm.machine import Accel, MachineConfig

MACHINE = MachineConfig(Accel.TCG, 256, 1, "/k", "/i", "", "QEMU emulator version 10.0.2")


class FakeVm:
    """Stands in for a paused clone (the pool's bookkeeping is what is tested here)."""

    def __init__(self, vm_id: str) -> None:
        self.id = vm_id
        self.agent = SimpleNamespace(closed=False)
        self.closed = False

    def alive(self) -> bool:
        return not self.closed

    async def close(self) -> None:
        self.closed = True


def fake_host(tmp_path: Path) -> Host:
    uids = itertools.count(1000)
    return cast(Host, SimpleNamespace(
        uids=SimpleNamespace(allocate=lambda: next(uids), release=lambda uid: None),
        layout=lambda vm_id: SimpleNamespace(root=tmp_path / vm_id),
    ))  # fmt: skip


async def test_the_pool_stays_under_its_budget_and_the_least_recently_used_image_gives_way(tmp_path: Path) -> None:
    started: list[str] = []

    async def start(vm_id: str, uid: int, image: ImageRecord) -> Any:
        started.append(image.name)
        return FakeVm(vm_id)

    pool = WarmPool(fake_host(tmp_path), 2, start, budget=3)
    images = [ImageRecord(name=f"app{i}", machine=MACHINE, gid=i, token="t", disk_bytes=0, memory_bytes=0)
              for i in range(3)]  # fmt: skip
    pool.refill(images[0])
    await asyncio.sleep(0.05)
    pool.refill(images[1])  # one slot left: app1 gets one; then app0 (used earlier) gives one up
    await asyncio.sleep(0.05)
    assert pool.warm_count() == 3
    assert {k[0]: len(v) for k, v in pool._entries.items()} == {"app0": 1, "app1": 2}
    pool.refill(images[0])  # app0 is now the most recent: app1 gives one back
    await asyncio.sleep(0.05)
    assert pool.warm_count() == 3 and {k[0]: len(v) for k, v in pool._entries.items()} == {"app0": 2, "app1": 1}
    assert await pool.take(images[2], wait_s=0) is None  # a cold launch; nothing of the others was lost
    await pool.close()
