"""Per-tenant quotas: defaults in Settings, a tenant's own limits over them ('ember tenant set').

Checks run under the tenant's lock (:class:`QuotaGate`) from the count to the record that makes the new use
visible, so two concurrent launches cannot both take the last slot.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ember.config import Settings
from ember.errors import QuotaExceeded


class Quota(enum.StrEnum):
    """The closed set of quotas (names as in the API, the CLI's flags and 429 answers)."""

    RUNNING_VMS = "max_running_vms"  # VMs holding a VMM (PENDING, RUNNING, SUSPENDING, RESUMING) or, FAILED, a disk
    RUNNING_VCPUS = "max_running_vcpus"  # their vCPUs
    RUNNING_MEMORY_MIB = "max_running_memory_mib"  # their guest memory
    SUSPENDED_VMS = "max_suspended_vms"
    IMAGES = "max_images"  # image versions (builds included, failed ones too: they keep a log)
    STORAGE_BYTES = "max_storage_bytes"  # images' snapshots plus suspended and failed VMs' files
    CONCURRENT_BUILDS = "max_concurrent_builds"


def defaults(settings: Settings) -> dict[Quota, int]:
    return {
        Quota.RUNNING_VMS: settings.quota_running_vms,
        Quota.RUNNING_VCPUS: settings.quota_running_vcpus,
        Quota.RUNNING_MEMORY_MIB: settings.quota_running_memory_mib,
        Quota.SUSPENDED_VMS: settings.quota_suspended_vms,
        Quota.IMAGES: settings.quota_images,
        Quota.STORAGE_BYTES: settings.quota_storage_bytes,
        Quota.CONCURRENT_BUILDS: settings.quota_concurrent_builds,
    }


def effective(settings: Settings, overrides: Mapping[str, int]) -> dict[Quota, int]:
    return {q: int(overrides.get(q.value, limit)) for q, limit in defaults(settings).items()}


@dataclass(frozen=True)
class Ask:
    """What a request would add to one quota's use."""

    quota: Quota
    amount: int


def check(limits: Mapping[Quota, int], usage: Mapping[Quota, int], asks: list[Ask]) -> None:
    """Raise QuotaExceeded (429) naming the first quota the asks would pass."""
    for ask in asks:
        limit, current = limits[ask.quota], usage.get(ask.quota, 0)
        if current + ask.amount > limit:
            raise QuotaExceeded(ask.quota.value, limit, current)


class QuotaGate:
    """One lock per tenant: a quota check and the write that makes its use count happen under it. What a request
    takes before any record of it exists (the AWS API's code download before its build) is held here meanwhile."""

    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}
        self._held: dict[tuple[str, Quota], int] = {}

    def lock(self, tenant: str) -> asyncio.Lock:
        return self._locks.setdefault(tenant, asyncio.Lock())

    def hold(self, tenant: str, quota: Quota, amount: int = 1) -> Callable[[], None]:
        """Count ``amount`` more of ``quota`` as the tenant's use until the callable returned is called (once)."""
        key = (tenant, quota)
        self._held[key] = self._held.get(key, 0) + amount
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                left = self._held.pop(key) - amount
                if left:
                    self._held[key] = left

        return release

    def held(self, tenant: str) -> dict[Quota, int]:
        """What the tenant's requests hold (read from the quota checks' threads: a copy first)."""
        return {quota: amount for (who, quota), amount in dict(self._held).items() if who == tenant}
