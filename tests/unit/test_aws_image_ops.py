"""The AWS image operations' handlers on a real store and engine (no VM: the build is a double that records what
Ember's build records, and ends when the test says): every answer renders as its output shape, version numbers
are never given twice, a build refused before its record leaves nothing behind, a record removed later shows
FAILED, a download holds the tenant's build quota, and every change waits for the tenant's lock."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, cast

import pytest

from ember.api.images import resolve_image
from ember.aws import artifacts, images, managed, tags
from ember.aws.errors import ConflictException, ResourceNotFoundException
from ember.aws.model import render_output, service
from ember.aws.operations import HANDLERS, Call
from ember.build.service import BuildRequest, DockerfileParser
from ember.config import Settings
from ember.db.store import Store
from ember.db.tenants import TenantStore
from ember.engine import Engine
from ember.errors import Conflict, NameTaken, QuotaExceeded
from ember.hooks import Hook, HookConfig
from ember.models import BuildRecord, BuildState, ImageRecord
from ember.tenancy import names
from ember.tenancy.principal import Principal
from ember.tenancy.quotas import QuotaGate
from ember.vmm.accel import Accel
from ember.vmm.machine import MachineConfig
from tests.unit.test_api_engine import engine  # noqa: F401 (a fixture: an engine on a real store)
from tests.zips import good_zip

if TYPE_CHECKING:
    from ember.daemon import Daemon

ACCOUNT = "123456789012"
TENANT = "acme"
BASE = "arn:aws:lambda:us-east-1:aws:microvm-image:debian"
ARN = f"arn:aws:lambda:us-east-1:{ACCOUNT}:microvm-image:MyApp"
MODULES = (images, managed, tags)  # the operations of these modules are the ones tested here
MACHINE = MachineConfig(Accel.TCG, 256, 1, "/k", "/i", "", "QEMU emulator version 10.0.2")


class Builds:
    """Ember's BuildService as the handlers see it: the record first (BUILDING), then the end the test sets."""

    def __init__(self, store: Store, logs: Path, settings: Settings) -> None:
        self.store = store
        self.logs = logs
        self.parser = DockerfileParser(settings)  # the real one: a bad Dockerfile is refused before the record
        self.refuse: Exception | None = None  # raised before the record, as build() does (a name taken, a scan)
        self.end = BuildState.CREATED
        self.release = asyncio.Event()  # set: builds end (settled())
        self.requests: list[BuildRequest] = []

    async def build(
        self, req: BuildRequest, context: Path, emit: Callable[[str], None], on_record: Callable[[BuildRecord], None]
    ) -> BuildRecord:
        assert (context / "Dockerfile").is_file()
        if self.refuse is not None:
            raise self.refuse
        self.requests.append(req)
        repo = names.new_repo(req.tenant, req.name)
        config = json.dumps({"hooks": req.hooks.to_json() if req.hooks else None})
        record = BuildRecord(name=f"{repo}:{req.version}", repo=repo, version=req.version, state=BuildState.BUILDING,
                             tenant=req.tenant, config=config)  # fmt: skip
        self.store.put_build(record)
        on_record(record)
        await self.release.wait()
        failed = self.end is BuildState.CREATE_FAILED
        record = dataclasses.replace(record, state=self.end, error="no" if failed else "", memory_bytes=1 << 20,
                                     disk_bytes=1 << 20)  # fmt: skip
        self.store.put_build(record)  # (no image: the engine would pre-start VMs of it)
        return record

    def log_path(self, name: str) -> Path:
        return self.logs / f"{name}.log"


@pytest.fixture
def daemon(engine: Engine, tmp_path: Path) -> SimpleNamespace:  # noqa: F811
    root = tmp_path / "artifacts"
    (root / ACCOUNT).mkdir(parents=True)
    (root / ACCOUNT / "app.zip").write_bytes(good_zip())
    settings = dataclasses.replace(engine.settings, aws_file_artifact_root=str(root))
    builds = Builds(engine.store, tmp_path, settings)
    return SimpleNamespace(engine=engine, images=engine.images, settings=settings, builds=builds, quotas=QuotaGate(),
                           tenants=TenantStore(engine.store.engine), root=root)  # fmt: skip


async def call(daemon: SimpleNamespace, operation: str, **params: Any) -> Mapping[str, Any]:
    """The operation's handler, its answer rendered as the router renders it (a member of no shape: KeyError)."""
    request = Call(operation, params, Principal(TENANT, admin=False, key_id="k"), "us-east-1", ACCOUNT)
    result = await HANDLERS[operation](cast("Daemon", daemon), request)
    render_output(service().operation_model(operation), result)
    return result


def create_params(daemon: SimpleNamespace, name: str = "MyApp", **extra: Any) -> dict[str, Any]:
    uri = f"file://{daemon.root}/{ACCOUNT}/app.zip"
    return {"name": name, "baseImageArn": BASE, "codeArtifact": {"uri": uri}, "tags": {"team": "a"}, **extra}


def update_params(daemon: SimpleNamespace, **extra: Any) -> dict[str, Any]:
    params = create_params(daemon, **extra)
    del params["name"], params["tags"]
    return {"imageIdentifier": "MyApp", **params}


async def settled(daemon: SimpleNamespace) -> None:
    """End every build the handlers started."""
    daemon.builds.release.set()
    for _ in range(200):
        if not daemon.engine._chores:
            daemon.builds.release.clear()
            return
        await asyncio.sleep(0.01)
    raise AssertionError("a build did not end")


async def test_every_answer_is_its_output_shape(daemon: SimpleNamespace) -> None:
    created = await call(daemon, "CreateMicrovmImage", **create_params(daemon))
    assert (created["state"], created["imageVersion"], created["tags"]) == ("CREATING", "1", {"team": "a"})
    await settled(daemon)
    hooks = {"microvmImageHooks": {"validate": "ENABLED"}}
    updated = await call(daemon, "UpdateMicrovmImage", **update_params(daemon, hooks=hooks))  # was a KeyError
    assert (updated["state"], updated["imageVersion"], updated["hooks"]) == ("UPDATING", "2", hooks)
    assert "tags" not in updated  # not a member of UpdateMicrovmImageResponse
    await settled(daemon)
    version = await call(daemon, "GetMicrovmImageVersion", imageIdentifier=ARN, imageVersion="1")
    assert (version["state"], version["tags"]) == ("SUCCESSFUL", {"team": "a"})
    listed = await call(daemon, "ListMicrovmImageBuilds", imageIdentifier="MyApp", imageVersion="1")  # was a KeyError
    (item,) = listed["items"]
    assert item["buildState"] == "SUCCESSFUL" and "snapshotBuild" not in item
    one = await call(daemon, "GetMicrovmImageBuild", imageIdentifier="MyApp", imageVersion="1", buildId=item["buildId"])
    assert one["snapshotBuild"] == {"memorySnapshotSizeInBytes": 1 << 20, "diskSnapshotSizeInBytes": 1 << 20}
    asked = {
        "GetMicrovmImage": {"imageIdentifier": "MyApp"},
        "ListMicrovmImages": {},
        "ListMicrovmImageVersions": {"imageIdentifier": "MyApp"},
        "UpdateMicrovmImageVersion": {"imageIdentifier": "MyApp", "imageVersion": "1", "status": "INACTIVE"},
        "TagResource": {"Resource": ARN, "Tags": {"b": "c"}},
        "UntagResource": {"Resource": ARN, "TagKeys": ["team"]},
        "ListTags": {"Resource": ARN},
        "ListManagedMicrovmImages": {},
        "ListManagedMicrovmImageVersions": {"imageIdentifier": BASE},
        "DeleteMicrovmImageVersion": {"imageIdentifier": "MyApp", "imageVersion": "1"},
        "DeleteMicrovmImage": {"imageIdentifier": "MyApp"},
    }
    daemon.engine.store.put_image(ImageRecord("debian", MACHINE, 1, "t", 1, 1))  # the managed image, built
    for operation, params in asked.items():
        await call(daemon, operation, **params)
    tested = {"CreateMicrovmImage", "UpdateMicrovmImage", "GetMicrovmImageVersion", "ListMicrovmImageBuilds",
              "GetMicrovmImageBuild", *asked}  # fmt: skip
    mine = {op for op, handler in HANDLERS.items() if any(handler.__module__ == m.__name__ for m in MODULES)}
    assert mine == tested


async def test_version_numbers_are_never_given_twice(daemon: SimpleNamespace) -> None:
    await call(daemon, "CreateMicrovmImage", **create_params(daemon))
    await settled(daemon)
    await call(daemon, "UpdateMicrovmImage", **update_params(daemon))
    await settled(daemon)
    await call(daemon, "DeleteMicrovmImage", imageIdentifier="MyApp")
    again = await call(daemon, "CreateMicrovmImage", **create_params(daemon))
    assert (again["imageVersion"], again["state"]) == ("3", "CREATING")  # was 1 again: the old 1's name
    await settled(daemon)
    versions = await call(daemon, "ListMicrovmImageVersions", imageIdentifier="MyApp")
    assert [v["imageVersion"] for v in versions["items"]] == ["3"]


async def test_a_version_that_is_no_ascii_number_is_not_found(daemon: SimpleNamespace) -> None:
    """A version "²" is a digit to str.isdigit and no number to int(): it answered InternalServerException (500)."""
    await call(daemon, "CreateMicrovmImage", **create_params(daemon))
    await settled(daemon)
    for operation, extra in (("GetMicrovmImageVersion", {}), ("DeleteMicrovmImageVersion", {}),
                             ("UpdateMicrovmImageVersion", {"status": "INACTIVE"}), ("ListMicrovmImageBuilds", {}),
                             ("GetMicrovmImageBuild", {"buildId": "b"})):  # fmt: skip
        for version in ("\u00b2", "\u0663", "1\u00b2"):
            with pytest.raises(ResourceNotFoundException):
                await call(daemon, operation, imageIdentifier="MyApp", imageVersion=version, **extra)


async def test_a_removed_image_takes_its_hooks_along(engine: Engine) -> None:  # noqa: F811
    def built(port: int) -> None:
        config = {"hooks": HookConfig(port, frozenset({Hook.RUN})).to_json()}
        engine.store.put_build(BuildRecord(name="app:1", repo="app", version=1, state=BuildState.CREATED,
                                           config=json.dumps(config)))  # fmt: skip

    built(8080)
    assert engine.hooks.config("app:1") == HookConfig(8080, frozenset({Hook.RUN}))
    await engine.remove_image("app:1")
    built(9090)  # 'ember image build app' after 'ember image rm app:1': version 1 again, other hooks
    assert engine.hooks.config("app:1") == HookConfig(9090, frozenset({Hook.RUN}))


async def test_a_build_refused_before_its_record_leaves_nothing(daemon: SimpleNamespace) -> None:
    daemon.builds.refuse = NameTaken("image myapp:1 exists")  # e.g. /v1 built that very name meanwhile
    with pytest.raises(NameTaken):
        await call(daemon, "CreateMicrovmImage", **create_params(daemon))
    with pytest.raises(ResourceNotFoundException):  # was an image CREATING forever, never deletable
        await call(daemon, "GetMicrovmImage", imageIdentifier="MyApp")
    assert (await call(daemon, "ListMicrovmImages"))["items"] == []
    daemon.builds.refuse = None
    made = await call(daemon, "CreateMicrovmImage", **create_params(daemon))
    assert made["imageVersion"] == "2"  # 1 was given (to a build that never was)
    await settled(daemon)
    daemon.builds.refuse = NameTaken("image myapp:3 exists")
    with pytest.raises(NameTaken):
        await call(daemon, "UpdateMicrovmImage", **update_params(daemon))
    image = await call(daemon, "GetMicrovmImage", imageIdentifier="MyApp")
    assert (image["state"], image["latestActiveImageVersion"]) == ("CREATED", "2")
    versions = await call(daemon, "ListMicrovmImageVersions", imageIdentifier="MyApp")
    assert [v["imageVersion"] for v in versions["items"]] == ["2"]


async def test_a_version_whose_build_record_is_gone_is_failed_and_deletable(daemon: SimpleNamespace) -> None:
    await call(daemon, "CreateMicrovmImage", **create_params(daemon))
    await settled(daemon)
    repo = images.AwsImageStore(daemon.engine.store.engine).get(TENANT, "MyApp")
    assert repo is not None
    await daemon.engine.remove_image(f"{repo.repo}:1")  # 'ember image rm' through Ember's own API
    version = await call(daemon, "GetMicrovmImageVersion", imageIdentifier="MyApp", imageVersion="1")
    assert version["state"] == "FAILED" and "removed through Ember's own API" in version["stateReason"]
    assert (await call(daemon, "GetMicrovmImage", imageIdentifier="MyApp"))["state"] == "CREATE_FAILED"
    assert (await call(daemon, "DeleteMicrovmImage", imageIdentifier="MyApp"))["state"] == "DELETED"


async def test_a_download_holds_the_tenants_build_quota(
    daemon: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    fetching, go = asyncio.Event(), asyncio.Event()
    real = artifacts.fetch_context

    async def slow(uri: str, **kw: Any) -> None:
        fetching.set()
        await go.wait()
        await real(uri, **kw)

    monkeypatch.setattr(artifacts, "fetch_context", slow)
    first = asyncio.create_task(call(daemon, "CreateMicrovmImage", **create_params(daemon)))
    await asyncio.wait_for(fetching.wait(), 5)
    # EMBER_QUOTA_CONCURRENT_BUILDS=1: a second download is refused at once (it was let in: unbounded downloads)
    with pytest.raises(QuotaExceeded, match="concurrent_builds"):
        await asyncio.wait_for(call(daemon, "CreateMicrovmImage", **create_params(daemon, name="Other")), 5)
    go.set()
    assert (await first)["state"] == "CREATING"
    assert daemon.quotas.held(TENANT) == {}  # the build's record counts now
    with pytest.raises(QuotaExceeded, match="concurrent_builds"):
        await call(daemon, "CreateMicrovmImage", **create_params(daemon, name="Other"))
    await settled(daemon)
    assert (await call(daemon, "CreateMicrovmImage", **create_params(daemon, name="Other")))["state"] == "CREATING"
    await settled(daemon)


async def test_changes_wait_for_the_tenants_lock(daemon: SimpleNamespace) -> None:
    await call(daemon, "CreateMicrovmImage", **create_params(daemon))
    await settled(daemon)
    changes = {
        "UpdateMicrovmImageVersion": {"imageIdentifier": "MyApp", "imageVersion": "1", "status": "INACTIVE"},
        "TagResource": {"Resource": ARN, "Tags": {"b": "c"}},
        "UntagResource": {"Resource": ARN, "TagKeys": ["team"]},
        "DeleteMicrovmImageVersion": {"imageIdentifier": "MyApp", "imageVersion": "1"},
        "DeleteMicrovmImage": {"imageIdentifier": "MyApp"},
    }
    for operation, params in changes.items():
        async with daemon.quotas.lock(TENANT):  # as a create or update holds it until its version is recorded
            task = asyncio.create_task(call(daemon, operation, **params))
            await asyncio.sleep(0.2)
            assert not task.done(), operation
        try:
            await task
        except ConflictException:
            assert operation == "DeleteMicrovmImageVersion"  # the only version: delete the image


async def test_an_inactive_version_is_not_run_through_embers_own_api_either(daemon: SimpleNamespace) -> None:
    await call(daemon, "CreateMicrovmImage", **create_params(daemon))
    await settled(daemon)
    await call(daemon, "UpdateMicrovmImageVersion", imageIdentifier="MyApp", imageVersion="1", status="INACTIVE")
    stored = images.AwsImageStore(daemon.engine.store.engine).get(TENANT, "MyApp")
    assert stored is not None
    daemon.engine.store.put_image(ImageRecord(f"{stored.repo}:1", MACHINE, 1, "t", 1, 1, tenant=TENANT))
    who = Principal(TENANT, admin=False, key_id="k")
    with pytest.raises(Conflict, match="INACTIVE"):  # 'ember run <repo>:1' ran it
        resolve_image(cast("Daemon", daemon), who, names.public(stored.repo), 1)
    await call(daemon, "UpdateMicrovmImageVersion", imageIdentifier="MyApp", imageVersion="1", status="ACTIVE")
    assert resolve_image(cast("Daemon", daemon), who, names.public(stored.repo), 1).name == f"{stored.repo}:1"
