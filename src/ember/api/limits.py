"""A tenant's current use of each quota, and the checks the API makes before it creates or starts anything."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from ember import metrics
from ember.errors import QuotaExceeded
from ember.models import RUNNING_STATES, BuildState, VmState
from ember.tenancy import quotas
from ember.tenancy.quotas import Ask, Quota

if TYPE_CHECKING:
    from ember.daemon import Daemon


class Limits:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.gate = daemon.quotas

    def limits(self, tenant: str) -> dict[Quota, int]:
        record = self.daemon.tenants.get_tenant(tenant)
        return quotas.effective(self.daemon.settings, record.quotas if record else {})

    def _saved_bytes(self, vm_id: str) -> int:
        """Bytes a suspended (or failed) VM's files hold on disk (allocated, links not followed)."""
        root = self.daemon.engine.host.layout(vm_id).root
        total = 0
        try:
            with os.scandir(root) as entries:
                for entry in entries:
                    if entry.is_file(follow_symlinks=False):
                        total += entry.stat(follow_symlinks=False).st_blocks * 512
                    elif entry.is_dir(follow_symlinks=False):
                        with os.scandir(entry.path) as inner:
                            total += sum(e.stat(follow_symlinks=False).st_blocks * 512 for e in inner
                                         if e.is_file(follow_symlinks=False))  # fmt: skip
        except OSError:
            pass
        return total

    def use(self, tenant: str) -> dict[Quota, int]:
        store = self.daemon.engine.store
        vms = store.list_vms(tenant=tenant)
        running = [v for v in vms if v.state in RUNNING_STATES]
        suspended = [v for v in vms if v.state is VmState.SUSPENDED]
        # a FAILED VM holds no CPU or memory, but keeps its uid and disk until it is removed
        failed = [v for v in vms if v.state is VmState.FAILED]
        images = store.list_images((tenant,))
        builds = store.list_builds((tenant,))
        image_bytes = sum(i.disk_bytes + i.memory_bytes for i in images)
        use = {
            Quota.RUNNING_VMS: len(running) + len(failed),
            Quota.RUNNING_VCPUS: sum(v.machine.vcpus for v in running),
            Quota.RUNNING_MEMORY_MIB: sum(v.machine.memory_mib for v in running),
            Quota.SUSPENDED_VMS: len(suspended),
            Quota.IMAGES: len({i.name for i in images} | {b.name for b in builds}),
            Quota.STORAGE_BYTES: image_bytes + sum(self._saved_bytes(v.id) for v in suspended + failed),
            Quota.CONCURRENT_BUILDS: sum(1 for b in builds if b.state is BuildState.BUILDING),
        }
        for quota, amount in self.gate.held(tenant).items():  # taken by requests not recorded yet
            use[quota] += amount
        return use

    @asynccontextmanager
    async def admit(
        self, tenant: str, asks: list[Ask], operation: metrics.Operation | None = None
    ) -> AsyncIterator[Callable[[], None]]:
        """Check ``asks`` against the tenant's quotas. The body runs under the tenant's lock until it calls the
        callable it is given (once its use is recorded, e.g. the VM's PENDING record) or ends, so concurrent
        requests cannot both take the last unit."""
        lock = self.gate.lock(tenant)
        await lock.acquire()
        held = True  # an asyncio.Lock knows no owner: only this request's own hold may be let go, and once

        def release() -> None:
            nonlocal held
            if held:
                held = False
                lock.release()

        try:
            try:
                await asyncio.to_thread(lambda: quotas.check(self.limits(tenant), self.use(tenant), asks))
            except QuotaExceeded as exc:
                if operation is not None:
                    metrics.failed(operation, exc)  # refused before the engine saw it: counted here
                raise
            yield release
        finally:
            release()
