"""Upgrading databases: one made by Ember 0.1 (SQLite, the only backend it had) keeps every image, build and
VM, all in tenant ``default``; a fresh database (SQLite and PostgreSQL) gets this release's schema exactly, and
upgrading again changes nothing."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, create_engine, inspect, select
from sqlalchemy.exc import IntegrityError

from ember.db import migrate
from ember.db.schema import metadata, tenants
from ember.db.store import Store, connect
from ember.imagecfg import ImageDefaults
from ember.models import StateReason, VmRecord, VmState
from ember.vmm.machine import MachineConfig
from tests.databases import fresh_database

DUMP_0_1 = Path(__file__).resolve().parent.parent / "data" / "ember-0.1.sql"
OLD_TABLES = ("images", "builds", "vms")

# what each VM's 0.1 free-text state_reason became: (reason, message)
REASONS = {
    "vm-0a1b2c3d4e5f": (StateReason.LAUNCH, ""),
    "vm-1b2c3d4e5f60": (StateReason.USER_SUSPEND, ""),
    "vm-2c3d4e5f6071": (StateReason.DAEMON_RESTART, ""),
    "vm-3d4e5f607182": (
        StateReason.AGENT_UNREACHABLE,
        "unreachable after a daemon restart: agent did not answer",
    ),
    "vm-4e5f60718293": (StateReason.VMM_EXITED, ""),
}


def rows(engine: Engine, table: str) -> dict[str, dict[str, Any]]:
    """Every row of ``table`` by primary key, as plain values."""
    with engine.connect() as c:
        t = metadata.tables[table]
        key = next(iter(t.primary_key.columns)).name
        return {r[key]: dict(r) for r in c.execute(select(t)).mappings()}


@pytest.fixture
def old_database(tmp_path: Path) -> Iterator[tuple[Engine, dict[str, list[dict[str, Any]]]]]:
    """A SQLite file holding the 0.1 dump, an engine on it, and its rows as 0.1 wrote them."""
    path = tmp_path / "ember.db"
    with sqlite3.connect(path) as db:
        db.executescript(DUMP_0_1.read_text())
        db.row_factory = sqlite3.Row
        before = {t: [dict(r) for r in db.execute(f"SELECT * FROM {t}")] for t in OLD_TABLES}
    db.close()
    engine = create_engine(f"sqlite:///{path}")
    yield engine, before
    engine.dispose()


def test_the_dump_is_a_pre_alembic_0_1_database(old_database: tuple[Engine, dict[str, list[dict[str, Any]]]]) -> None:
    engine, before = old_database
    assert set(inspect(engine).get_table_names()) == set(OLD_TABLES)  # no alembic_version: 0.1 had no Alembic
    assert migrate.current(engine) is None
    assert {len(v) for v in before.values()} == {2, 3, 5}


def test_a_0_1_database_upgrades_keeping_every_image_build_and_vm(
    old_database: tuple[Engine, dict[str, list[dict[str, Any]]]],
) -> None:
    engine, before = old_database
    migrate.upgrade(engine)
    assert migrate.current(engine) == migrate.head()

    # every row keeps every value 0.1 wrote (state_reason aside: it became a closed reason and a message)
    for table in OLD_TABLES:
        after = rows(engine, table)
        key = next(iter(metadata.tables[table].primary_key.columns)).name
        assert sorted(after) == sorted(r[key] for r in before[table])
        for old in before[table]:
            new = after[old[key]]
            kept = {k: v for k, v in old.items() if k != "state_reason"}
            assert {k: new[k] for k in kept} == kept, f"{table} {old[key]}"
    with engine.connect() as c:
        assert c.execute(select(tenants.c.name)).scalars().all() == ["default"]

    store = Store(engine)
    images = {i.name: i for i in store.list_images()}
    assert {n: i.tenant for n, i in images.items()} == {"debian": "", "web:1": "default", "snap-a": "default"}
    assert images["web:1"].disk_bytes == 2 << 30 and images["web:1"].parent == "debian"
    assert images["snap-a"].machine == MachineConfig.from_json(before["images"][2]["machine"])
    assert [i.name for i in store.list_images(("default",))] == ["snap-a", "web:1"]
    assert store.latest_image("web") == images["web:1"]
    assert [(b.name, b.tenant, b.state.value) for b in store.list_builds(("default",))] == [
        ("web:1", "default", "CREATED"),
        ("web:2", "default", "CREATE_FAILED"),
    ]
    assert store.next_version("web") == 3

    vms = {v.id: v for v in store.list_vms(tenant="default")}
    assert sorted(vms) == sorted(REASONS)
    assert [v.state for v in sorted(vms.values(), key=lambda v: v.id)] == [
        VmState.RUNNING, VmState.SUSPENDED, VmState.SUSPENDED, VmState.RUNNING, VmState.FAILED,
    ]  # fmt: skip
    for vm_id, (reason, message) in REASONS.items():
        vm = vms[vm_id]
        assert (vm.state_reason, vm.state_message) == (reason, message), vm_id
        assert (vm.tenant, vm.env, vm.tags, vm.terminated_at) == ("default", {}, {}, "")
        assert store.get_vm(vm_id) == vm
    assert vms["vm-0a1b2c3d4e5f"].pid == 4242 and vms["vm-1b2c3d4e5f60"].uid == 800101

    # the upgraded tables still enforce 0.1's constraints, and take new records
    new = VmRecord(
        id="vm-new", image="web:1", state=VmState.PENDING, machine=vms["vm-0a1b2c3d4e5f"].machine, uid=800101,
        token="t", tenant="default",
    )  # fmt: skip
    with pytest.raises(IntegrityError):
        store.insert_vm(new)  # uid 800101 is vm-1b2c3d4e5f60's
    store.insert_vm(VmRecord(**{**new.__dict__, "uid": 800200}))
    assert len(store.list_vms(tenant="default")) == 6

    # upgrading again changes nothing
    snapshot = {t: rows(engine, t) for t in (*OLD_TABLES, "tenants")}
    migrate.upgrade(engine)
    assert {t: rows(engine, t) for t in (*OLD_TABLES, "tenants")} == snapshot


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_fresh_database_gets_this_schema_and_upgrading_again_changes_nothing(backend: str, tmp_path: Path) -> None:
    with fresh_database(backend, tmp_path) as url:
        engine = connect(url)  # the daemon's way in: create the engine, upgrade
        try:
            assert migrate.current(engine) == migrate.head()
            with engine.connect() as c:
                # the migrations' head is exactly ember.db.schema on this backend (types, indexes, uniques)
                assert compare_metadata(MigrationContext.configure(c), metadata) == []
            tables = {t: rows(engine, t) for t in ("tenants", *OLD_TABLES)}
            assert list(tables["tenants"]) == ["default"]
            assert tables["images"] == tables["builds"] == tables["vms"] == {}

            migrate.upgrade(engine)
            engine.dispose()
            engine = connect(url)  # a daemon restart
            assert migrate.current(engine) == migrate.head()
            assert {t: rows(engine, t) for t in ("tenants", *OLD_TABLES)} == tables
        finally:
            engine.dispose()


def test_images_get_their_builds_exec_defaults_and_forks_their_parents(
    old_database: tuple[Engine, dict[str, list[dict[str, Any]]]],
) -> None:
    """Migration 0004: a built image's ENV, WORKDIR and USER (ember.imagecfg) come from its build's config, a
    fork's from the image it was forked from; the built-in base has none."""
    engine, _ = old_database
    with engine.begin() as c:  # an ENV as Ember 0.1 kept it: an object
        c.exec_driver_sql("""UPDATE builds SET config = '{"env": {"MODE": "x=1"}, "workdir": "/app"}'""")
    migrate.upgrade(engine)
    store = Store(engine)
    web = ImageDefaults(env=(("MODE", "x=1"),), workdir="/app", user="")
    assert [store.get_image(n).defaults for n in ("web:1", "snap-a", "debian")] == [web, web, None]  # type: ignore[union-attr]
