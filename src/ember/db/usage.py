"""Usage queries over the event log, the VM, image and build records and ``storage_usage``.

Plain rows only: the arithmetic is :mod:`ember.usage`'s. Times are compared as the ISO-8601 UTC
strings the records hold (``ember.usage.stamp`` writes the same format); hours are ``YYYY-MM-DDTHH``.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import func, insert, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.sql.elements import ColumnElement

from ember.db.schema import builds, events, images, storage_usage, vms
from ember.models import VmState

CHUNK = 500  # ids per IN (...) list


def _of(column: ColumnElement[str], tenant: str | None) -> list[ColumnElement[bool]]:
    """The condition that a row is ``tenant``'s; none for all tenants."""
    return [] if tenant is None else [column == tenant]


def vm_events(engine: Engine, since: str, until: str, tenant: str | None) -> list[tuple[int, str, str, str]]:
    """``(id, vm_id, at, to_state)``: each VM's last event before ``since`` (the state it was in then)
    and every event in ``[since, until)``; of one tenant, or of all (None)."""
    last_before = (
        select(func.max(events.c.id))
        .where(events.c.at < since, *_of(events.c.tenant, tenant))
        .group_by(events.c.vm_id)
        .scalar_subquery()
    )
    cols = (events.c.id, events.c.vm_id, events.c.at, events.c.to_state)
    inside = select(*cols).where(events.c.at >= since, events.c.at < until, *_of(events.c.tenant, tenant))
    with engine.connect() as c:
        rows = [*c.execute(select(*cols).where(events.c.id.in_(last_before))), *c.execute(inside)]
    return [(id_, vm_id, at, to_state) for id_, vm_id, at, to_state in rows]


def vm_machines(engine: Engine, vm_ids: Iterable[str]) -> dict[str, tuple[str, str]]:
    """``{vm_id: (tenant, machine JSON)}`` of each VM that still has a record."""
    ids = sorted(set(vm_ids))
    found = {}
    with engine.connect() as c:
        for i in range(0, len(ids), CHUNK):
            query = select(vms.c.id, vms.c.tenant, vms.c.machine).where(vms.c.id.in_(ids[i : i + CHUNK]))
            found.update({vm_id: (tenant, machine) for vm_id, tenant, machine in c.execute(query)})
    return found


def build_rows(engine: Engine, since: str, until: str, tenant: str | None) -> list[tuple[str, str, str, float, str]]:
    """``(tenant, created_at, finished_at, seconds, state)`` of the builds started in ``[since, until)``."""
    b = builds.c
    query = select(b.tenant, b.created_at, b.finished_at, b.seconds, b.state).where(
        b.created_at >= since, b.created_at < until, *_of(b.tenant, tenant)
    )
    with engine.connect() as c:
        return [
            (t, created, finished, float(seconds), state) for t, created, finished, seconds, state in c.execute(query)
        ]


def storage_sums(engine: Engine, first: str, last: str, tenant: str | None) -> dict[str, tuple[float, float]]:
    """``{tenant: (image_byte_seconds, snapshot_byte_seconds)}`` summed over the hours ``first``..``last``."""
    su = storage_usage.c
    query = (
        select(su.tenant, func.sum(su.image_byte_seconds), func.sum(su.snapshot_byte_seconds))
        .where(su.hour >= first, su.hour <= last, *_of(su.tenant, tenant))
        .group_by(su.tenant)
    )
    with engine.connect() as c:
        return {t: (float(image), float(snap)) for t, image, snap in c.execute(query)}


def image_bytes(engine: Engine) -> dict[str, int]:
    """Bytes of each tenant's images (disk and memory as recorded); built-in bases are no tenant's."""
    query = (
        select(images.c.tenant, func.sum(images.c.disk_bytes + images.c.memory_bytes))
        .where(images.c.tenant != "")
        .group_by(images.c.tenant)
    )
    with engine.connect() as c:
        return {t: int(n) for t, n in c.execute(query)}


def suspended_vms(engine: Engine) -> list[tuple[str, str]]:
    """``(vm_id, tenant)`` of every SUSPENDED VM."""
    with engine.connect() as c:
        rows = c.execute(select(vms.c.id, vms.c.tenant).where(vms.c.state == VmState.SUSPENDED.value))
        return [(vm_id, t) for vm_id, t in rows]


def add_storage(engine: Engine, rows: Iterable[tuple[str, str, float, float]]) -> None:
    """Add ``(tenant, hour, image_byte_seconds, snapshot_byte_seconds)`` to the hours' totals (one transaction)."""
    su = storage_usage.c
    with engine.begin() as c:
        for tenant, hour, image, snap in rows:
            changed = c.execute(
                update(storage_usage)
                .where(su.tenant == tenant, su.hour == hour)
                .values(
                    image_byte_seconds=su.image_byte_seconds + image,
                    snapshot_byte_seconds=su.snapshot_byte_seconds + snap,
                )
            ).rowcount
            if not changed:
                c.execute(
                    insert(storage_usage).values(
                        tenant=tenant, hour=hour, image_byte_seconds=image, snapshot_byte_seconds=snap
                    )
                )
