"""The SDK's service verbs on a real daemon, sync and async: tenants, keys, whoami, run options and list
filters, events, webhooks, usage, and their errors as typed exceptions (QuotaExceeded with its details,
Unauthorized after a revocation, NotFound for another tenant's VM)."""

from __future__ import annotations

import secrets

import pytest

from ember.config import Settings
from ember.sdk import AsyncClient, Client, Forbidden, NotFound, QuotaExceeded, Unauthorized


def new_tenant(admin: Client, **quotas: int) -> tuple[str, str, str]:
    """(tenant, key id, api key)."""
    name = f"sdk-{secrets.token_hex(4)}"
    tenant = admin.tenants.create(name, quotas=quotas or None)
    assert tenant.name == name and len(tenant.account_id) == 12
    key = admin.keys.create(tenant=name, name="sdk test")
    assert key.api_key.startswith("ember_") and key.secret_access_key and key.access_key_id
    return name, key.key_id, key.api_key


def test_sync_service_verbs(client: Client, settings: Settings, base_image: str) -> None:
    name, key_id, api_key = new_tenant(client, max_running_vms=1)
    assert name in [t.name for t in client.tenants.list()]
    with Client(api_key=api_key, settings=settings) as tenant:
        me = tenant.whoami()
        assert (me.tenant, me.admin, me.key_id) == (name, False, key_id)
        with pytest.raises(Forbidden):
            tenant.tenants.list()
        token = secrets.token_hex(6)
        vm = tenant.vms.run(base_image, tags={"role": "web"}, env={"MODE": "sdk"}, client_token=token)
        assert tenant.vms.run(base_image, tags={"role": "web"}, env={"MODE": "sdk"}, client_token=token).id == vm.id
        try:
            assert (vm.tags, vm.env, vm.tenant) == ({"role": "web"}, {"MODE": "sdk"}, name)
            assert vm.exec(["sh", "-c", "echo $MODE"]).stdout == b"sdk\n"
            assert [v.id for v in tenant.vms.list(tags={"role": "web"}, state="RUNNING")] == [vm.id]
            assert tenant.vms.list(tags={"role": "db"}) == []
            with pytest.raises(QuotaExceeded) as over:
                tenant.vms.run(base_image)
            assert (over.value.quota, over.value.limit, over.value.current) == ("max_running_vms", 1, 1)
            assert over.value.status == 429
            shown = client.tenants.get(name)
            assert shown.usage["max_running_vms"] == 1 and shown.quotas["max_running_vms"] == 1
            assert client.tenants.set_quotas(name, {"max_running_vms": 3}).quotas["max_running_vms"] == 3
            hook = tenant.webhooks.create("http://127.0.0.1:9/never")
            assert hook.secret and [h.id for h in tenant.webhooks.list()] == [hook.id]
            assert tenant.webhooks.get(hook.id).url == "http://127.0.0.1:9/never"
            tenant.webhooks.delete(hook.id)
            with pytest.raises(NotFound):
                tenant.webhooks.get(hook.id)
        finally:
            vm.remove()
        assert [e.to_state for e in tenant.events.list(vm=vm.id)][-1] == "TERMINATED"
        usage = tenant.usage()
        assert [u.tenant for u in usage.tenants] == [name] and usage.tenants[0].running_vcpu_seconds > 0
        assert vm.id in [v.vm_id for v in usage.vms]
        assert key_id in [k.key_id for k in tenant.keys.list()]
        client.keys.revoke(key_id)
        with pytest.raises(Unauthorized):
            tenant.whoami()


async def test_async_service_verbs(client: Client, settings: Settings, base_image: str) -> None:
    name, key_id, api_key = new_tenant(client)
    other_vm = client.vms.run(base_image)  # the default tenant's: invisible to the new tenant
    try:
        async with AsyncClient(api_key=api_key, settings=settings) as tenant:
            assert (await tenant.whoami()).tenant == name
            with pytest.raises(NotFound):
                await tenant.vms.get(other_vm.id)
            vm = await tenant.vms.run(base_image, tags={"async": "1"})
            try:
                assert [v.id for v in await tenant.vms.list(tags={"async": "1"})] == [vm.id]
                assert (await vm.exec(["true"])).exit_code == 0
            finally:
                await vm.remove()
            events = await tenant.events.list(vm=vm.id)
            assert [e.to_state for e in events][-2:] == ["TERMINATING", "TERMINATED"]
            assert {e.actor for e in events} == {key_id}
            assert (await tenant.usage()).tenants[0].tenant == name
    finally:
        other_vm.remove()
