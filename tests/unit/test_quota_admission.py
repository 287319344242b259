"""Limits.admit: the tenant's lock is held from the quota check until the request's use is recorded, and a
request lets go only of its own hold (an asyncio.Lock knows no owner)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from ember.api.limits import Limits
from ember.errors import QuotaExceeded
from ember.models import VmState
from ember.tenancy.quotas import Ask, Quota, QuotaGate


class Store:
    def __init__(self) -> None:
        self.vms: list[SimpleNamespace] = []

    def list_vms(self, tenant: str | None = None) -> list[SimpleNamespace]:
        return list(self.vms)

    def list_images(self, tenants: object) -> list[object]:
        return []

    def list_builds(self, tenants: object) -> list[object]:
        return []


def limits_of(store: Store, running_vms: int) -> Limits:
    daemon = SimpleNamespace(quotas=QuotaGate(), engine=SimpleNamespace(store=store))
    limits = Limits(daemon)  # type: ignore[arg-type]
    limits.limits = lambda tenant: {q: (running_vms if q is Quota.RUNNING_VMS else 100) for q in Quota}  # type: ignore[method-assign]
    return limits


async def test_a_late_end_does_not_free_the_next_requests_hold() -> None:
    """Each launch records its VM, lets the lock go, then boots a while: the first one's end came while the
    second held the lock, freed it, and the rest ran their checks at once (5 admitted past a limit of 2)."""
    store = Store()
    limits = limits_of(store, running_vms=2)
    admitted: list[str] = []

    async def launch(name: str, boot_s: float) -> None:
        async with limits.admit("t", [Ask(Quota.RUNNING_VMS, 1)]) as release:
            await asyncio.sleep(0.02)  # up to the PENDING record
            store.vms.append(SimpleNamespace(id=name, state=VmState.RUNNING,
                                             machine=SimpleNamespace(vcpus=1, memory_mib=64)))  # fmt: skip
            admitted.append(name)
            release()
            release()  # twice is once
            await asyncio.sleep(boot_s)  # the boot, after the lock was let go

    results = await asyncio.gather(*(launch(n, 0.01 if n == "a" else 0.2) for n in "abcde"), return_exceptions=True)
    assert admitted == ["a", "b"]
    assert [type(r) for r in results] == [type(None)] * 2 + [QuotaExceeded] * 3


async def test_the_lock_is_let_go_however_the_body_ends() -> None:
    limits = limits_of(Store(), running_vms=5)
    with pytest.raises(RuntimeError):
        async with limits.admit("t", [Ask(Quota.RUNNING_VMS, 1)]):
            raise RuntimeError("the engine failed")
    async with limits.admit("t", [Ask(Quota.RUNNING_VMS, 1)]):
        assert limits.gate.lock("t").locked()
    assert not limits.gate.lock("t").locked()
