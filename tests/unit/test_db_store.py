"""The store on both backends (SQLite, and PostgreSQL in the suite's second pass): sizes past 2 GiB, concurrent
writers, unique constraints, and a full disk reported as ResourceExhausted with nothing half-written."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.exc import IntegrityError

from ember.db.store import Store, connect
from ember.errors import ResourceExhausted
from ember.models import BuildRecord, BuildState, ImageRecord, VmRecord, VmState
from ember.vmm.machine import Accel, MachineConfig
from tests.databases import admin, create_database, drop_database, fresh_database, server_url

MACHINE = MachineConfig(Accel.TCG, 256, 1, "/k", "/i", "console=ttyS0", "QEMU emulator version 10.0.2")
BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(params=BACKENDS)
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """An engine on a fresh database, migrated (as the daemon makes it)."""
    with fresh_database(request.param, tmp_path) as url:
        engine = connect(url)
        yield engine
        engine.dispose()


def image(name: str, gid: int, **changes: object) -> ImageRecord:
    fields: dict[str, object] = {
        "name": name, "machine": MACHINE, "gid": gid, "token": f"t-{name}", "disk_bytes": 1 << 20,
        "memory_bytes": 1 << 20, "tenant": "default",
    }  # fmt: skip
    return ImageRecord(**(fields | changes))  # type: ignore[arg-type]


def vm(vm_id: str, uid: int) -> VmRecord:
    return VmRecord(id=vm_id, image="web:1", state=VmState.PENDING, machine=MACHINE, uid=uid, token="t")


def in_threads(n: int, work: Callable[[int], None]) -> list[BaseException]:
    """Run ``work(0..n-1)`` in ``n`` threads released at once; the exceptions they raised."""
    start, errors = threading.Barrier(n), []

    def run(i: int) -> None:
        start.wait()
        try:
            work(i)
        except BaseException as exc:  # collected and checked by the caller
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a writer hung"
    return errors


def test_sizes_past_2_gib_round_trip(engine: Engine) -> None:
    """EMBER_DISK_GIB=2 (the default) makes a 2 GiB disk: 2**31 bytes, one past a 32-bit INTEGER."""
    store = Store(engine)
    big = image("web:1", 790001, disk_bytes=2 << 30, memory_bytes=64 << 30)
    store.put_image(big)
    assert store.get_image("web:1") == big
    build = BuildRecord(name="web:1", repo="web", version=1, state=BuildState.CREATED, disk_bytes=5 << 40,
                        memory_bytes=64 << 30, tenant="default")  # fmt: skip
    store.put_build(build)
    assert store.get_build("web:1") == build
    assert store.latest_image("web") == big


def test_concurrent_writers_lose_nothing(engine: Engine) -> None:
    """8 threads over two stores (two daemons' worth of connections) each launch 10 VMs: every VM and each of
    its two events is there, in order, with event ids unique across all writers."""
    stores = [Store(engine), Store(connect(engine.url.render_as_string(hide_password=False)))]
    threads, per_thread = 8, 10

    def launch(i: int) -> None:
        store = stores[i % 2]
        for j in range(per_thread):
            record = vm(f"vm-{i:02d}-{j:02d}", 800000 + i * per_thread + j)
            store.insert_vm(record)
            store.update_vm(record.moved(VmState.RUNNING, record.state_reason, pid=1000 + j))

    try:
        assert in_threads(threads, launch) == []
        vms = stores[0].list_vms(tenant="default")
        assert len(vms) == threads * per_thread
        assert {v.state for v in vms} == {VmState.RUNNING}
        assert len({v.uid for v in vms}) == len(vms)
        events = stores[1].list_events()
        assert len(events) == 2 * len(vms) and len({e.id for e in events}) == len(events)
        for v in vms:
            assert [(e.from_state, e.to_state) for e in stores[0].list_events(vm_id=v.id)] == [
                ("", "PENDING"),
                ("PENDING", "RUNNING"),
            ]
    finally:
        stores[1].engine.dispose()


def test_unique_constraints_hold_and_a_refused_write_leaves_nothing(engine: Engine) -> None:
    store = Store(engine)
    store.insert_vm(vm("vm-a", 800001))
    events = len(store.list_events())
    with pytest.raises(IntegrityError):
        store.insert_vm(vm("vm-a", 800002))  # the same id
    with pytest.raises(IntegrityError):
        store.insert_vm(vm("vm-b", 800001))  # the same VMM uid
    assert [v.id for v in store.list_vms()] == ["vm-a"]
    assert len(store.list_events()) == events  # no event for a VM that was never recorded
    # uid 0 (stored as NULL: TERMINATED VMs gave theirs back) is no one's: any number of VMs may have it
    for vm_id in ("vm-t1", "vm-t2"):
        store.insert_vm(vm(vm_id, 0).moved(VmState.TERMINATED, vm(vm_id, 0).state_reason, terminated_at="x"))
    assert {v.id for v in store.list_vms(terminated=True)} == {"vm-a", "vm-t1", "vm-t2"}

    store.put_image(image("web:1", 790001))
    with pytest.raises(IntegrityError):
        store.put_image(image("web:2", 790001))  # the same image group
    assert [i.name for i in store.list_images()] == ["web:1"]


def test_one_uid_raced_for_by_many_writers_goes_to_exactly_one(engine: Engine) -> None:
    store = Store(engine)
    errors = in_threads(6, lambda i: store.insert_vm(vm(f"vm-{i}", 800123)))
    assert len(errors) == 5 and all(isinstance(e, IntegrityError) for e in errors), errors
    assert [v.uid for v in store.list_vms()] == [800123]


@contextlib.contextmanager
def full_store(backend: str, tmp_path: Path) -> Iterator[Store]:
    """A store whose database runs out of disk after a few MiB."""
    if backend == "postgresql":
        with full_postgresql() as engine:
            yield Store(engine)
        return
    engine = connect(f"sqlite:///{tmp_path / 'ember.db'}")
    with engine.connect() as c:
        pages = int(c.execute(text("PRAGMA page_count")).scalar_one())

    def cap(dbapi_conn: Any, _record: object) -> None:
        dbapi_conn.execute(f"PRAGMA max_page_count = {pages + 4}")  # SQLite then answers SQLITE_FULL, "disk is full"

    event.listen(engine, "connect", cap)
    engine.dispose()  # every connection from now on has the cap
    try:
        yield Store(engine)
    finally:
        engine.dispose()


@contextlib.contextmanager
def full_postgresql() -> Iterator[Engine]:
    """A database whose tablespace is a 24 MiB tmpfs: PostgreSQL runs out of disk when its tables outgrow it."""
    owner = server_uid()
    mount = Path(tempfile.mkdtemp(prefix="ember-pg-full-", dir="/var/tmp"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24M,mode=0700", "tmpfs", str(mount)], check=True)
    space, url = f"ember_full_{secrets.token_hex(4)}", ""
    try:
        os.chown(mount, owner, -1)
        admin(f"CREATE TABLESPACE {space} LOCATION '{mount}'")
        url = create_database("full", options=f"TABLESPACE {space}")
        engine = connect(url)
        try:
            yield engine
        finally:
            engine.dispose()
    finally:
        if url:
            drop_database(url)
        admin(f"DROP TABLESPACE IF EXISTS {space}")
        subprocess.run(["umount", "-l", str(mount)], check=False)
        mount.rmdir()


def server_uid() -> int:
    """The uid the test server runs as; skips for a server on another machine."""
    if not server_url():
        pytest.skip("EMBER_TEST_DATABASE_URL is not set: scripts/postgres.sh run .venv/bin/python -m pytest ...")
    engine = create_engine(server_url())
    try:
        with engine.connect() as c:
            data_dir = Path(str(c.execute(text("SHOW data_directory")).scalar_one()))
    finally:
        engine.dispose()
    if not data_dir.is_dir():
        pytest.skip(f"the PostgreSQL server's data directory {data_dir} is not on this machine")
    if os.geteuid() != 0:
        pytest.fail("filling a PostgreSQL tablespace needs root (to mount a small tmpfs)")
    return data_dir.stat().st_uid


def fill_until_full(store: Store) -> int:
    """Record 1 MiB images until the store says the disk is full; how many it recorded."""
    for n in range(200):
        try:
            store.put_image(image(f"big-{n}", 790000 + n, token=secrets.token_hex(512 << 10)))
        except ResourceExhausted as exc:
            assert "disk is full" in str(exc) and "free space" in str(exc)
            return n
    raise AssertionError("200 MiB of images fit: the disk never filled")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_full_disk_is_resource_exhausted_and_leaves_nothing_half_written(backend: str, tmp_path: Path) -> None:
    with full_store(backend, tmp_path) as store:
        recorded = fill_until_full(store)
        # what was recorded is whole, the refused image is not there, and the store still reads
        assert [i.name for i in store.list_images()] == sorted(f"big-{n}" for n in range(recorded))
        assert store.get_image(f"big-{recorded}") is None
        with pytest.raises(ResourceExhausted):
            store.insert_vm(dataclasses.replace(vm("vm-x", 800001), token=secrets.token_hex(4 << 20)))
        assert store.list_vms() == [] and store.list_events() == []
