"""Engine-side API findings: lock table growth, removing a repo's versions, names a fork may not take, stdin pipes."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, cast

import httpx
import pytest

from ember.agent import ExecResult
from ember.api import app as api_app
from ember.api import vms as api_vms
from ember.api.auth import PRINCIPAL
from ember.api.execstdin import StdinPipes
from ember.config import Settings
from ember.db.store import Store
from ember.db.tenants import TenantStore
from ember.db.webhooks import WebhookStore
from ember.engine import Engine
from ember.errors import Conflict, ImageNotFound, NameTaken, VmNotFound
from ember.guest.artifacts import GuestArtifacts
from ember.host.cgroup import CgroupsV2
from ember.images import ImageStore
from ember.models import BuildRecord, BuildState, VmRecord, VmState
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
def engine(tmp_path: Path) -> Engine:
    """An engine on a real store; no VMM is ever started by these tests."""
    settings = Settings(data_dir=tmp_path, socket_path=tmp_path / "ember.sock")
    store = Store(tmp_path / "ember.db")
    cgroup_root = tmp_path / "cgroup"  # a plain directory: nothing here makes a cgroup
    cgroup_root.mkdir()
    (cgroup_root / "cgroup.subtree_control").write_text("cpu io memory pids")
    (cgroup_root / "cgroup.controllers").write_text("cpu io memory pids")
    uids = UidPool(lambda taken: store.free_uid(settings.vmm_uids, exclude=taken))
    host = Host(settings, CgroupsV2("ember-unit", cgroup_root), tmp_path / "jailer", uids)
    guest = GuestArtifacts(tmp_path / "k", tmp_path / "i", tmp_path / "a", "f", tmp_path / "b")
    images = ImageStore(settings, store, host, guest, AccelChoice(Accel.TCG, "unit test"))
    return Engine(settings, store, host, images)


def add_builds(engine: Engine, repo: str, *states: BuildState) -> list[str]:
    names = []
    for version, state in enumerate(states, start=1):
        engine.store.put_build(BuildRecord(name=f"{repo}:{version}", repo=repo, version=version, state=state))
        names.append(f"{repo}:{version}")
    return names


async def test_unknown_vm_ids_create_no_locks(engine: Engine) -> None:
    for _ in range(1000):
        vm_id = f"vm-{secrets.token_hex(6)}"
        for action in (engine.suspend, engine.resume, engine.remove):
            with pytest.raises(VmNotFound):
                await action(vm_id)
    assert engine._locks == {}


async def test_removing_a_repo_with_several_versions_asks_for_one_or_all(engine: Engine) -> None:
    names = add_builds(engine, "app", BuildState.CREATED, BuildState.CREATE_FAILED, BuildState.CREATED)
    with pytest.raises(Conflict, match=r"'app' has 3 versions .*'ember image rm app:3'.*--all app"):
        await engine.remove_image("app")
    assert [b.name for b in engine.store.list_builds()] == names  # nothing removed
    assert await engine.remove_image("app:2") == ["app:2"]
    assert await engine.remove_image("app", every_version=True) == ["app:1", "app:3"]
    assert engine.store.list_builds() == []
    with pytest.raises(ImageNotFound):
        await engine.remove_image("app")
    add_builds(engine, "solo", BuildState.CREATED)
    assert await engine.remove_image("solo") == ["solo:1"]  # one version: no doubt which


@pytest.mark.parametrize("name", ["debian", "python", "ember"])
def test_a_fork_cannot_take_a_built_in_base_name(engine: Engine, name: str) -> None:
    with pytest.raises(NameTaken, match="built-in base"):
        engine.images.check_new_name(name)


def test_a_fork_cannot_take_an_existing_repo_name(engine: Engine) -> None:
    add_builds(engine, "app", BuildState.CREATED)
    with pytest.raises(NameTaken, match="exists"):
        engine.images.check_new_name("app")
    engine.images.check_new_name("myfork")


def root_app(engine: Engine) -> Callable[[dict[str, Any], Any, Any], Awaitable[None]]:
    """The real API app on ``engine``; every request is the root admin's."""
    daemon = SimpleNamespace(
        engine=engine, images=engine.images, settings=engine.settings, builds=None, quotas=QuotaGate(),
        tenants=TenantStore(engine.store.engine),
        webhooks=WebhookDispatcher(engine.settings, WebhookStore(engine.store.engine), SecretBox(bytes(32))),
    )  # fmt: skip
    app = api_app.create_app(cast("Daemon", daemon), cast("Authenticator", None))

    async def as_root(scope: dict[str, Any], receive: Any, send: Any) -> None:
        scope[PRINCIPAL] = ROOT
        await app(scope, receive, send)

    return as_root


def add_vm(engine: Engine, vm_id: str, state: VmState) -> None:
    machine = MachineConfig(Accel.TCG, 256, 1, "/k", "/i", "", "QEMU emulator version 10.0.2")
    engine.store.insert_vm(VmRecord(id=vm_id, image="x", state=state, machine=machine, uid=1, token="t"))


async def test_failed_execs_leave_no_stdin_pipe(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    tables: list[StdinPipes] = []

    class Recorded(StdinPipes):
        def __init__(self) -> None:
            super().__init__()
            tables.append(self)

    monkeypatch.setattr(api_vms, "StdinPipes", Recorded)
    as_root = root_app(engine)
    add_vm(engine, "vm-0a", VmState.SUSPENDED)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=as_root), base_url="http://ember") as c:
        for vm_id, status in (("vm-0b", 404), ("vm-0a", 409)):  # missing; suspended: the exec cannot start
            for _ in range(25):
                r = await c.post(f"/v1/vms/{vm_id}/exec", json={"argv": ["true"], "stdin": True})
                assert r.status_code == status, r.text
    assert len(tables) == 1 and tables[0].pipes == {}


class GuestStreams:
    """The engine's guest calls for an exec and a file read, stubbed: they record whether their stream was closed."""

    def __init__(self) -> None:
        self.closed: list[str] = []

    async def exec(self, vm_id: str, req: object, stdin: object) -> AsyncIterator[tuple[str, bytes] | ExecResult]:
        async def events() -> AsyncIterator[tuple[str, bytes] | ExecResult]:
            try:
                yield ("stdout", b"hi")
                yield ExecResult(exit_code=0, signal=0, timed_out=False)
            finally:
                self.closed.append("exec")

        return events()

    async def read_file(self, vm_id: str, path: str) -> tuple[int, AsyncIterator[bytes]]:
        streams = self

        class Chunks:
            def __init__(self) -> None:
                self.left = [b"file"]

            def __aiter__(self) -> Chunks:
                return self

            async def __anext__(self) -> bytes:
                if not self.left:
                    raise StopAsyncIteration
                return self.left.pop()

            async def aclose(self) -> None:
                streams.closed.append("file")

        return 4, Chunks()


STREAMS = [
    ("POST", "/v1/vms/vm-0a/exec", b"", json.dumps({"argv": ["yes"]}).encode(), "exec"),
    ("GET", "/v1/vms/vm-0a/files", b"path=/etc/hostname", b"", "file"),
]


@pytest.fixture
def guest(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> GuestStreams:
    """A RUNNING VM whose exec and file read are stubbed; the rest (Activity, engine.using, the routes) is real."""
    add_vm(engine, "vm-0a", VmState.RUNNING)
    streams = GuestStreams()
    monkeypatch.setattr(engine, "guest", lambda vm_id, action: None)
    monkeypatch.setattr(engine, "exec", streams.exec)
    monkeypatch.setattr(engine, "read_file", streams.read_file)
    return streams


@pytest.mark.parametrize(("method", "path", "query", "body", "stream"), STREAMS, ids=["exec", "file"])
async def test_a_client_gone_before_the_response_starts_releases_the_vm_and_the_guest_stream(
    engine: Engine, guest: GuestStreams, method: str, path: str, query: bytes, body: bytes, stream: str
) -> None:
    """The review's finding: the client goes away while the response head waits to be sent; the body never
    starts, and the VM stayed busy (never idle-suspended) with the guest exec or file stream open."""
    head_waiting = asyncio.Event()
    requested = False

    async def receive() -> dict[str, Any]:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": body, "more_body": False}
        await head_waiting.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            assert message["status"] == 200
            head_waiting.set()
            await asyncio.Event().wait()  # a client that reads nothing: the head never goes out

    headers = [(b"content-type", b"application/json")] if body else []
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "path": path,
             "raw_path": path.encode(), "query_string": query, "headers": headers, "scheme": "http",
             "server": ("ember", 80), "client": ("127.0.0.1", 1), "root_path": ""}  # fmt: skip
    await asyncio.wait_for(root_app(engine)(scope, receive, send), 10)
    assert head_waiting.is_set()
    assert not engine.activity.busy("vm-0a"), "busy after the request ended"
    assert guest.closed == [stream]


@pytest.mark.parametrize(("method", "path", "query", "body", "stream"), STREAMS, ids=["exec", "file"])
async def test_a_stream_read_to_the_end_releases_the_vm_and_the_guest_stream(
    engine: Engine, guest: GuestStreams, method: str, path: str, query: bytes, body: bytes, stream: str
) -> None:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=root_app(engine)), base_url="http://ember") as c:
        r = await c.request(method, f"{path}?{query.decode()}", content=body,
                            headers={"content-type": "application/json"} if body else {})  # fmt: skip
    assert r.status_code == 200, r.text
    ends = {"file": "file", "exec": json.dumps({"exit_code": 0, "signal": 0, "timed_out": False})}
    assert r.text.splitlines()[-1] == ends[stream]
    assert not engine.activity.busy("vm-0a")
    assert guest.closed == [stream]
