"""Tenancy's pure parts and its store: names, quotas, rate limits, sealed secrets, who a request is, idempotent
creates, events and the forgetting of terminated VMs."""

from __future__ import annotations

import os
import stat
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from ember.api.auth import UNKNOWN_ACCESS_KEY_S, Authenticator
from ember.daemon import forget_before
from ember.db.store import Store, connect
from ember.db.tenants import KeyRecord, TenantStore
from ember.errors import (
    Conflict,
    Forbidden,
    HostSetupError,
    IdempotencyConflict,
    ImageNotFound,
    QuotaExceeded,
    RateLimited,
    TenantNotFound,
    Unauthorized,
)
from ember.models import StateReason, VmRecord, VmState
from ember.tenancy import names
from ember.tenancy.idempotency import Idempotency, body_hash
from ember.tenancy.keys import NewKey, token_hash
from ember.tenancy.principal import CURRENT, DEFAULT_TENANT, Principal
from ember.tenancy.quotas import Ask, Quota, check
from ember.tenancy.ratelimit import RateLimiter
from ember.tenancy.secrets import SecretBox, load_key
from ember.vmm.machine import Accel, MachineConfig

MACHINE = MachineConfig(Accel.TCG, 256, 1, "/k", "/i", "", "QEMU emulator version 10.0.2")


def test_image_names_are_per_tenant_and_one_to_one() -> None:
    assert names.internal(DEFAULT_TENANT, "app:1") == "app:1"  # an Ember 0.1 database keeps its names
    assert names.internal("acme", "app:1") == "acme~app:1"
    assert names.public("acme~app:1") == "app:1" and names.tenant_of("acme~app:1") == "acme"
    assert names.tenant_of("debian") == "" and names.tenant_of("app:2") == DEFAULT_TENANT
    assert names.candidates("acme", "debian") == ["acme~debian", "debian"]
    assert names.candidates("acme", "app") == ["acme~app"]
    # a name holding the separator would reach another tenant's image: it is answered as missing
    for hostile in ("acme~app", "other~app:1", "../x", "", "A", "a" * 64):
        with pytest.raises(ImageNotFound):
            names.internal(DEFAULT_TENANT, hostile)
    with pytest.raises(Forbidden, match="read-only"):
        names.writable("acme", "debian")


def test_quota_check_names_the_first_quota_passed() -> None:
    limits = {q: 2 for q in Quota}
    check(limits, {Quota.RUNNING_VMS: 1}, [Ask(Quota.RUNNING_VMS, 1)])
    with pytest.raises(QuotaExceeded) as info:
        check(limits, {Quota.RUNNING_VMS: 1, Quota.RUNNING_VCPUS: 2}, [Ask(Quota.RUNNING_VMS, 1),
                                                                        Ask(Quota.RUNNING_VCPUS, 1)])  # fmt: skip
    assert info.value.details() == {"quota": "max_running_vcpus", "limit": 2, "current": 2}
    assert info.value.http_status == 429 and "--max-running-vcpus" in str(info.value)


def test_token_bucket_refills_at_its_rate_and_says_how_long_to_wait() -> None:
    now = [100.0]
    limiter = RateLimiter(per_s=2.0, burst=3, clock=lambda: now[0])
    assert [limiter.take("k") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("k") == pytest.approx(0.5)
    assert limiter.take("other") == 0.0  # buckets are per key
    now[0] += 0.5
    assert limiter.take("k") == 0.0
    now[0] += 100
    assert [limiter.take("k") for _ in range(4)][-1] > 0  # refilled to the burst, not beyond


def test_sealed_secrets_need_their_key_and_the_key_file_must_be_private(tmp_path: Path) -> None:
    path = tmp_path / "secret.key"
    box = SecretBox.from_file(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and len(path.read_bytes()) == 32
    sealed = box.seal("wJalrXUtnFEMI/K7MDENG")
    assert "wJalr" not in sealed and box.open(sealed) == "wJalrXUtnFEMI/K7MDENG"
    assert box.seal("x") != box.seal("x")  # a fresh nonce each time
    with pytest.raises(ValueError, match="another key"):
        SecretBox(os.urandom(32)).open(sealed)
    assert SecretBox.from_file(path).open(sealed) == "wJalrXUtnFEMI/K7MDENG"  # the same key after a restart
    os.chmod(path, 0o644)
    with pytest.raises(HostSetupError, match="private"):
        load_key(path)
    path.unlink()
    path.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(HostSetupError):
        load_key(path)


@pytest.fixture
def tenants(tmp_path: Path) -> TenantStore:
    store = TenantStore(connect(tmp_path / "ember.db"))
    store.create_tenant("acme")
    return store


def add_key(tenants: TenantStore, tenant: str | None) -> NewKey:
    new = NewKey.make()
    tenants.add_key(KeyRecord(new.key_id, tenant, "", token_hash(new.api_key), new.access_key_id, "sealed"))
    return new


def bearer(token: str, *extra: tuple[str, str]) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}"), *extra]


def test_who_a_request_is(tenants: TenantStore) -> None:
    auth = Authenticator(tenants, RateLimiter(1000, 1000))
    assert auth.principal([], 0) == Principal(DEFAULT_TENANT, admin=True)  # root on the socket
    assert auth.principal([("x-ember-tenant", "acme")], 0) == Principal("acme", admin=True)
    assert isinstance(auth.principal([("x-ember-tenant", "nobody")], 0), TenantNotFound)
    assert isinstance(auth.principal([], 1000), Unauthorized)  # anyone else needs a key
    assert isinstance(auth.principal([], None), Unauthorized)  # TCP
    key = add_key(tenants, "acme")
    assert auth.principal(bearer(key.api_key), 1000) == Principal("acme", admin=False, key_id=key.key_id)
    assert isinstance(auth.principal(bearer(key.api_key, ("x-ember-tenant", "default")), 0), Forbidden)
    admin_key = add_key(tenants, None)
    assert auth.principal(bearer(admin_key.api_key, ("x-ember-tenant", "acme")), None).admin
    for wrong in ("", "ember_" + "x" * 43, key.api_key + "x", key.key_id):
        assert isinstance(auth.principal(bearer(wrong), None), Unauthorized), wrong
    assert isinstance(auth.principal([("authorization", f"Basic {key.api_key}")], None), Unauthorized)
    assert isinstance(auth.principal([*bearer(key.api_key), *bearer(key.api_key)], None), Unauthorized)
    tenants.revoke_key(key.key_id)
    auth.forget(key.key_id)
    assert isinstance(auth.principal(bearer(key.api_key), None), Unauthorized)  # at once


def test_rate_limits_apply_to_tenant_keys(tenants: TenantStore) -> None:
    auth = Authenticator(tenants, RateLimiter(0.001, 2))
    key, admin_key = add_key(tenants, "acme"), add_key(tenants, None)
    answers = [auth.principal(bearer(key.api_key), None) for _ in range(3)]
    assert isinstance(answers[-1], RateLimited) and answers[-1].retry_after
    assert all(isinstance(auth.principal(bearer(admin_key.api_key), None), Principal) for _ in range(5))


async def test_client_tokens_make_creates_idempotent(tenants: TenantStore) -> None:
    once = Idempotency(tenants)
    who = Principal("acme", admin=False, key_id="k")
    made: list[str] = []

    async def create(settle: object) -> str:
        made.append(f"vm-{len(made)}")
        settle(made[-1])  # type: ignore[operator]
        return made[-1]

    async def existing(resource: str) -> str:
        return resource

    assert await once.create(who, "vm", "t1", {"image": "a"}, create, existing) == "vm-0"
    assert await once.create(who, "vm", "t1", {"image": "a", "client_token": "t1"}, create, existing) == "vm-0"
    with pytest.raises(IdempotencyConflict):
        await once.create(who, "vm", "t1", {"image": "b"}, create, existing)
    other = Principal("default", admin=True)
    assert await once.create(other, "vm", "t1", {"image": "a"}, create, existing) == "vm-1"  # per tenant

    async def failing(settle: object) -> str:
        raise RuntimeError("launch failed")

    with pytest.raises(RuntimeError):
        await once.create(who, "vm", "t2", {"image": "a"}, failing, existing)
    assert await once.create(who, "vm", "t2", {"image": "a"}, create, existing) == "vm-2"  # released: runs again
    tenants.claim_token("acme", "vm", "t3", body_hash({"image": "a"}))  # a create of it that has not ended
    with pytest.raises(Conflict, match="still running"):
        await once.create(who, "vm", "t3", {"image": "a"}, create, existing)


def test_state_changes_are_events_with_their_actor_and_terminated_vms_are_forgotten(tmp_path: Path) -> None:
    store = Store(tmp_path / "ember.db")
    seen: list[str] = []
    store.listeners.append(lambda e: seen.append(e.to_state))
    vm = VmRecord(id="vm-1", image="debian", state=VmState.PENDING, machine=MACHINE, uid=7, token="t", tenant="acme")
    acting = CURRENT.set(Principal("acme", admin=False, key_id="key-1"))
    try:
        store.insert_vm(vm)
        vm = vm.moved(VmState.RUNNING, StateReason.LAUNCH)
        store.update_vm(vm)
        store.update_vm(vm)  # no change of state: no event
    finally:
        CURRENT.reset(acting)
    ended = vm.moved(VmState.TERMINATED, StateReason.USER_TERMINATE, uid=0)
    store.update_vm(ended.__class__(**{**ended.__dict__, "terminated_at": "2000-01-01T00:00:00.000+00:00"}))
    events = store.list_events(vm_id="vm-1")
    assert [(e.from_state, e.to_state, e.actor) for e in events] == [
        ("", "PENDING", "key-1"), ("PENDING", "RUNNING", "key-1"), ("RUNNING", "TERMINATED", "system"),
    ]  # fmt: skip
    assert seen == ["PENDING", "RUNNING", "TERMINATED"]
    assert store.list_vms() == [] and len(store.list_vms(terminated=True)) == 1
    assert store.free_uid(range(7, 8)) == 7  # a terminated VM's uid is free again
    assert store.list_events(tenant="other") == []
    assert store.purge_terminated("2001-01-01") == 1
    assert store.list_vms(terminated=True) == [] and store.list_events(vm_id="vm-1") == []


def test_terminated_vms_are_listed_for_the_retention_but_kept_until_their_month_is_billed() -> None:
    week = 7 * 86400.0
    # mid-month: a week ago is after the previous month's start, so records go back to that start
    assert forget_before(datetime(2026, 11, 27, 12, tzinfo=UTC), week) == "2026-10-01T00:00:00.000+00:00"
    # a retention longer than that wins
    assert forget_before(datetime(2026, 11, 27, tzinfo=UTC), 90 * 86400.0).startswith("2026-08-29")


def test_the_list_of_terminated_vms_ends_at_the_retention(tmp_path: Path) -> None:
    store = Store(tmp_path / "ember.db")
    for vm_id, ended in (("vm-1", "2026-11-01T00:00:00.000+00:00"), ("vm-2", "2026-11-20T00:00:00.000+00:00")):
        vm = VmRecord(id=vm_id, image="debian", state=VmState.PENDING, machine=MACHINE, uid=0, token="t")
        store.insert_vm(vm)
        store.update_vm(replace(vm.moved(VmState.TERMINATED, StateReason.USER_TERMINATE), terminated_at=ended))
    listed = store.list_vms(terminated=True, terminated_since="2026-11-10T00:00:00.000+00:00")
    assert [v.id for v in listed] == ["vm-2"]
    assert len(store.list_vms(terminated=True)) == 2


class CountingStore:
    """A TenantStore that counts its access key look-ups."""

    def __init__(self, tenants: TenantStore) -> None:
        self.tenants, self.lookups = tenants, 0

    def key_by_access_key(self, access_key_id: str) -> KeyRecord | None:
        self.lookups += 1
        return self.tenants.key_by_access_key(access_key_id)


def test_unknown_and_revoked_access_key_ids_cost_one_query_a_minute(tenants: TenantStore) -> None:
    now = [1000.0]
    store = CountingStore(tenants)
    auth = Authenticator(store, RateLimiter(1000, 1000), clock=lambda: now[0])  # type: ignore[arg-type]
    unknown = "AKIA" + "Q" * 16
    assert [auth.signing_key(unknown) for _ in range(5)] == [None] * 5 and store.lookups == 1
    assert auth.signing_key("not-a-key-id") is None and store.lookups == 1  # no key's shape: no query at all
    now[0] += UNKNOWN_ACCESS_KEY_S + 1  # not forever: looked up again
    assert auth.signing_key(unknown) is None and store.lookups == 2
    key = add_key(tenants, "acme")
    assert auth.signing_key(key.access_key_id) is not None and store.lookups == 3
    assert auth.signing_key(key.access_key_id) is not None and store.lookups == 3  # a live key: remembered
    tenants.revoke_key(key.key_id)
    auth.forget(key.key_id)
    assert [auth.signing_key(key.access_key_id) for _ in range(3)] == [None] * 3 and store.lookups == 4


def test_a_bucket_can_be_read_without_spending() -> None:
    now = [0.0]
    limiter = RateLimiter(2.0, 1, clock=lambda: now[0])
    assert limiter.wait("peer") == 0.0 and limiter.wait("peer") == 0.0
    assert limiter.take("peer") == 0.0
    assert limiter.wait("peer") == pytest.approx(0.5) and limiter.take("peer") == pytest.approx(0.5)
    now[0] += 0.5
    assert limiter.wait("peer") == 0.0
