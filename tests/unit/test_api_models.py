"""The API's answers keep the views' JSON under their response models, and the models' input limits hold.

Through the in-process app (as root on the socket) on a real store; no VMM is ever started.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, cast

import httpx
import pytest

from ember.api import app as api_app
from ember.api.auth import PRINCIPAL
from ember.api.vms import vm_view
from ember.config import Settings
from ember.db.store import Store
from ember.db.tenants import TenantStore
from ember.db.webhooks import WebhookStore
from ember.engine import Engine
from ember.guest.artifacts import GuestArtifacts
from ember.host.cgroup import CgroupsV2
from ember.images import ImageStore
from ember.models import VmRecord, VmState
from ember.runtime import Host, UidPool
from ember.tenancy.principal import ROOT
from ember.tenancy.quotas import QuotaGate
from ember.tenancy.secrets import SecretBox
from ember.vmm.accel import Accel, AccelChoice
from ember.vmm.machine import MachineConfig
from ember.webhooks import WebhookDispatcher

if TYPE_CHECKING:
    from ember.api.auth import Authenticator
    from ember.daemon import Daemon


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, Engine]]:
    settings = Settings(data_dir=tmp_path, socket_path=tmp_path / "ember.sock")
    store = Store(tmp_path / "ember.db")
    cgroup_root = tmp_path / "cgroup"  # a plain directory: nothing here makes a cgroup
    cgroup_root.mkdir()
    (cgroup_root / "cgroup.subtree_control").write_text("cpu io memory pids")
    (cgroup_root / "cgroup.controllers").write_text("cpu io memory pids")
    uids = UidPool(lambda taken: store.free_uid(settings.vmm_uids, exclude=taken))
    host = Host(settings, CgroupsV2("ember-unit", cgroup_root), tmp_path / "jailer", uids)
    guest = GuestArtifacts(tmp_path / "k", tmp_path / "i", tmp_path / "a", "f", tmp_path / "b")
    engine = Engine(settings, store, host, ImageStore(settings, store, host, guest, AccelChoice(Accel.TCG, "unit")))
    box = SecretBox(bytes(32))
    daemon = SimpleNamespace(
        engine=engine, images=engine.images, settings=settings, builds=None, quotas=QuotaGate(),
        tenants=TenantStore(store.engine), secrets=box,
        webhooks=WebhookDispatcher(settings, WebhookStore(store.engine), box),
    )  # fmt: skip
    app = api_app.create_app(cast("Daemon", daemon), cast("Authenticator", None))

    async def as_root(scope: dict[str, Any], receive: Any, send: Any) -> None:
        scope[PRINCIPAL] = ROOT
        await app(scope, receive, send)

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=as_root), base_url="http://ember") as client:
        yield client, engine


async def test_vm_answers_are_the_views_json(api: tuple[httpx.AsyncClient, Engine]) -> None:
    """A KVM VM's accelerator has no ``warning`` (the model's default stays out), a TCG VM's has one."""
    client, engine = api
    for uid, (vm_id, accel) in enumerate((("vm-0a", Accel.KVM), ("vm-0b", Accel.TCG)), start=1):
        machine = MachineConfig(accel, 256, 1, "/k", "/i", "", "QEMU emulator version 10.0.2")
        record = VmRecord(id=vm_id, image="x:1", state=VmState.SUSPENDED, machine=machine, uid=uid, token="t",
                          env={"A": "1"}, tags={"team": "a"})  # fmt: skip
        engine.store.insert_vm(record)
    views = [json.loads(json.dumps(vm_view(engine.get(vm_id)))) for vm_id in ("vm-0a", "vm-0b")]
    assert "warning" not in views[0]["accelerator"] and "warning" in views[1]["accelerator"]
    for view in views:
        answer = await client.get(f"/v1/vms/{view['id']}")
        # inspect adds the VM's ingress endpoint (EMBER_INGRESS_LISTEN's and _DOMAIN's defaults here)
        expected = {**view, "endpoint": f"http://{view['id']}.localhost:7080/"}
        assert answer.status_code == 200 and answer.json() == expected, answer.text
    listed = await client.get("/v1/vms", params={"tag": "team=a"})
    assert listed.status_code == 200 and listed.json() == views, listed.text


@pytest.mark.parametrize(
    "body",
    [
        {"env": {"A\n": "1"}},  # Python's re: '$' matched before a trailing newline, so this name passed
        {"tags": {"team\n": "a"}},
        {"env": {"A": "1\x00"}},
        {"tags": {f"t{i}": "v" for i in range(51)}},
        {"client_token": "caf\u00e9"},  # printable ASCII only
    ],
)
async def test_run_refuses_what_the_document_refuses(
    api: tuple[httpx.AsyncClient, Engine], body: dict[str, Any]
) -> None:
    client, _ = api
    answer = await client.post("/v1/vms", json={"image": "x", **body})
    assert answer.status_code == 400, answer.text  # before looking for the image (a 404)
    assert answer.json()["error"] == "InvalidRequest"


async def test_a_retried_key_creation_answers_the_key_without_its_secrets(
    api: tuple[httpx.AsyncClient, Engine],
) -> None:
    client, _ = api
    assert (await client.post("/v1/tenants", json={"name": "acme"})).status_code == 201
    first = await client.post("/v1/keys", json={"tenant": "acme", "client_token": "once"})
    again = await client.post("/v1/keys", json={"tenant": "acme", "client_token": "once"})
    assert first.status_code == again.status_code == 201, (first.text, again.text)
    assert first.json()["api_key"].startswith("ember_") and first.json()["secret_access_key"]
    assert again.json() == {k: v for k, v in first.json().items() if k not in ("api_key", "secret_access_key")}
