"""Durable records of images, builds and VMs, and the event log of every VM state change.

SQLAlchemy Core over :mod:`ember.db.schema`: SQLite by default, PostgreSQL when EMBER_DATABASE_URL says so.
Every write of a VM record whose state changed appends an event in the same transaction (the actor is the
request's principal, :data:`ember.tenancy.principal.CURRENT`), then tells the listeners (webhooks).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Callable, Iterator
from pathlib import Path

from sqlalchemy import create_engine, delete, event, func, insert, or_, select, update
from sqlalchemy.engine import Connection, Engine, RowMapping
from sqlalchemy.exc import OperationalError

from ember.db import migrate
from ember.db.schema import builds, events, images, vms
from ember.errors import ResourceExhausted
from ember.imagecfg import ImageDefaults
from ember.models import (
    BuildRecord,
    BuildState,
    EventRecord,
    IdlePolicy,
    ImageRecord,
    StateReason,
    VmRecord,
    VmState,
    utcnow,
)
from ember.network.policy import EgressPolicy
from ember.tenancy.principal import CURRENT
from ember.vmm.machine import MachineConfig, RamMode


def _image_row(r: ImageRecord) -> dict[str, object]:
    return {
        "name": r.name, "machine": r.machine.to_json(), "gid": r.gid, "token": r.token,
        "disk_bytes": r.disk_bytes, "memory_bytes": r.memory_bytes, "created_at": r.created_at, "parent": r.parent,
        "tenant": r.tenant, "defaults": r.defaults.to_json() if r.defaults is not None else "",
    }  # fmt: skip


def _image(row: RowMapping) -> ImageRecord:
    data = dict(row)
    data["machine"] = MachineConfig.from_json(data["machine"])
    data["defaults"] = ImageDefaults.from_json(data["defaults"])
    return ImageRecord(**data)


def _vm_row(r: VmRecord) -> dict[str, object]:
    return {
        "id": r.id, "image": r.image, "state": r.state.value, "machine": r.machine.to_json(), "uid": r.uid or None,
        "token": r.token, "ram": r.ram.value, "pid": r.pid, "state_reason": r.state_reason.value,
        "next_token": r.next_token, "created_at": r.created_at, "updated_at": r.updated_at, "tenant": r.tenant,
        "env": json.dumps(r.env), "tags": json.dumps(r.tags), "state_message": r.state_message,
        "terminated_at": r.terminated_at, "idle_timeout_s": r.idle.idle_timeout_s, "auto_resume": r.idle.auto_resume,
        "suspended_ttl_s": r.idle.suspended_ttl_s, "max_duration_s": r.idle.max_duration_s,
        "max_duration_running_only": r.idle.max_duration_running_only, "suspended_at": r.suspended_at,
        "suspended_s": r.suspended_s, "egress": r.egress.to_json(), "aws": json.dumps(r.aws),
    }  # fmt: skip


def _vm(row: RowMapping) -> VmRecord:
    data = dict(row)
    data["machine"] = MachineConfig.from_json(data["machine"])
    data["state"] = VmState(data["state"])
    data["ram"] = RamMode(data["ram"])
    data["uid"] = data["uid"] or 0
    data["state_reason"] = StateReason(data["state_reason"])
    data["env"] = json.loads(data["env"])
    data["tags"] = json.loads(data["tags"])
    data["idle"] = IdlePolicy(
        idle_timeout_s=data.pop("idle_timeout_s"), auto_resume=bool(data.pop("auto_resume")),
        suspended_ttl_s=data.pop("suspended_ttl_s"), max_duration_s=data.pop("max_duration_s"),
        max_duration_running_only=bool(data.pop("max_duration_running_only")),
    )  # fmt: skip
    data["egress"] = EgressPolicy.from_json(data["egress"])
    data["aws"] = json.loads(data["aws"])
    return VmRecord(**data)


def _event(row: RowMapping) -> EventRecord:
    return EventRecord(**dict(row))


EventListener = Callable[[EventRecord], None]


def connect(url_or_path: str | Path) -> Engine:
    """An engine on the database, migrated to this release's schema."""
    url = url_or_path if isinstance(url_or_path, str) else f"sqlite:///{url_or_path}"
    engine = create_engine(url, pool_pre_ping=not url.startswith("sqlite"))
    if url.startswith("sqlite"):
        event.listen(engine, "connect", _sqlite_pragmas)
    migrate.upgrade(engine)
    return engine


@contextlib.contextmanager
def write_transaction(engine: Engine) -> Iterator[Connection]:
    """A write transaction; a full disk is reported like every other full disk (every store writes so)."""
    try:
        with engine.begin() as c:
            yield c
    except OperationalError as exc:
        # SQLite: SQLITE_FULL / SQLITE_IOERR; PostgreSQL: disk_full (SQLSTATE 53100, "could not extend file")
        if getattr(exc.orig, "sqlstate", None) == "53100" or any(
            m in str(exc) for m in ("disk is full", "disk I/O error")
        ):
            raise ResourceExhausted(
                "the host disk is full: Ember cannot record the change; free space and retry"
            ) from exc
        raise


class Store:
    def __init__(self, db: Engine | str | Path) -> None:
        """On an engine, or a database URL or SQLite file (migrated first)."""
        self.engine = db if isinstance(db, Engine) else connect(db)
        self.listeners: list[EventListener] = []  # called (from any thread) after an event is committed

    def _write(self) -> contextlib.AbstractContextManager[Connection]:
        return write_transaction(self.engine)

    # images
    def put_image(self, record: ImageRecord) -> None:
        with self._write() as c:
            c.execute(delete(images).where(images.c.name == record.name))
            c.execute(insert(images).values(**_image_row(record)))

    def get_image(self, name: str) -> ImageRecord | None:
        with self.engine.connect() as c:
            row = c.execute(select(images).where(images.c.name == name)).mappings().first()
        return _image(row) if row else None

    def list_images(self, tenants: tuple[str, ...] | None = None) -> list[ImageRecord]:
        """Every image, or those of ``tenants`` ("" names the built-in bases)."""
        query = select(images).order_by(images.c.name)
        if tenants is not None:
            query = query.where(images.c.tenant.in_(tenants))
        with self.engine.connect() as c:
            return [_image(r) for r in c.execute(query).mappings()]

    def delete_image(self, name: str) -> None:
        with self._write() as c:
            c.execute(delete(images).where(images.c.name == name))

    def latest_image(self, repo: str) -> ImageRecord | None:
        """The newest CREATED version of ``repo``."""
        with self.engine.connect() as c:
            row = c.execute(
                select(images).join(builds, builds.c.name == images.c.name)
                .where(builds.c.repo == repo, builds.c.state == BuildState.CREATED.value)
                .order_by(builds.c.version.desc()).limit(1)
            ).mappings().first()  # fmt: skip
        return _image(row) if row else None

    # builds
    def put_build(self, record: BuildRecord) -> None:
        row = dataclasses.asdict(record) | {"state": record.state.value}
        with self._write() as c:
            c.execute(delete(builds).where(builds.c.name == record.name))
            c.execute(insert(builds).values(**row))

    def get_build(self, name: str) -> BuildRecord | None:
        with self.engine.connect() as c:
            row = c.execute(select(builds).where(builds.c.name == name)).mappings().first()
        return BuildRecord(**{**row, "state": BuildState(row["state"])}) if row else None

    def list_builds(self, tenants: tuple[str, ...] | None = None) -> list[BuildRecord]:
        query = select(builds).order_by(builds.c.repo, builds.c.version)
        if tenants is not None:
            query = query.where(builds.c.tenant.in_(tenants))
        with self.engine.connect() as c:
            rows = c.execute(query).mappings().all()
        return [BuildRecord(**{**r, "state": BuildState(r["state"])}) for r in rows]

    def count_builds(self, tenant: str, state: BuildState) -> int:
        with self.engine.connect() as c:
            query = select(func.count()).select_from(builds).where(builds.c.tenant == tenant, builds.c.state == state)
            return int(c.execute(query).scalar_one())

    def delete_build(self, name: str) -> None:
        with self._write() as c:
            c.execute(delete(builds).where(builds.c.name == name))

    def next_version(self, repo: str) -> int:
        with self.engine.connect() as c:
            rows = c.execute(select(builds.c.version).where(builds.c.repo == repo)).all()
        return max((r[0] for r in rows), default=0) + 1

    def next_gid(self, gids: range, exclude: set[int] | None = None) -> int:
        with self.engine.connect() as c:
            used = {r[0] for r in c.execute(select(images.c.gid))} | (exclude or set())
        for gid in gids:
            if gid not in used:
                return gid
        raise ResourceExhausted(f"all {len(gids)} image group ids are in use: remove images or raise EMBER_UID_COUNT")

    # vms
    def insert_vm(self, record: VmRecord) -> None:
        with self._write() as c:
            c.execute(insert(vms).values(**_vm_row(record)))
            event = self._record_event(c, record, VmState.PENDING if record.state is not VmState.PENDING else None)
        self._tell(event)

    def update_vm(self, record: VmRecord) -> None:
        with self._write() as c:
            before = c.execute(select(vms.c.state).where(vms.c.id == record.id)).scalar_one_or_none()
            c.execute(update(vms).where(vms.c.id == record.id).values(**_vm_row(record)))
            event = None
            if before is not None and before != record.state.value:
                event = self._record_event(c, record, VmState(before))
        self._tell(event)

    def record_hook(self, record: VmRecord, message: str) -> EventRecord:
        """An app hook call (ember.hooks) as an event of the VM: no state change (from = to = its state),
        reason ``hook``, ``message`` what the call did. Not told to the listeners (webhooks send state changes)."""
        call = dataclasses.replace(record, state_reason=StateReason.HOOK, state_message=message, updated_at=utcnow())
        with self._write() as c:
            return self._record_event(c, call, record.state)

    def _record_event(self, c: Connection, record: VmRecord, before: VmState | None) -> EventRecord:
        row = {
            "tenant": record.tenant, "vm_id": record.id, "at": record.updated_at,
            "from_state": before.value if before else "", "to_state": record.state.value,
            "reason": record.state_reason.value, "message": record.state_message[:4096], "actor": CURRENT.get().actor,
        }  # fmt: skip
        event_id = c.execute(insert(events).values(**row)).inserted_primary_key[0]  # type: ignore[index]
        return EventRecord(id=int(event_id), **row)

    def _tell(self, event: EventRecord | None) -> None:
        if event is not None:
            for listener in self.listeners:
                listener(event)

    def get_vm(self, vm_id: str) -> VmRecord | None:
        with self.engine.connect() as c:
            row = c.execute(select(vms).where(vms.c.id == vm_id)).mappings().first()
        return _vm(row) if row else None

    def list_vms(
        self, *, tenant: str | None = None, terminated: bool = False, terminated_since: str = ""
    ) -> list[VmRecord]:
        """Live VMs (oldest first), of one tenant or all; ``terminated`` adds the TERMINATED ones (those
        terminated at or after ``terminated_since``, if given)."""
        query = select(vms).order_by(vms.c.created_at)
        if not terminated:
            query = query.where(vms.c.state != VmState.TERMINATED.value)
        elif terminated_since:
            query = query.where(or_(vms.c.state != VmState.TERMINATED.value, vms.c.terminated_at >= terminated_since))
        if tenant is not None:
            query = query.where(vms.c.tenant == tenant)
        with self.engine.connect() as c:
            return [_vm(r) for r in c.execute(query).mappings()]

    def purge_terminated(self, before: str) -> int:
        """Forget VMs terminated before ``before`` (ISO time) and their events; returns how many."""
        with self._write() as c:
            gone = select(vms.c.id).where(vms.c.state == VmState.TERMINATED.value, vms.c.terminated_at < before)
            ids = [r[0] for r in c.execute(gone)]
            if ids:
                c.execute(delete(events).where(events.c.vm_id.in_(ids)))
                c.execute(delete(vms).where(vms.c.id.in_(ids)))
        return len(ids)

    def free_uid(self, uids: range, exclude: set[int] | None = None) -> int:
        with self.engine.connect() as c:
            used = {r[0] for r in c.execute(select(vms.c.uid).where(vms.c.uid.is_not(None)))} | (exclude or set())
        for uid in uids:
            if uid not in used:
                return uid
        raise ResourceExhausted(f"all {len(uids)} VMM uids are in use: remove VMs or raise EMBER_UID_COUNT")

    # events
    def list_events(
        self, *, tenant: str | None = None, vm_id: str | None = None, after: int = 0, limit: int = 1000
    ) -> list[EventRecord]:
        query = select(events).where(events.c.id > after).order_by(events.c.id).limit(limit)
        if tenant is not None:
            query = query.where(events.c.tenant == tenant)
        if vm_id is not None:
            query = query.where(events.c.vm_id == vm_id)
        with self.engine.connect() as c:
            return [_event(r) for r in c.execute(query).mappings()]


def _sqlite_pragmas(dbapi_conn: object, _record: object) -> None:
    cur = dbapi_conn.cursor()  # type: ignore[attr-defined]
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.close()
