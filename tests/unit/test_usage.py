"""Usage arithmetic (scripted timelines), the snapshot-size walk on real files, and the usage
queries on a real SQLite database with Ember's schema."""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import insert
from sqlalchemy.engine import Engine

from ember.config import Settings
from ember.db import usage as db
from ember.db.schema import builds, events, images, vms
from ember.db.store import Store, connect
from ember.errors import InvalidRequest
from ember.usage import (
    GIB,
    BuildRun,
    BuildTotals,
    StateEvent,
    StorageSample,
    StorageSampler,
    StorageTotals,
    VmSize,
    VmUsage,
    Window,
    billable_seconds,
    build_totals,
    hours_of,
    report,
    snapshot_bytes,
    split_by_hour,
    stamp,
    storage_rows,
    tenant_usage,
    vm_usage,
    window_of,
)
from ember.vmm.machine import Accel, MachineConfig
from tests.databases import fresh_database

T0 = datetime(2024, 5, 10, 12, 0, 0, tzinfo=UTC)
SIZES = {"vm-a": VmSize("acme", 2, 512), "vm-b": VmSize("acme", 1, 1024), "vm-c": VmSize("other", 4, 256)}


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def timeline(vm_id: str, *steps: tuple[float, str], first_id: int = 1) -> list[StateEvent]:
    return [StateEvent(vm_id, at(s), state, first_id + i) for i, (s, state) in enumerate(steps)]


# launched, suspended after 11 s, resumed 30 s later, removed 10 s after that
LIFECYCLE = timeline(
    "vm-a",
    (0, "PENDING"), (1, "RUNNING"), (11, "SUSPENDING"), (12, "SUSPENDED"), (42, "RESUMING"), (43, "RUNNING"),
    (53, "TERMINATING"), (54, "TERMINATED"),
)  # fmt: skip


def one(usage: list[VmUsage]) -> VmUsage:
    assert len(usage) == 1, usage
    return usage[0]


def test_running_covers_pending_running_suspending_resuming() -> None:
    u = one(vm_usage(LIFECYCLE, SIZES, Window(at(-100), at(100))))
    # PENDING 1 + RUNNING 10 + SUSPENDING 1 + RESUMING 1 + RUNNING 10; TERMINATING/TERMINATED bill nothing
    assert (u.vm_id, u.tenant, u.running_seconds, u.suspended_seconds) == ("vm-a", "acme", 23, 30)
    assert u.running_vcpu_seconds == 46 and u.running_gib_seconds == 23 * 0.5


def test_intervals_are_clipped_to_the_window() -> None:
    u = one(vm_usage(LIFECYCLE, SIZES, Window(at(5), at(45))))
    assert (u.running_seconds, u.suspended_seconds) == (6 + 1 + 1 + 2, 30)
    u = one(vm_usage(LIFECYCLE, SIZES, Window(at(20), at(30))))  # inside the suspension only
    assert (u.running_seconds, u.suspended_seconds) == (0, 10)


def test_the_latest_state_runs_to_until() -> None:
    events = timeline("vm-b", (0, "PENDING"), (1, "RUNNING"))
    u = one(vm_usage(events, SIZES, Window(at(-5), at(100))))
    assert (u.running_seconds, u.running_vcpu_seconds, u.running_gib_seconds) == (100, 100, 100)
    # a VM suspended before the window and never touched since: suspended all through it
    events = timeline("vm-b", (0, "PENDING"), (1, "RUNNING"), (2, "SUSPENDING"), (3, "SUSPENDED"))
    u = one(vm_usage(events, SIZES, Window(at(1000), at(4600))))
    assert (u.running_seconds, u.suspended_seconds) == (0, 3600)


def test_event_order_does_not_matter() -> None:
    expected = vm_usage(LIFECYCLE, SIZES, Window(at(5), at(45)))
    shuffled = list(LIFECYCLE)
    for seed in range(5):
        random.Random(seed).shuffle(shuffled)
        assert vm_usage(shuffled, SIZES, Window(at(5), at(45))) == expected
    # two changes in the same millisecond: the one written later (higher id) is the state after it
    tie = [StateEvent("vm-a", at(10), "TERMINATED", 3), *timeline("vm-a", (0, "RUNNING"), (10, "SUSPENDED"))]
    assert one(vm_usage(tie, SIZES, Window(at(0), at(50)))).suspended_seconds == 0


def test_a_vm_that_never_ran_bills_nothing() -> None:
    window = Window(at(100), at(200))
    gone = timeline("vm-a", (0, "PENDING"), (1, "RUNNING"), (2, "TERMINATING"), (3, "TERMINATED"))
    failed = timeline("vm-b", (150, "FAILED"), (160, "TERMINATING"), first_id=10)
    later = timeline("vm-c", (300, "PENDING"), (301, "RUNNING"), first_id=20)  # after the window
    assert vm_usage([*gone, *failed, *later], SIZES, window) == []
    # launched and failed at once: the launch attempt (PENDING) is billed, the failure is not
    u = one(vm_usage(timeline("vm-c", (0, "PENDING"), (2, "FAILED")), SIZES, Window(at(0), at(60))))
    assert (u.running_seconds, u.running_vcpu_seconds, u.suspended_seconds) == (2, 8, 0)


def test_a_vm_without_a_record_is_left_out() -> None:
    assert vm_usage(timeline("vm-purged", (0, "RUNNING")), SIZES, Window(at(0), at(10))) == []


def test_tenant_totals() -> None:
    window = Window(at(0), at(100))
    per_vm = vm_usage(
        [
            *LIFECYCLE,
            *timeline("vm-b", (50, "RUNNING"), first_id=20),
            *timeline("vm-c", (90, "SUSPENDED"), first_id=30),
        ],
        SIZES,
        window,
    )
    storage = {"other": StorageTotals(image_byte_seconds=3600 * GIB, snapshot_byte_seconds=1800 * GIB)}
    totals = tenant_usage(per_vm, storage, {"zeta": BuildTotals(2, 30.5)})
    assert [t.tenant for t in totals] == ["acme", "other", "zeta"]
    acme, other, zeta = totals
    assert (acme.running_vcpu_seconds, acme.running_gib_seconds, acme.suspended_seconds) == (46 + 50, 11.5 + 50, 30)
    assert (other.suspended_seconds, other.image_gib_hours, other.snapshot_gib_hours) == (10, 1.0, 0.5)
    assert (zeta.builds, zeta.build_seconds, zeta.running_vcpu_seconds) == (2, 30.5, 0)


def test_builds_count_in_the_window_they_started() -> None:
    window = Window(at(0), at(100))
    runs = [
        BuildRun("acme", at(-10), at(20), 30.0),  # started before the window
        BuildRun("acme", at(10), at(30), 19.5),  # measured
        BuildRun("acme", at(40), at(47), 0.0),  # cut short by a daemon restart: its start to its end
        BuildRun("other", at(90), None, 0.0),  # still building: its time so far
        BuildRun("other", at(100), None, 0.0),  # at until: outside
    ]
    assert build_totals(runs, window) == {"acme": BuildTotals(2, 26.5), "other": BuildTotals(1, 10.0)}


def test_request_windows() -> None:
    now = datetime(2024, 5, 10, 12, 30, tzinfo=UTC)
    assert window_of(None, None, now) == Window(datetime(2024, 5, 1, tzinfo=UTC), now)
    w = window_of("2024-04-01", "2024-04-02T01:00:00+02:00", now)  # no offset: UTC
    assert w == Window(datetime(2024, 4, 1, tzinfo=UTC), datetime(2024, 4, 1, 23, tzinfo=UTC))
    assert window_of("2024-05-10T12:00:00Z", "2030-01-01", now).until == now  # no usage from the future
    assert window_of("2024-05-10T12:30:00Z", None, now) == Window(now, now)
    with pytest.raises(InvalidRequest, match=r"since='yesterday' is not an ISO-8601 time: give e\.g\. 2024-05-01"):
        window_of("yesterday", None, now)
    with pytest.raises(InvalidRequest, match="until='2024-13-01' is not an ISO-8601 time"):
        window_of(None, "2024-13-01", now)
    # an offset that moves a time past the calendar's ends clamps there (no 500 from an OverflowError)
    assert window_of("0001-01-01T00:00:00+23:59", "9999-12-31T23:59:59-23:59", now) == Window(
        datetime.min.replace(tzinfo=UTC), now
    )
    with pytest.raises(InvalidRequest, match=r"since \(2024-05-02T00:00:00\+00:00\) is after until"):
        window_of("2024-05-02", "2024-05-01", now)
    # an offset that puts the time outside the calendar is clamped to its end (it was a 500)
    assert window_of("0001-01-01T00:00:00+05:00", None, now).since == datetime.min.replace(tzinfo=UTC)
    assert window_of("2024-05-01", "9999-12-31T23:00:00-05:00", now).until == now


def test_hours() -> None:
    assert split_by_hour(
        datetime(2024, 5, 10, 11, 59, 30, tzinfo=UTC), datetime(2024, 5, 10, 13, 0, 10, tzinfo=UTC)
    ) == [
        ("2024-05-10T11", 30.0),
        ("2024-05-10T12", 3600.0),
        ("2024-05-10T13", 10.0),
    ]
    assert split_by_hour(T0, T0) == []
    assert hours_of(Window(datetime(2024, 5, 1, tzinfo=UTC), datetime(2024, 6, 1, tzinfo=UTC))) == (
        "2024-05-01T00",
        "2024-05-31T23",
    )
    assert hours_of(Window(at(-1), at(1))) == ("2024-05-10T11", "2024-05-10T12")
    assert hours_of(Window(T0, T0)) is None
    assert hours_of(Window(datetime(999, 1, 1, tzinfo=UTC), T0)) == ("0999-01-01T00", "2024-05-10T11")


def test_a_sample_bills_the_time_since_the_last_one_at_most_twice_the_interval() -> None:
    assert billable_seconds(59.5, 60) == 59.5
    assert billable_seconds(3 * 3600, 60) == 120  # the daemon was stalled or down: not billed on one measurement
    assert billable_seconds(-1, 60) == 0  # the clock stepped back
    sample = StorageSample(image_bytes={"acme": 2 * GIB, "idle": 0}, snapshot_bytes={"other": GIB})
    rows = storage_rows(
        sample, datetime(2024, 5, 10, 11, 59, 30, tzinfo=UTC), datetime(2024, 5, 10, 12, 0, 30, tzinfo=UTC)
    )
    assert rows == [
        ("acme", "2024-05-10T11", 60.0 * GIB, 0.0),
        ("acme", "2024-05-10T12", 60.0 * GIB, 0.0),
        ("other", "2024-05-10T11", 0.0, 30.0 * GIB),
        ("other", "2024-05-10T12", 0.0, 30.0 * GIB),
    ]


# ---- snapshot sizes on real files ---------------------------------------------


def write_at(path: Path, offset: int, data: bytes) -> None:
    with open(path, "wb") as f:
        f.seek(offset)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


@pytest.fixture
def vms_dir(tmp_path: Path) -> Path:
    d = tmp_path / "vms"
    d.mkdir(mode=0o700)
    return d


def measure_vm(vms_dir: Path, vm_id: str) -> int:
    fd = os.open(vms_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return snapshot_bytes(fd, vm_id)
    finally:
        os.close(fd)


def test_snapshot_bytes_are_allocated_blocks_of_root_files(vms_dir: Path, tmp_path: Path) -> None:
    snap = vms_dir / "vm-1" / "suspend"
    snap.mkdir(parents=True)
    write_at(snap / "ram", 64 << 20, b"x" * 8192)  # 64 MiB hole, then two pages
    write_at(snap / "state", 0, b"s" * 100_000)
    (snap / "manifest.json").write_text("{}")
    expected = sum(allocated(snap / n) for n in ("ram", "state", "manifest.json"))
    assert 100_000 <= expected < 1 << 20  # the hole is free
    assert measure_vm(vms_dir, "vm-1") == expected
    # hostile leftovers: a symlink to a big file, a FIFO, and a file root does not own count for nothing
    big = tmp_path / "big"
    write_at(big, 0, b"b" * (4 << 20))
    (snap / "link").symlink_to(big)
    os.mkfifo(snap / "fifo")
    write_at(snap / "foreign", 0, b"f" * (1 << 20))
    os.chown(snap / "foreign", 12345, 12345)
    assert measure_vm(vms_dir, "vm-1") == expected


def test_snapshot_walk_never_follows_a_symlink(vms_dir: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere" / "suspend"
    elsewhere.mkdir(parents=True)
    write_at(elsewhere / "ram", 0, b"r" * (1 << 20))
    (vms_dir / "vm-link").symlink_to(elsewhere.parent)  # the VM directory is a link
    (vms_dir / "vm-2").mkdir()
    (vms_dir / "vm-2" / "suspend").symlink_to(elsewhere)  # its snapshot directory is a link
    assert measure_vm(vms_dir, "vm-link") == 0
    assert measure_vm(vms_dir, "vm-2") == 0
    assert measure_vm(vms_dir, "../elsewhere") == 0
    assert measure_vm(vms_dir, "vm-missing") == 0  # resumed or removed meanwhile


# ---- queries on a real database ---------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """A fresh database migrated as the daemon makes it (PostgreSQL in the suite's second pass)."""
    with fresh_database(request.param, tmp_path) as url:
        e = connect(url)
        yield e
        e.dispose()


def machine(vcpus: int, memory_mib: int) -> str:
    return MachineConfig(Accel.TCG, memory_mib, vcpus, "/k", "/i", "", "QEMU 10.0").to_json()


def vm_row(vm_id: str, tenant: str, state: str, vcpus: int, memory_mib: int) -> dict[str, object]:
    return {
        "id": vm_id, "image": "debian", "state": state, "machine": machine(vcpus, memory_mib), "uid": None,
        "token": "", "ram": "clone", "pid": 0, "state_reason": "launch", "next_token": "", "created_at": stamp(T0),
        "updated_at": stamp(T0), "tenant": tenant, "env": "{}", "tags": "{}", "state_message": "", "terminated_at": "",
    }  # fmt: skip


def event_rows(tenant: str, vm_id: str, *steps: tuple[float, str]) -> list[dict[str, object]]:
    return [
        {"tenant": tenant, "vm_id": vm_id, "at": stamp(at(s)), "from_state": "", "to_state": state, "reason": "",
         "message": "", "actor": "root"}
        for s, state in steps
    ]  # fmt: skip


def build_row(name: str, tenant: str, created: float, finished: float | None, seconds: float) -> dict[str, object]:
    return {
        "name": name, "repo": name, "version": 1, "state": "BUILDING" if finished is None else "CREATED", "error": "",
        "step": "", "config": "", "steps": "", "disk_bytes": 0, "memory_bytes": 0, "seconds": seconds,
        "created_at": stamp(at(created)), "finished_at": "" if finished is None else stamp(at(finished)),
        "tenant": tenant,
    }  # fmt: skip


def image_row(name: str, tenant: str, gid: int, disk: int, memory: int) -> dict[str, object]:
    return {
        "name": name, "machine": machine(1, 256), "gid": gid, "token": "", "disk_bytes": disk, "memory_bytes": memory,
        "created_at": stamp(T0), "parent": "", "tenant": tenant,
    }  # fmt: skip


def test_report_from_the_database(engine: Engine) -> None:
    with engine.begin() as c:
        c.execute(
            insert(vms), [vm_row("vm-a", "acme", "TERMINATED", 2, 512), vm_row("vm-c", "other", "SUSPENDED", 4, 256)]
        )
        c.execute(insert(events), event_rows("acme", "vm-a", (-50, "PENDING"), (-49, "RUNNING"), (30, "TERMINATING"),
                                             (31, "TERMINATED")))  # fmt: skip
        c.execute(insert(events), event_rows("other", "vm-c", (-20, "PENDING"), (-19, "RUNNING"), (-10, "SUSPENDED")))
        c.execute(insert(events), event_rows("acme", "vm-gone", (0, "RUNNING")))  # its record was purged
        c.execute(insert(builds), [build_row("b1", "acme", 5, 25, 19.0), build_row("b2", "other", -5, 5, 9.0),
                                   build_row("b3", "acme", 50, None, 0.0)])  # fmt: skip
    hours = [("other", "2024-05-10T11", 0.0, 3600.0 * GIB), ("other", "2024-05-10T12", 0.0, 1800.0 * GIB),
             ("acme", "2024-05-10T13", 7200.0 * GIB, 0.0)]  # fmt: skip
    db.add_storage(engine, hours)
    window = Window(at(0), at(60))  # 12:00:00 - 12:01:00
    r = report(engine, window, None)
    assert [(v.vm_id, v.running_seconds, v.suspended_seconds) for v in r.vms] == [("vm-a", 30, 0), ("vm-c", 0, 60)]
    acme, other = r.tenants
    assert (acme.tenant, acme.running_vcpu_seconds, acme.running_gib_seconds) == ("acme", 60, 15)
    assert (acme.builds, acme.build_seconds, acme.image_gib_hours) == (2, 19 + 10, 0)  # b3 runs to until
    assert (other.tenant, other.suspended_seconds, other.snapshot_gib_hours, other.builds) == ("other", 60, 0.5, 0)
    only = report(engine, window, "other")
    assert [t.tenant for t in only.tenants] == ["other"] and [v.vm_id for v in only.vms] == ["vm-c"]
    # storage counts whole hours that overlap the window
    assert report(engine, Window(at(-1), at(3601)), "other").tenants[0].snapshot_gib_hours == 1.5
    assert report(engine, Window(at(0), at(0)), None).tenants == []


def test_storage_rows_accumulate(engine: Engine) -> None:
    db.add_storage(engine, [("acme", "2024-05-10T12", 10.0, 1.0), ("other", "2024-05-10T12", 0.0, 5.0)])
    db.add_storage(engine, [("acme", "2024-05-10T12", 2.5, 0.5), ("acme", "2024-05-10T13", 1.0, 0.0)])
    assert db.storage_sums(engine, "2024-05-10T12", "2024-05-10T12", None) == {"acme": (12.5, 1.5), "other": (0.0, 5.0)}
    assert db.storage_sums(engine, "2024-05-10T00", "2024-05-10T23", "acme") == {"acme": (13.5, 1.5)}


def test_image_bytes_and_suspended_vms(engine: Engine) -> None:
    with engine.begin() as c:
        rows = [image_row("debian", "", 1, 10**9, 10**8), image_row("app", "acme", 2, 100, 20),
                image_row("other~app", "other", 3, 7, 0), image_row("app2", "acme", 4, 1, 2)]  # fmt: skip
        c.execute(insert(images), rows)
        c.execute(insert(vms), [vm_row("vm-1", "acme", "SUSPENDED", 1, 256), vm_row("vm-2", "acme", "RUNNING", 1, 256)])
    assert db.image_bytes(engine) == {"acme": 123, "other": 7}  # built-in bases are nobody's
    assert db.suspended_vms(engine) == [("vm-1", "acme")]


# ---- the sampler on real files and a real store ---------------------------------------


@pytest.fixture
def sampled(engine: Engine, tmp_path: Path) -> tuple[StorageSampler, int]:
    """A data directory with one suspended VM of tenant acme (and a running one); acme has 120 bytes of images."""
    settings = Settings.from_env({"EMBER_DATA_DIR": str(tmp_path / "data"), "EMBER_USAGE_SAMPLE_S": "0.05"})
    for vm_id in ("vm-1", "vm-2"):
        (settings.vms_dir / vm_id / "suspend").mkdir(parents=True)
        write_at(settings.vms_dir / vm_id / "suspend" / "ram", 0, b"r" * 65536)
    with engine.begin() as c:
        c.execute(insert(vms), [vm_row("vm-1", "acme", "SUSPENDED", 1, 256), vm_row("vm-2", "acme", "RUNNING", 1, 256)])
        c.execute(insert(images), [image_row("app", "acme", 2, 100, 20), image_row("debian", "", 1, 10**9, 0)])
    return StorageSampler(settings, Store(engine)), allocated(settings.vms_dir / "vm-1" / "suspend" / "ram")


def test_a_sample_bills_bytes_times_seconds_into_hours(engine: Engine, sampled: tuple[StorageSampler, int]) -> None:
    sampler, snapshot = sampled
    sampler.sample(10.0, datetime(2024, 5, 10, 12, 0, 4, tzinfo=UTC))
    assert db.storage_sums(engine, "2024-05-10T11", "2024-05-10T11", None) == {"acme": (120 * 6.0, snapshot * 6.0)}
    assert db.storage_sums(engine, "2024-05-10T12", "2024-05-10T12", None) == {"acme": (120 * 4.0, snapshot * 4.0)}


async def test_the_sampler_runs_until_cancelled(engine: Engine, sampled: tuple[StorageSampler, int]) -> None:
    sampler, snapshot = sampled
    task = asyncio.create_task(sampler.run())
    start = time.monotonic()
    await asyncio.sleep(0.5)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    ran = time.monotonic() - start
    (image, snap), *_ = db.storage_sums(engine, "0000-00-00T00", "9999-99-99T99", "acme").values()
    assert 120 * 0.3 <= image <= 120 * ran and snap == pytest.approx(image / 120 * snapshot)
    await asyncio.sleep(0.2)
    assert db.storage_sums(engine, "0000-00-00T00", "9999-99-99T99", "acme")["acme"] == (image, snap)
